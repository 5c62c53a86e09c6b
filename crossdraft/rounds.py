"""The round loop: draft -> verify -> commit, one function for every place a generation runs.

Owns: `run_rounds`, the loop of one session: which arm a round runs (`auto`'s state, or the one
algorithm), its draft length (adaptive per arm, capped by the verifier's load: `load.draft_cap`),
drafting, sending the proposal to "a verifier", applying the verdict to the drafters, the round
statistics. The load cap applies where drafts cannot change the output (greedy decoding and slem;
see `Drafter.exact_match`: a seeded sampled session is the same whatever shares its passes), and only
to lengths the caller left to crossdraft (a `draft_tokens` the caller fixed is kept, so its rounds are
reproducible). The in-process engine (`Engine.generate`) and the drafter service run this function;
they differ only in the verifier they talk to and in how a draft is run:

- `VerifierLink`: `submit(proposal)`, then `result() -> Verdict`, and `load()`; `LocalVerifier` wraps a
  `Verifier` in this process (rounds run alone, or batched by a `Scheduler`), the drafter service wraps
  its Verify stream (`drafter_service/server.py`).
- `draft(drafter, k) -> Proposal`: `drafter.propose` alone, or the drafter's program through a
  `Scheduler` (a service's drafting steps batched across sessions).

Pipelining: the loop yields a round's outcome once the next round's proposal has been submitted, so
what the caller does with it (the drafter service sends it to the gateway, which commits it to Redis)
overlaps the verifier's work instead of delaying the next draft. The last round is yielded at once.
A session of the target alone (no drafter) goes further over a link that allows it (`link.depth` > 1,
the drafter service's Verify stream): each of its rounds commits exactly one token, so the next
proposals' positions are known before the verdicts, and `depth` of them are kept in flight: the
verifier finds the session's next round waiting when a pass ends, instead of one round trip later.

Never: touches models, the wire or the store; decides nothing about acceptance (the verifier does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from .errors import Aborted
from .load import LoadHint, acceptance, draft_cap
from .protocol import TOKENS, Proposal, Verdict
from .scheduler import Scheduler, drive
from .verifier import Verifier


@dataclass
class RoundStats:
    """A generation's round counters, kept the same way in process and by the drafter service."""

    rounds: int = 0
    draft_tokens: int = 0  # candidate target tokens verified
    accepted_tokens: int = 0
    drafted: int = 0  # drafter tokens drafted
    short_rounds: int = 0  # rounds with candidates that did not accept them all
    draft_ns: int = 0
    verify_ns: int = 0
    bridge_ns: int = 0
    network_ns: int = 0  # the services only: round trip minus the verifier's time
    psi_ns: int = 0  # slrs: of draft_ns, computing the proposal distributions
    psi_forward_ns: int = 0  # slrs: of psi_ns, the drafter forward passes
    slrs_fallbacks: int = 0  # slrs: positions where the work bound cut the tree
    slrs_rows: int = 0  # slrs: drafter positions run to compute r
    accepted_by_position: list = field(default_factory=list)  # [i]: rounds whose i-th candidate was accepted

    def add(self, proposal, verdict) -> None:
        """Count one round (proposal None: the target alone)."""
        if proposal is not None:
            self.draft_ns += proposal.draft_ns
            self.drafted += proposal.drafted
            self.psi_ns += getattr(proposal, "psi_ns", 0)
            self.psi_forward_ns += getattr(proposal, "psi_forward_ns", 0)
            self.slrs_fallbacks += getattr(proposal, "slrs_fallbacks", 0)
            self.slrs_rows += getattr(proposal, "psi_rows", 0)
        self.rounds += 1
        self.draft_tokens += verdict.candidates
        self.accepted_tokens += verdict.accepted
        self.short_rounds += int(verdict.accepted < verdict.candidates)
        self.verify_ns += verdict.verify_ns
        self.bridge_ns += verdict.bridge_ns
        by_pos = self.accepted_by_position
        by_pos.extend([0] * (verdict.accepted - len(by_pos)))
        for i in range(verdict.accepted):
            by_pos[i] += 1

    def profile(self) -> dict:
        out = {"draft_s": self.draft_ns / 1e9, "verify_s": self.verify_ns / 1e9, "bridge_s": self.bridge_ns / 1e9}
        if self.psi_ns:  # slrs only: the cost of computing psi / r, and of that the drafter's forwards
            out.update(psi_s=self.psi_ns / 1e9, psi_forward_s=self.psi_forward_ns / 1e9)
        return out

    def load_cap(self, hint: Optional[LoadHint], k: int) -> int:
        """This session's draft length under the verifier's load (`load.draft_cap`)."""
        if hint is None:
            return k
        alpha = acceptance(self.accepted_tokens, self.draft_tokens, self.short_rounds)
        ratio = self.draft_tokens / self.drafted if self.drafted else 1.0
        draft_s = self.draft_ns / self.drafted / 1e9 if self.drafted else 0.0
        return draft_cap(hint, alpha, ratio, k, draft_s)


class DraftLength:
    """Draft length per round: fixed, or adaptive from observed acceptance only (so that a seeded
    sampled run stays reproducible): +2 after a round that accepted every candidate, -1 otherwise."""

    def __init__(self, fixed: Optional[int] = None, start: int = 5, lo: int = 1, hi: int = 16):
        self.fixed = fixed
        self.k = fixed if fixed is not None else start
        self.lo, self.hi = lo, hi

    def update(self, candidates: int, accepted: int) -> None:
        if self.fixed is not None or candidates == 0:
            return
        self.k = min(self.hi, self.k + 2) if accepted == candidates else max(self.lo, self.k - 1)


