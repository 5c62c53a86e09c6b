"""Verification rules: given the target's distributions at the candidate positions, what is committed.

Terms (as in vLLM's rejection sampler and Timor et al., ICML 2025, arXiv 2502.05202):
- candidates  c_0..c_{n-1}: target token ids proposed for positions pos..pos+n-1
- accepted    the longest prefix of the candidates the rule keeps
- recovered   the target's own token at the first rejected position
- bonus       the target's token after all n candidates were accepted
Every rule returns (a, y): a candidates accepted, then the target's token y (recovered or bonus),
so each verification pass commits a + 1 tokens.

Randomness: the coin and the sample at absolute position i use `uniform(seed, i, stream)`. The
decision at a position uses only its own uniforms, never reused for another committed decision,
so the output distribution is exact (see docs/algorithms.md, "Why it is lossless").

Never: runs models or tokenizers; I/O and timing live in the engine.
"""
from __future__ import annotations

import torch

from .sampling import ACCEPT, TARGET, draft_uniform, sample, uniform


def verify_greedy(logits: torch.Tensor, cands: list) -> tuple:
    """logits [n+1, V]. Accept while the candidate is the target's argmax (same, tli, slem greedy)."""
    best = logits.argmax(dim=-1).tolist()  # [n+1]
    a = 0
    while a < len(cands) and cands[a] == best[a]:
        a += 1
    return a, best[a]


def verify_match(p: torch.Tensor, cands: list, seed: int, pos: int) -> tuple:
    """p [n+1, V] (float64). SLEM under sampling: the target draws its own token at each position
    with the uniform the target alone would use there; a candidate is accepted iff it equals that
    draw. Every committed token is the target's own sample: lossless by construction."""
    for i in range(p.shape[0]):
        y = sample(p[i], uniform(seed, pos + i, TARGET))
        if i >= len(cands) or y != cands[i]:
            return i, y
    raise AssertionError("unreachable: p has one more row than there are candidates")


def verify_rejection(p: torch.Tensor, cands: list, q_ids: list, q_probs: list, seed: int, pos: int) -> tuple:
    """Token-level speculative sampling (Leviathan et al. 2023) for same and tli.

    p [n+1, V] float64: target distributions. Candidate c_i was drawn from the drafter's sparse
    distribution q_i = (q_ids[i] [m] target ids, q_probs[i] [m]). Accept c_i with probability
    min(1, p(c)/q(c)); on rejection draw from norm(max(0, p - q)); after n acceptances draw the
    bonus from p. A candidate whose q is not a distribution it could have been drawn from (q(c) <= 0,
    not normalised, or the seeded draw from q is not c) ends the acceptance there and the target draws
    from p itself: still exact, since that decision does not depend on the target's uniform.

    Limit: exactness needs the candidate to be a draw from the reported q. The draw check catches a
    drafter that is wrong; a malicious drafter that knows the seed could still craft q around the
    uniform. Where drafters are untrusted, use slem (every token is the target's own draw)."""
    for i, c in enumerate(cands):
        # q over the target vocabulary [V]; index_add sums drafter tokens that stand for the same
        # target token (SentencePiece's "a" and "<0x61>"), so q(c) is the probability of drafting c
        q = torch.zeros_like(p[i]).index_add_(0, q_ids[i].to(p.device), q_probs[i].to(p.device, p.dtype))
        qc = float(q[c])
        if not (qc > 0.0) or abs(float(q.sum()) - 1.0) > 1e-6 or not bool(torch.isfinite(q).all()) or float(q.min()) < 0.0:
            return i, sample(p[i], uniform(seed, pos + i, TARGET))
        # The drafter draws c from q with its uniform for this round and offset; redo the draw on the
        # sparse q it sent (same order, so the same index) and refuse a candidate it does not give.
        # An honest drafter always passes; a buggy one (wrong temperature, stale q) cannot bias the output.
        if int(q_ids[i][sample(q_probs[i].to(torch.float64), draft_uniform(seed, pos, i))]) != c:
            return i, sample(p[i], uniform(seed, pos + i, TARGET))
        if uniform(seed, pos + i, ACCEPT) * qc < float(p[i, c]):  # u < p/q
            continue
        residual = (p[i] - q).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:  # p <= q everywhere means p == q: rejection had probability 0
            residual = p[i]
        return i, sample(residual, uniform(seed, pos + i, TARGET))
    n = len(cands)
    return n, sample(p[n], uniform(seed, pos + n, TARGET))
