"""Sampling parameters, logits -> probabilities, and counter-based randomness.

Owns: the one function that turns a model's logits into the distribution a token is drawn from
(temperature, then top-k, then top-p: the order and tie rules of Hugging Face's logits warpers, so
the target here samples exactly what the target alone would), and the uniforms every random decision
uses. A uniform is a pure function of (seed, position, stream): a run is reproducible for a seed, and
a session resumed on another machine continues exactly as it would have.

Never: touches models, tokenizers, grpc or redis.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

# Streams keep the uniforms of different decisions at one position independent.
DRAFT = 1  # the drafter's sample
ACCEPT = 2  # the accept/reject coin of token-level speculative sampling
TARGET = 3  # the target's own sample (autoregressive step, residual, bonus)
# slrs (the drafter's side only; the verifier reuses DRAFT, ACCEPT and TARGET): see docs/slrs.md
SLRS_STOP = 4  # whether the draft stops before this position (mass of strings with no candidate)
SLRS_LEAF = 5  # which drafter path (leaf of the explored tree) stands behind the candidate drawn
SLRS_CHILD = 6  # which drafter token of a grouped tail of that leaf


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen. temperature 0 means greedy (argmax of the logits)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> "SamplingParams":
        from .errors import InvalidArgument

        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.seed < 2**63):
            raise InvalidArgument(f"seed must be in [0, 2^63), got {self.seed}")
        return self


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> [n, V] float64 probabilities of the sampling distribution."""
    x = logits.double() / params.temperature  # [n, V]
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False, dim=-1)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - params.top_p)
        remove[..., -1:] = False  # keep at least one token
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.softmax(x, dim=-1)


def uniform(seed: int, position: int, stream: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position, stream): 53 random bits."""
    h = hashlib.blake2b(struct.pack("<QQQ", seed & 0xFFFFFFFFFFFFFFFF, position, stream), digest_size=8)
    return (int.from_bytes(h.digest(), "little") >> 11) * (1.0 / 9007199254740992.0)


def draft_uniform(seed: int, round_start: int, offset: int, stream: int = DRAFT) -> float:
    """A drafter-side uniform: the `offset`-th position of the draft of the round that starts at
    committed length `round_start`. Fresh for every round (round starts only grow), so a draft never
    reuses a uniform that an earlier round's draft used at the same position: that earlier draw may
    have shaped what happened next (how many candidates it drafted, hence the next draft length, the
    round's time, the algorithm `auto` picks), and a candidate drawn with it again would not be a
    fresh draw from q given the history, which the acceptance rule needs. A function of the committed
    length, so a session resumed from its committed ids draws the same (tests/test_faults.py)."""
    return uniform(seed, round_start + offset, stream + 16 * (round_start + 1))


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from one row of (possibly unnormalised) non-negative weights [V]."""
    cdf = torch.cumsum(probs, dim=0)
    total = float(cdf[-1])
    if not total > 0.0:
        raise ValueError("cannot sample from an all-zero distribution")
    i = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=cdf.dtype, device=cdf.device), right=True)[0])
    if i >= probs.shape[0]:  # u * total rounded up to the total: take the last token with weight
        i = int(torch.nonzero(probs > 0)[-1, 0])
    return i
