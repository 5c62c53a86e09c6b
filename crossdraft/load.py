"""Load-aware speculation: how many tokens a round should draft when the target verifies many
sessions' rounds in one batched pass.

Owns: the cost model of the target's batched forward pass (seconds = fixed + per_token x tokens,
fitted online from the passes a scheduler runs), the load it reports (`LoadHint`: sequences per pass
and that cost), and the cap on a round's draft length that follows (`draft_cap`).

Why. At batch 1 a forward pass costs about the same for 1 token as for 5 (reading the weights
dominates), so verifying k candidates is nearly free and speculation wins. When many sessions share
a pass, the pass is already full: every candidate is a row of real work, and a rejected one is work
thrown away, so the best draft length shrinks, to zero when the target's own step is cheaper per
committed token. Counted in the verifier's time, the bottleneck that batching shares (drafters scale
out on their own machines), a session that drafts k drafter tokens per round, each worth r candidate
target tokens of which a fraction alpha is accepted position by position, commits per round

    1 + a(k),  a(k) = alpha + alpha^2 + ... + alpha^(r k)        (expected accepted candidates)

and takes, of a pass shared by B sequences, fixed / B + per_token x (1 + r k), plus its drafting,
d x k / B (alone, a round drafts and then verifies; with many sessions the drafter works on one while
the target verifies another). Where the target's own steps are kept in flight (the services), a
round that drafts also misses a pass it would have been in (fixed / B + per_token more). A round that
drafts first brings the drafter's cache to the committed text, c / B more: the whole prompt at a
session's first draft, which under load no round of a few candidates pays back. Measured on the 2-core
machine, 16 prompts 8 at a time in process, greedy, drafter-spm4k: before this term (and before the
verifier's cost model was primed: `batched.prime_cost`) 19 first rounds drafted, each prefilling its
drafter, and slem ran at 0.88x-0.98x of the target alone, auto at 0.86x-0.95x; with both, 3 and
0.98x-0.99x. The cap is
the k in 0..k_max with the most committed tokens per unit of that time. It is off below `SHARED`
sequences per pass: alone, a session's adaptive length (and `auto`, whose arms include the target's
own step) already measure what pays. Where a shared pass costs about the same for 1 token a session
as for 5 the cap stays above the adaptive length and changes nothing; where every row costs (a full
batch, a CPU) it falls to 1 or 0. vLLM's
`speculative_disable_by_batch_size` is a fixed threshold; this one follows the measured pass cost of
this model on this machine, and each session's own acceptance.

It applies where drafts cannot change what is committed (greedy decoding, and slem, whose every token
is the target's own draw): under token-level rejection sampling the draft decides which of the
target's equally likely outputs a seed gives, and a seeded session must give the same output whatever
shares its passes (`Drafter.exact_match`). There, `auto`'s arm `none` (the target's own step), measured
like the others, is what stops speculation that does not pay.

Never: runs models, knows about sessions' state beyond the counters it is given, imports grpc.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

HALF_LIFE = 64.0  # passes: the weight of a pass in the fit halves after this many more
MIN_PASSES = 8  # passes observed before the model is used
PRIOR_ALPHA = 0.5  # per-position acceptance assumed before a session has rounds of its own
PRIOR_ROUNDS = 4  # ... weighted as this many rounds of evidence
MIN_SPREAD = 1.0  # variance of pass sizes (tokens^2) below which the per-token cost cannot be told apart
SHARED = 1.5  # sequences per pass below which the cap is off (see the module docstring)


@dataclass(frozen=True)
class LoadHint:
    """What a verifier tells a drafter about its load (in the verdicts, `Verdict.load` on the wire)."""
    sequences: float  # sequences per batched pass, recent mean
    fixed_s: float  # a pass's cost that does not depend on its size (passes of two tokens or more)
    token_s: float  # its cost per token in the pass


class CostModel:
    """Exponentially weighted least squares of pass seconds on pass tokens, and the mean sequences per
    pass. Passes of one token stay out of the fit: a matrix-vector product is a kernel of its own, far
    cheaper per row on a CPU than the first rows of a matrix product, and a fit through both would price
    every row of a shared pass wrong. Thread-safe: the scheduler's thread observes, the sessions'
    threads read."""

    def __init__(self, half_life: float = HALF_LIFE):
        self.decay = 0.5 ** (1.0 / half_life)
        self._lock = threading.Lock()
        self.n = 0  # passes of two tokens or more
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # their weighted sums
        self._seq_w = self._seq = 0.0  # sequences per pass, every pass

    def observe(self, sequences: int, tokens: int, seconds: float, *_waits) -> None:
        """One pass (the scheduler's observer signature)."""
        d = self.decay
        with self._lock:
            self._seq_w = self._seq_w * d + 1.0
            self._seq = self._seq * d + sequences
        if tokens > 1:
            self._fit(tokens, seconds)

    def prime(self, tokens: int, seconds: float) -> None:
        """A pass timed before any session (`batched.prime_cost`): into the fit only, not the sequences per
        pass, which only real passes tell."""
        self._fit(tokens, seconds)

    def _fit(self, tokens: int, seconds: float) -> None:
        d = self.decay
        with self._lock:
            self.n += 1
            self._w = self._w * d + 1.0
            self._x = self._x * d + tokens
            self._y = self._y * d + seconds
            self._xx = self._xx * d + tokens * tokens
            self._xy = self._xy * d + tokens * seconds

    def hint(self) -> Optional[LoadHint]:
        with self._lock:
            if self.n < MIN_PASSES or self._seq_w <= 0:
                return None
            w, mx, my = self._w, self._x / self._w, self._y / self._w
            var = self._xx / w - mx * mx
            if var < MIN_SPREAD:  # passes all of one size: no slope to fit (and no cap to set)
                return None
            slope = max(0.0, (self._xy / w - mx * my) / var)
            fixed = max(0.0, my - slope * mx)
            return LoadHint(sequences=self._seq / self._seq_w, fixed_s=fixed, token_s=slope)


def expected_accepted(alpha: float, candidates: float) -> float:
    """alpha + alpha^2 + ... over `candidates` positions (fractional counts interpolate)."""
    if candidates <= 0:
        return 0.0
    if alpha >= 1.0:
        return candidates
    return alpha * (1.0 - alpha ** candidates) / (1.0 - alpha)


def acceptance(accepted: int, candidates: int, rounds_short: int) -> float:
    """A session's per-position acceptance: accepted candidates over the positions that were tried
    (each accepted one, and one rejection per round that stopped short), with a weak prior."""
    tried = accepted + rounds_short
    return (accepted + PRIOR_ALPHA * PRIOR_ROUNDS) / (tried + PRIOR_ROUNDS)


def draft_cap(hint: Optional[LoadHint], alpha: float, ratio: float, k_max: int, draft_s: float = 0.0,
              pipelined: bool = False, catchup_s: float = 0.0) -> int:
    """The draft length in 0..k_max with the most committed tokens per unit of time (see the module
    docstring); k_max when there is no measured load yet or no sharing. `ratio`: candidate target
    tokens per drafted token (about 1 for same and tli; slem's drafter tokens are often shorter);
    `draft_s`: the session's drafting time per drafted token. `pipelined`: the session's target steps
    are kept in flight (`rounds.run_rounds` over a link of depth > 1), so each is in every pass, and a
    round that drafts leaves the pass after its previous verdict (it waits for that verdict, drafts,
    and sends): it costs one more share of a pass, whose slot the target's own step would have used.
    `catchup_s`: what the drafter spends before its first guess, bringing its cache to the committed text
    (the whole prompt at a session's first draft): charged to a round that drafts, so that under load a
    session does not prefill its drafter for a round or two of little gain."""
    if hint is None or k_max <= 0 or hint.sequences < SHARED:
        return max(0, k_max)
    b = hint.sequences
    share = hint.fixed_s / b
    skipped = share + hint.token_s if pipelined else 0.0
    best_k, best = 0, 0.0
    for k in range(0, k_max + 1):
        cands = ratio * k
        cost = share + hint.token_s * (1.0 + cands) + draft_s * k / b + ((skipped + catchup_s / b) if k else 0.0)
        if cost <= 0:
            return k_max
        rate = (1.0 + expected_accepted(alpha, cands)) / cost
        if rate > best * (1.0 + 1e-9):
            best_k, best = k, rate
    return best_k