@dataclass
class Round:
    """One round's outcome, as `run_rounds` yields it."""
    verdict: Verdict
    proposal: Proposal
    arm: Optional[tuple]  # (algorithm, draft length or None: adaptive) that ran it; None: no drafter
    k_next: int  # the draft length the next round starts from (to resume a session exactly)
    stats: RoundStats  # the session's totals so far
    rtt_ns: int  # from submitting the proposal to the verdict


class LocalVerifier:
    """`VerifierLink` to a `Verifier` in this process: each round run alone, or through a `Scheduler`
    (batched with other sessions' rounds); `cost`: the scheduler's `load.CostModel`, for `load()`."""

    def __init__(self, verifier: Verifier, scheduler: Optional[Scheduler] = None, cost=None):
        self.verifier, self.scheduler, self.cost = verifier, scheduler, cost
        self._pending = None

    def submit(self, proposal: Proposal) -> None:
        program = self.verifier.round(proposal)
        if self.scheduler is None:
            self._pending = drive(self.verifier.runner, program)
        else:
            self._pending = self.scheduler.submit(program)

    def result(self) -> Verdict:
        got, self._pending = self._pending, None
        return got if isinstance(got, Verdict) else got.result()

    def load(self) -> Optional[LoadHint]:
        return self.cost.hint() if self.cost is not None else None


def _length(lengths: dict, arm: tuple, resume_k: Optional[int]) -> DraftLength:
    k = lengths.get(arm)
    if k is None:  # (not setdefault: that would build a DraftLength every round)
        k = lengths[arm] = DraftLength(arm[1])
        if resume_k is not None and arm[1] is None:  # a resumed session: where it left off
            k.k = max(k.lo, min(k.hi, resume_k))
    return k


def run_rounds(link, drafters: dict, draft: Callable, committed: int, state=None,
               draft_tokens: Optional[int] = None, resume_k: Optional[int] = None,
               stop=None, until: Optional[Callable] = None) -> Iterator[Round]:
    """Run one session's rounds to the end; yields each `Round` (see the module docstring).

    drafters: algorithm -> this session's started `Drafter` (empty: the target alone; several: `auto`,
    whose `state` picks each round's arm; an arm whose algorithm has no drafter, "none", is the target's
    own step). committed: the committed length (prompt included) the session starts at. stop: an Event;
    set, the loop ends after the round in flight. until(verdict): True ends the session after that round,
    before another is submitted (a stop string, crossdraft/stops.py)."""
    if not drafters and state is None and getattr(link, "depth", 1) > 1:
        yield from _target_steps(link, committed, stop, until)
        return
    lengths: dict = {}  # arm -> its DraftLength in this session
    stats = RoundStats()
    arm = (next(iter(drafters)), draft_tokens) if drafters else None
    last = None  # the drafter of the previous round: a round after a switch is not measured
    pending, finished = None, False
    while not finished:
        r0 = time.perf_counter()
        if state is not None:
            arm = state.next_arm()
        drafter = drafters.get(arm[0]) if arm is not None else None
        k = _length(lengths, arm, resume_k) if drafter is not None else None
        budget = 0
        if k is not None:
            capped = drafter.exact_match and draft_tokens is None  # a length the caller fixed is kept
            budget = stats.load_cap(link.load(), k.k) if capped else k.k
        proposal = draft(drafter, budget) if budget > 0 else Proposal(seq=committed, kind=TOKENS)
        sent = time.perf_counter_ns()
        link.submit(proposal)
        if pending is not None:
            yield pending
            pending = None
        verdict = link.result()
        rtt = time.perf_counter_ns() - sent
        if verdict.seq != committed:
            raise Aborted(f"the verifier is at committed length {verdict.seq}, this drafter at {committed}")
        stats.add(proposal, verdict)
        committed += len(verdict.ids)
        finished = verdict.finished or (until is not None and until(verdict))
        ran = drafter if budget > 0 else None
        if not finished:
            for d in drafters.values():  # the drafter that ran follows now, the others when they next draft
                if d is ran:
                    d.observe(verdict)
                else:
                    d.defer(verdict)
            if ran is not None:
                k.update(verdict.candidates, verdict.accepted)
        if state is not None:
            state.record(arm, len(verdict.ids), time.perf_counter() - r0, measured=ran is last)
            last = ran
            if len(drafters) > 1 and state.stage == "decided":  # the other algorithms are done with
                drafters = {a: d for a, d in drafters.items() if a == state.algorithm}
        out = Round(verdict, proposal, arm, k.k if k is not None else 0, stats, rtt)
        if finished or (stop is not None and stop.is_set()):
            yield out
            return
        pending = out


def _target_steps(link, committed: int, stop=None, until: Optional[Callable] = None) -> Iterator[Round]:
    """The target alone with `link.depth` proposals in flight (see the module docstring)."""
    stats, ahead, last = RoundStats(), committed, time.perf_counter_ns()
    pending = None
    while True:
        while ahead < committed + link.depth:
            link.submit(Proposal(seq=ahead, kind=TOKENS))
            ahead += 1
        if pending is not None:
            yield pending
            pending = None
        verdict = link.result()
        now = time.perf_counter_ns()
        if verdict.seq != committed or not (len(verdict.ids) == 1 or verdict.finished):
            raise Aborted(f"the verifier answered a target step at {verdict.seq} with {len(verdict.ids)} tokens, "
                          f"this drafter expected one at {committed}")
        proposal = Proposal(seq=committed, kind=TOKENS)
        stats.add(proposal, verdict)
        committed += len(verdict.ids)
        out = Round(verdict, proposal, None, 0, stats, now - last)  # (rtt: the time since the previous verdict)
        last = now
        if verdict.finished or (until is not None and until(verdict)) or (stop is not None and stop.is_set()):
            yield out
            return
        pending = out
