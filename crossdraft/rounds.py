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
Drafting ahead: over a link that allows it (`link.overlaps`: the verifier is another process, and the
drafter's core is free while it verifies), the loop runs `Drafter.draft_ahead` beside each greedy drafting
round (`run_beside`, the drafter's scheduler): the next round's draft, on the guess that this one is
accepted whole and followed by the drafter's own next token. Where the guess holds, the next round's
proposal is ready when the verdict comes, and its drafting costs the session no time. The verdict waits
for that program to stop (at its next step), so the drafter is never used by two at once. A draft ahead
of target ids (same, tli: the committed length it guesses is known) that is whole before the verdict is
sent at once, marked with the last id it guessed (`Proposal.after`), by a session of one algorithm (`auto`
picks each round's arm after the verdict): if the guess holds, the verifier finds it waiting when the
pass ends and it is a round like any other; if not, the verifier answers it with an empty verdict, which
the loop skips (`stale`).
Rounds of the target's own step (the target alone, `auto`'s arm `none`, or a round whose draft length
the load cap cut to 0) go further over a link that allows it (`link.depth` > 1, the drafter service's
Verify stream): each commits exactly one token, so the next rounds' positions are known before the
verdicts, and up to `depth` of them are kept in flight: the verifier finds the session's next round
waiting when a pass ends, instead of one round trip later. A round that drafts waits for every verdict
in flight (it drafts on the committed text).

Never: touches models, the wire or the store; decides nothing about acceptance (the verifier does).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

from .errors import Aborted
from .load import SHARED, LoadHint, acceptance, draft_cap
from .protocol import TOKENS, Proposal, Verdict
from .scheduler import Scheduler, drive
from .verifier import Verifier

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """A generation's round counters, kept the same way in process and by the drafter service."""

    rounds: int = 0
    draft_tokens: int = 0  # candidate target tokens verified
    accepted_tokens: int = 0
    drafted: int = 0  # drafter tokens drafted
    short_rounds: int = 0  # rounds with candidates that did not accept them all
    draft_ns: int = 0
    catchup_ns: int = 0  # of draft_ns: bringing the drafter's cache to the committed text first
    verify_ns: int = 0
    bridge_ns: int = 0
    early: int = 0  # drafted tokens that were drafted ahead (`Drafter.draft_ahead`)
    alternatives: int = 0  # rounds whose last committed candidate was an alternative (crossdraft/verifier.py)
    sent_ahead: int = 0  # rounds sent before the verdict before them, on a guess that held
    stale_ahead: int = 0  # rounds sent so, on a guess that failed (answered empty, not counted as rounds)
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
            self.catchup_ns += proposal.catchup_ns
            self.drafted += proposal.drafted
            self.early += proposal.early
            self.psi_ns += getattr(proposal, "psi_ns", 0)
            self.psi_forward_ns += getattr(proposal, "psi_forward_ns", 0)
            self.slrs_fallbacks += getattr(proposal, "slrs_fallbacks", 0)
            self.slrs_rows += getattr(proposal, "psi_rows", 0)
        self.rounds += 1
        self.draft_tokens += verdict.candidates
        self.accepted_tokens += verdict.accepted
        self.short_rounds += int(verdict.accepted < verdict.candidates)
        self.alternatives += int(verdict.alternative)
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

    def load_cap(self, hint: Optional[LoadHint], k: int, pipelined: bool = False, drafter=None) -> int:
        """This session's draft length under the verifier's load (`load.draft_cap`). The drafter's time per
        drafted token is this session's (its catch-ups apart), else what its model's other sessions measured;
        its catch-up, the tokens `drafter.pending()` at what a context token cost them (until measured, what
        a token costs the target: a drafter is smaller)."""
        if hint is None:
            return k
        alpha = acceptance(self.accepted_tokens, self.draft_tokens, self.short_rounds)
        ratio = self.draft_tokens / self.drafted if self.drafted else 1.0
        costs = getattr(drafter, "costs", None)
        if self.drafted:
            draft_s = (self.draft_ns - self.catchup_ns) / self.drafted / 1e9
        else:
            draft_s = costs.step_s if costs is not None and costs.step_s is not None else 0.0
        catchup_s = 0.0
        if costs is not None and hint.sequences >= SHARED:  # (below, the cap is off)
            per = costs.catchup_s if costs.catchup_s is not None else hint.token_s
            catchup_s = drafter.pending() * per
        return draft_cap(hint, alpha, ratio, k, draft_s, pipelined, catchup_s)


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
        self.k = self.after_all() if accepted == candidates else max(self.lo, self.k - 1)

    def after_all(self) -> int:
        """The length after a round that accepts every candidate."""
        return self.fixed if self.fixed is not None else min(self.hi, self.k + 2)


@dataclass
class Round:
    """One round's outcome, as `run_rounds` yields it."""
    verdict: Verdict
    proposal: Proposal
    arm: Optional[tuple]  # (algorithm, draft length or None: adaptive) that ran it; None: no drafter
    k_next: int  # the draft length the next round starts from (to resume a session exactly)
    stats: RoundStats  # the session's totals so far
    rtt_ns: int  # from submitting the proposal to the verdict
    handed_back: bool = False  # the last round before the loop handed the session back (see the docstring)
    come_back_below: float = 0.0  # with handed_back: sequences per pass below which drafting would pay again


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


@dataclass
class _Flight:
    """A round submitted and not yet answered."""
    proposal: Proposal
    arm: Optional[tuple]
    drafter: object  # the drafter that drafted it; None: the target's own step
    k: Optional[DraftLength]
    planned_ns: int  # when the round was planned
    sent_ns: int  # when it was submitted
    early: Optional[tuple] = None  # (stop Event, Future): the next draft, drafted ahead meanwhile
    answered: bool = False  # its verdict is in: no proposal is sent ahead of it any more
    guess: bool = False  # drafted ahead and sent before the verdict before it (see the module docstring)


def run_rounds(link, drafters: dict, draft: Callable, committed: int, state=None,
               draft_tokens: Optional[int] = None, resume_k: Optional[int] = None,
               stop=None, until: Optional[Callable] = None, hand_back: Optional[int] = None,
               run_beside: Optional[Callable] = None) -> Iterator[Round]:
    """Run one session's rounds to the end; yields each `Round` (see the module docstring).

    drafters: algorithm -> this session's started `Drafter` (empty: the target alone; several: `auto`,
    whose `state` picks each round's arm; an arm whose algorithm has no drafter, "none", is the target's
    own step). committed: the committed length (prompt included) the session starts at. stop: an Event;
    set, the loop ends after the round in flight. until(verdict): True ends the session after that round,
    before another is submitted (a stop string, crossdraft/stops.py). hand_back: see the module docstring
    (None: never). run_beside(program) -> Future: runs a drafter's program while the session waits for a
    verdict (drafting ahead, see the module docstring; None: never)."""
    loop = _Loop(link, drafters, draft, committed, state, draft_tokens, resume_k, hand_back, run_beside)
    try:
        yield from loop.rounds(until, stop)
    finally:  # (a caller that stops reading too: no draft made ahead outlives the loop, none is sent after it)
        with loop.lock:
            left = list(loop.flights)
            for f in left:
                f.answered = True
        for f in left:
            loop._settle(f)


class _Loop:
    """One session's rounds in flight and its counters (`run_rounds` drives it)."""

    def __init__(self, link, drafters, draft, committed, state, draft_tokens, resume_k, hand_back=None,
                 run_beside=None):
        self.link, self.drafters, self.draft, self.state = link, drafters, draft, state
        self.draft_tokens, self.resume_k = draft_tokens, resume_k
        self.depth = max(1, getattr(link, "depth", 1))
        self.committed = self.ahead = committed  # ahead: where the next target step would start
        self.lengths: dict = {}  # arm -> its DraftLength in this session
        self.stats = RoundStats()
        self.fixed_arm = (next(iter(drafters)), draft_tokens) if drafters else None
        self.planned = None  # the next round's arm, chosen and not yet submitted
        self.flights: deque = deque()
        self.last = None  # the drafter of the previous round: a round after a switch is not measured
        self.answered_ns = time.perf_counter_ns()
        self.hand_back: Optional[int] = hand_back  # see run_rounds
        self.capped = 0  # rounds in a row whose drafting the load cap cut to nothing
        self.leaving = False  # handing back: no more rounds are submitted
        self.come_back = SHARED  # handing back: sequences per pass below which drafting would pay again
        self.run_beside = run_beside if getattr(link, "overlaps", False) else None
        self.send_ahead = self.run_beside is not None and state is None  # (auto picks each round's arm after the verdict)
        self.stale = 0  # proposals sent ahead on a guess that failed, whose (empty) verdicts are still to come
        self.lock = threading.Lock()  # a proposal sent ahead (the drafter's scheduler thread) against its verdict

    def rounds(self, until, stop) -> Iterator[Round]:
        """The rounds (`run_rounds`)."""
        pending = None
        while True:
            self.fill()
            if self.leaving and not self.flights:  # handed back: the last round answered is the last
                if pending is not None:
                    pending.handed_back, pending.come_back_below = True, self.come_back
                    yield pending
                return
            if pending is not None:
                yield pending
                pending = None
            out, finished = self.answer(until)
            if finished or (stop is not None and stop.is_set()):
                yield out
                return  # (rounds still in flight are target steps past the end: dropped with the link)
            pending = out

    def fill(self) -> None:
        """Submit the next round, and more target steps behind it while the link allows (`depth`) and
        nothing in flight drafted: a target step commits exactly one token, so the next one's position
        is known before its verdict; a draft needs every verdict before it."""
        while len(self.flights) < self.depth and not self.leaving:
            if self.flights and self.flights[-1].drafter is not None:
                return
            planned_ns = time.perf_counter_ns()
            if self.planned is None:
                self.planned = self.state.next_arm() if self.state is not None else self.fixed_arm
            arm = self.planned
            drafter = self.drafters.get(arm[0]) if arm is not None else None
            k = _length(self.lengths, arm, self.resume_k) if drafter is not None else None
            budget = self._budget(drafter, k)
            if drafter is not None:
                self.capped = 0 if budget > 0 else self.capped + 1
            if budget > 0 and self.flights:
                return  # drafting waits for the verdicts in flight
            proposal = self.draft(drafter, budget) if budget > 0 else Proposal(seq=self.ahead, kind=TOKENS)
            if proposal.alternatives and self._shared():
                proposal.alternatives = []  # rows the verifier's pass would carry for every session in it
            self.planned = None
            flight = _Flight(proposal, arm, drafter if budget > 0 else None, k, planned_ns, time.perf_counter_ns())
            self.flights.append(flight)
            self.link.submit(proposal)
            if flight.drafter is not None:
                self._draft_ahead(flight)
            self.ahead += 1
            if self.hand_back and self.capped >= self.hand_back:
                self.leaving, self.come_back = True, self._come_back(drafter, k)

    def _shared(self) -> bool:
        """Whether the verifier's passes are shared (its load hint): alternatives then cost the others."""
        hint = self.link.load()
        return hint is not None and hint.sequences >= SHARED

    def _budget(self, drafter, k: Optional[DraftLength], length: Optional[int] = None) -> int:
        """The draft length of a round: `length` (default: the arm's `k`), capped by the verifier's load."""
        if k is None:
            return 0
        length = k.k if length is None else length
        capped = drafter.exact_match and self.draft_tokens is None  # a length the caller fixed is kept
        return self.stats.load_cap(self.link.load(), length, self.depth > 1, drafter) if capped else length

    def _come_back(self, drafter, k: DraftLength) -> float:
        """Handing back: the sequences per pass below which this session's drafting would pay again at the
        verifier's pass costs now (the load cap over smaller batches, in steps of half a sequence)."""
        hint = self.link.load()
        b = hint.sequences - 0.5 if hint is not None else 0.0
        while b >= SHARED:
            if self.stats.load_cap(replace(hint, sequences=b), k.k, self.depth > 1, drafter) > 0:
                return b + 0.25
            b -= 0.5
        return SHARED

    def _draft_ahead(self, f: _Flight) -> None:
        """Run the next round's draft beside this one's verification (see the module docstring)."""
        if self.run_beside is None or not f.drafter.can_draft_ahead():
            return
        k = self._budget(f.drafter, f.k, f.k.after_all())  # the next round's length if the guess holds
        if k <= 0:
            return
        stop = threading.Event()
        f.early = (stop, self.run_beside(f.drafter.draft_ahead(k, stop.is_set)))
        if self.send_ahead:
            f.early[1].add_done_callback(lambda _, f=f: self._send_early(f))

    def _send_early(self, f: _Flight) -> None:
        """(The drafter's scheduler thread, as the draft made ahead ends.) Send it before the verdict on `f`
        comes, where it can be sent (`Drafter.early_proposal`): if the guess holds, the verifier finds it
        waiting when that round's pass ends."""
        with self.lock:
            if f.answered or self.leaving or f.proposal.alternatives:
                return  # (after a round with alternatives, a verdict of its length need not be the guessed text)
            proposal = f.drafter.early_proposal()
            if proposal is None:
                return
            now = time.perf_counter_ns()
            self.flights.append(_Flight(proposal, f.arm, f.drafter, f.k, now, now, guess=True))
            self.link.submit(proposal)

    @staticmethod
    def _settle(f: _Flight) -> None:
        """Stop the draft made ahead beside this round, and wait for it: the drafter is the session's again."""
        if f.early is None:
            return
        stop, fut = f.early
        stop.set()
        try:
            fut.result()
        except Exception:  # noqa: BLE001 - a guess that failed costs only itself: the next draft starts afresh
            log.debug("a draft made ahead failed", exc_info=True)

    def answer(self, until: Optional[Callable] = None) -> tuple:
        """(Round, finished): the verdict on the oldest round in flight, counted and followed."""
        self._skip_stale()
        f = self.flights.popleft()
        try:
            verdict = self.link.result()
        finally:
            with self.lock:
                f.answered = True
            self._settle(f)
        now = time.perf_counter_ns()
        if verdict.seq != self.committed:
            raise Aborted(f"the verifier is at committed length {verdict.seq}, this drafter at {self.committed}")
        if f.drafter is None and not (len(verdict.ids) == 1 or verdict.finished):
            raise Aborted(f"the verifier answered a target step at {verdict.seq} with {len(verdict.ids)} tokens")
        self.stats.add(f.proposal, verdict)
        self.committed += len(verdict.ids)
        if f.drafter is not None:
            self.ahead = self.committed
        # A round submitted behind another is timed from that one's verdict: its rtt from then (its own
        # wait for the link), its time for `auto` too (when it was planned, the one before was in flight).
        prev, self.answered_ns = self.answered_ns, now
        rtt = now - max(f.sent_ns, prev)
        if self.state is not None:
            seconds = (now - max(f.planned_ns, prev)) / 1e9
            self.state.record(f.arm, len(verdict.ids), seconds, measured=f.drafter is self.last)
            self.last = f.drafter
        finished = verdict.finished or (until is not None and until(verdict))
        if not finished:
            self._follow(verdict, f)
            self._sent_ahead(verdict)
        return Round(verdict, f.proposal, f.arm, f.k.k if f.k is not None else 0, self.stats, rtt), finished

    def _skip_stale(self) -> None:
        """Read the empty verdicts on proposals sent ahead on a guess that failed (they come first)."""
        while self.stale:
            v = self.link.result()
            self.stale -= 1
            if v.ids or v.seq != self.committed:
                raise Aborted(f"the verifier answered a stale proposal at {v.seq} with {len(v.ids)} tokens")

    def _sent_ahead(self, verdict: Verdict) -> None:
        """After a verdict: a proposal sent ahead of it is a round like another if it guessed right (the
        verifier checks it as such, and the next one is drafted ahead beside it), else stale (its verifier
        answers it with an empty verdict, skipped)."""
        if not self.flights or not self.flights[0].guess:
            return
        g = self.flights[0]
        if verdict.ids and self.committed == g.proposal.seq and verdict.ids[-1] == g.proposal.after:
            g.drafter.adopt_early()
            self._draft_ahead(g)
            self.stats.sent_ahead += 1
        else:
            self.flights.popleft()
            self.stale += 1
            self.stats.stale_ahead += 1

    def _follow(self, verdict: Verdict, f: _Flight) -> None:
        """The drafters follow the committed text: the one that drafted the round now, the others when
        they next draft; the round's draft length adapts; `auto` narrows to its choice once decided."""
        for d in self.drafters.values():
            if d is f.drafter:
                d.observe(verdict)
            else:
                d.defer(verdict)
        if f.drafter is not None:
            f.k.update(verdict.candidates, verdict.accepted - int(verdict.alternative))  # (its chain missed there)
        if self.state is not None and len(self.drafters) > 1 and self.state.stage == "decided":
            self.drafters = {a: d for a, d in self.drafters.items() if a == self.state.algorithm}
