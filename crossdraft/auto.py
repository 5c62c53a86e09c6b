"""`auto`: find the fastest algorithm and draft length for a target/drafter pair by measuring it.

Owns: the arms auto chooses among, what each has measured, and which arm a round uses. An arm is an
algorithm and a draft length (None: the adaptive length of `rounds.DraftLength`). What counts is
what the user gets: committed target tokens per second of round wall time (drafting, verification
and bookkeeping, on this machine, with this pair and this kind of decoding).

How it chooses (one `AutoState` per pair and decoding mode, kept for the life of the process and
shared by its sessions, so only the first sessions pay for the search). Each stage has an incumbent,
the arm a fixed rule would pick, and challengers:
1. "algorithm": the incumbent is the first applicable algorithm (`engine.auto_algorithms` lists the
   static rule's pick first), the challengers the others, all with the adaptive length.
2. "length": for stage 1's winner, the adaptive length is the incumbent, the lengths of `LENGTHS`
   the challengers (the adaptive arm keeps its stage-1 rounds).
3. "decided": every round uses the winner; it keeps measuring it.
Turns come in cycles: the incumbent's, a challenger's (the one with the fewest turns; the target's own
step first, until it has the turns that can settle it: `_next_challenger`), the incumbent's
again, `BLOCK` measured rounds each, then `REST` rounds that are no turn, so that the search takes
about a seventh of the rounds and its turns spread over more text. A rest runs the incumbent, or the
challenger furthest ahead of it so far (by more than `MIN_GAIN` and one standard error): the rest's arm
changes what the search costs, not what it decides. The first round after a switch of drafter is not
measured: that drafter first catches up on what was committed meanwhile (drafters of
one model share one KV cache, so that is the new text only; first in a session, the prompt).
A challenger is judged on paired differences: each of its turns against the incumbent's turns right
before and after it, which saw the same stretch of text. That matters: how much a round accepts
depends on the text far more than on the arm (a repetitive stretch accepts whole drafts, a new
identifier nothing), so unpaired averages over a few dozen rounds cannot tell arms 10% apart, and
paired ones can. A challenger far behind is dropped without a test (`FAR`: 40% slower after one turn,
30% after 2, 15% after 3; at temperature 1 slrs is 25-40% slower than tli on the zoo, and 60% slower than
the target's own step with bfloat16 panels, and each of its turns costs a drafter's catch-up),
and one far ahead takes over without one (`AHEAD`: 20% faster over 3 turns and ahead on each, more than
the text alone moves two arms apart: the target's own step against a drafter that cannot pay on this
machine, 0.63x-0.93x on the zoo's CPU with bfloat16 panels); after
`MIN_TURNS` (4) a mean difference more than t95 standard errors below zero drops it; after
`PROMOTE_TURNS` (6) one more than t95 standard errors above zero, and at least `MIN_GAIN` (3%) of the
rate, makes it the incumbent (the old one becomes a challenger), but only on turns from
`PROMOTE_SESSIONS` (3) sessions or spread over `PROMOTE_SPAN` (1024) committed tokens: which arm is
faster also depends on the text (on the zoo's drafter-bpe2k, tli beats slem by up to 13% on some
prompts and loses by up to 16% on others), and a decision taken inside the first prompt kept the
wrong arm for the rest of the process. At `ALGO_TURNS`/`LENGTH_TURNS` a challenger stops, and when the
stage ends the best of those that meet the same test replaces the incumbent, or, if none does, the best
of those ahead by `MIN_GAIN` and one standard error on spread text (`_likely`: the stage is over, and
keeping the incumbent is then the less likely choice). A clearly worse arm costs two or three turns; one
too close to tell leaves the rule's pick in place, where a wrong guess costs little.
(Taking over needs more turns and more text than being dropped: a wrong take-over costs for the rest
of the process, a wrong drop only the difference between two arms that looked alike.)
A caller that fixes the draft length skips stage 2; a pair with one applicable algorithm skips stage 1.

Each round is lossless whichever arm runs it (the verifier decides every round with the target's
exact rule, and a round's randomness is keyed by position, not by algorithm), so switching arms
between rounds changes speed only: greedy output is the target's, sampled output has the target's
distribution (tests/test_auto.py checks both with forced switching on every round). What auto
chose depends on timings, so a seeded sampled run is reproducible only with an explicit algorithm
and draft length (the stats say which auto used).

Never: runs models, knows how a round is made, imports grpc or redis.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

LENGTHS = (None, 3, 6)  # None: adaptive (+2 after a full accept, -1 otherwise), the incumbent
ALGO_TURNS = 8  # at most, turns per challenger in stage 1
LENGTH_TURNS = 5  # at most, turns per challenger in stage 2
MIN_TURNS = 4  # turns before a challenger can be dropped by the t test
PROMOTE_TURNS = 6  # turns before a challenger can take over
FAR = ((1, 0.40), (2, 0.30), (3, 0.15))  # (turns, behind): after so many turns, a challenger this much slower is dropped
AHEAD = (3, 0.20)  # (turns, ahead): a challenger this much faster on average, and ahead on each turn, takes over
LEAD_TURNS = 2  # paired turns before a challenger ahead may run the rests (`AutoState._leader`)
MIN_GAIN = 0.03  # a challenger replaces the incumbent only when at least this much faster
BLOCK = 4  # measured rounds in a turn
REST = 16  # rounds of rest (no turn) after each challenger turn and its two incumbent turns
PROMOTE_SESSIONS = 3  # a challenger takes over only on turns from this many sessions (different texts) ...
PROMOTE_SPAN = 1024  # ... or spread over this many committed tokens (one long session)
# Student's t, two-sided 95%, by degrees of freedom: the few paired turns settle a challenger early
# only when the difference is this many standard errors away from zero
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        15: 2.13, 20: 2.09, 30: 2.04}


def t95(df: int) -> float:
    return _T95.get(df) or next((v for d, v in sorted(_T95.items(), reverse=True) if d <= df), 2.0)


def arm_name(algorithm: str, k: Optional[int]) -> str:
    return f"{algorithm} k={'adaptive' if k is None else k}"


@dataclass
class ArmStats:
    rounds: int = 0  # measured rounds
    tokens: int = 0  # committed target tokens
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.rounds += 1
        self.tokens += tokens
        self.seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class AutoState:
    """What auto measured for one target/drafter pair and decoding mode. Thread-safe (the services'
    sessions share one)."""

    def __init__(self, algorithms: list, lengths: tuple = LENGTHS, algo_turns: int = ALGO_TURNS,
                 length_turns: int = LENGTH_TURNS, block: int = BLOCK, min_turns: int = MIN_TURNS,
                 promote_turns: int = PROMOTE_TURNS, rest: int = REST, promote_span: int = PROMOTE_SPAN,
                 promote_sessions: int = PROMOTE_SESSIONS):
        """`algorithms`: the applicable ones, the rule's pick first. `lengths`: draft lengths to try
        (None: adaptive, the incumbent if present; one length: fixed by the caller). `rest`,
        `promote_span`: see the module's note (0 and 0: back-to-back turns, as the unit tests use)."""
        if not algorithms or not lengths:
            raise ValueError("auto needs at least one algorithm and one draft length")
        self.algorithms, self.lengths = list(algorithms), tuple(lengths)
        self.algo_turns, self.length_turns, self.block = algo_turns, length_turns, block
        self.min_turns, self.promote_turns = min_turns, promote_turns
        self.rest, self.promote_span, self.promote_sessions = rest, promote_span, promote_sessions
        self.text = 0  # committed tokens of every round recorded, the search's clock of text
        self.session = 0  # sessions begun (`begin_session`), the other clock of text
        # this stage's finished turns, in order: (arm, tokens, seconds, text at its end, session)
        self.turns: list = []
        self._cur = [0, 0.0]  # the running turn's tokens and seconds
        self.stats: dict = {}  # (algorithm, k) -> ArmStats
        self.lock = threading.Lock()
        self.dropped: list = []  # challengers found clearly slower, in order
        self.capped: list = []  # challengers that ran their rounds without being settled
        self.turn: Optional[tuple] = None  # the arm whose turn it is (None: resting, `resting` runs)
        self.resting: Optional[tuple] = None  # the arm the rest runs (`_leader`)
        self.turn_left = 0  # its measured rounds left in this turn (resting: rounds left of the rest)
        self.phase = -1  # in the cycle: 0 incumbent, 1 challenger, 2 incumbent, 3 rest
        self.unmeasured = 0  # rounds right after a switch
        self.algorithm: Optional[str] = None  # stage 1's winner
        self.choice: Optional[tuple] = None  # the arm kept once decided
        self._enter("algorithm")

    # --- choosing -----------------------------------------------------------------------------
    def _enter(self, stage: str) -> None:
        self.stage = stage
        if stage == "algorithm":
            k = None if None in self.lengths else self.lengths[0]
            self.incumbent = (self.algorithms[0], k)
            self.challengers = [(a, k) for a in self.algorithms[1:]]
        elif stage == "length":
            k0 = None if None in self.lengths else self.lengths[0]
            self.incumbent = (self.algorithm, k0)
            # (the target's own step drafts nothing: no length to search)
            self.challengers = [] if self.algorithm == "none" else [(self.algorithm, k) for k in self.lengths if k != k0]
        else:
            self.choice, self.challengers = self.incumbent, []
        self.capped = []
        self.turn, self.turn_left, self.phase = None, 0, -1
        self.turns, self._cur = [], [0, 0.0]
        if stage != "decided" and not self.challengers:
            self._finish_stage()

    def _quota(self) -> int:
        return self.algo_turns if self.stage == "algorithm" else self.length_turns

    def _paired(self, arm) -> list:
        """[(tokens/s of a turn of `arm`, the incumbent's over its turns right before and after)]."""
        out = []
        inc = [j for j, t in enumerate(self.turns) if t[0] == self.incumbent]
        for j, (a, tok, sec, _, _) in enumerate(self.turns):
            if a != arm or sec <= 0:
                continue
            near = [i for i in ([max((i for i in inc if i < j), default=None),
                                 min((i for i in inc if i > j), default=None)]) if i is not None]
            it, isec = sum(self.turns[i][1] for i in near), sum(self.turns[i][2] for i in near)
            if isec > 0:
                out.append((tok / sec, it / isec))
        return out

    def _diff(self, arm) -> tuple:
        """(mean paired difference in tokens/s, its standard error, pairs, the difference relative to
        the incumbent's mean)."""
        pairs = self._paired(arm)
        n = len(pairs)
        if not n:
            return 0.0, float("inf"), 0, 0.0
        d = [a - b for a, b in pairs]
        m = sum(d) / n
        base = sum(b for _, b in pairs) / n
        rel = m / base if base > 0 else 0.0
        if n < 2:
            return m, float("inf"), n, rel
        var = sum((x - m) ** 2 for x in d) / (n - 1)
        return m, (var / n) ** 0.5, n, rel

    def _turns_of(self, arm) -> int:
        return sum(1 for t in self.turns if t[0] == arm)

    def _spread(self, arm) -> bool:
        """Whether `arm`'s turns come from enough different text to take over: `promote_sessions`
        sessions, or `promote_span` committed tokens between its first and last turn."""
        mine = [t for t in self.turns if t[0] == arm]
        if not mine:
            return self.promote_span <= 0
        return (len({t[4] for t in mine}) >= self.promote_sessions
                or mine[-1][3] - mine[0][3] >= self.promote_span)

    def _convincing(self, c) -> bool:
        """Faster than the incumbent by more than t95 standard errors and `MIN_GAIN`, on spread text."""
        m, se, n, rel = self._diff(c)
        return n >= self.min_turns and m > t95(n - 1) * se and rel > MIN_GAIN and self._spread(c)

    def _likely(self, c) -> bool:
        """At the end of a stage, for a challenger that ran its turns without convincing: ahead by more
        than `MIN_GAIN` and one standard error, after `min_turns`, on spread text. The stage is over, so
        keeping the incumbent is a choice too, and not the likelier one; the simulation that led to this
        (docs/benchmarks.md, "auto's search at temperature 1") kept the target's own step 14% ahead of tli
        in more runs with it, and lost nothing where tli was ahead."""
        m, se, n, rel = self._diff(c)
        return n >= self.min_turns and rel > MIN_GAIN and m > se and self._spread(c)

    def _far_ahead(self, c) -> bool:
        """`AHEAD`: faster by far on every paired turn, beyond what the text alone moves (on the zoo,
        up to 16% between two arms), so that take-over needs no spread of sessions."""
        pairs = self._paired(c)
        turns, ahead = AHEAD
        if len(pairs) < turns or not all(a > b for a, b in pairs):
            return False
        return self._diff(c)[3] >= ahead

    def _leader(self) -> tuple:
        """The arm a rest runs: the challenger furthest ahead of the incumbent on its paired turns so
        far, by more than `MIN_GAIN` and by more than one standard error (so at least `LEAD_TURNS`
        turns), else the incumbent. Rest rounds are no turn (they spread the turns over more text), so
        which arm runs them changes the search's cost, not its decisions: while a challenger far ahead
        waits for the turns that let it take over, most rounds already run it. (Without the standard
        error, a challenger ahead by chance ran the rests: at temperature 1 a turn of 4 rounds commits
        about 5 tokens, and on drafter-spm4k `tli k=3`, 6.6% ahead on 3 turns with an error of 16%,
        ran 108 rounds at 0.78x the incumbent's rate.)"""
        ahead = [(rel, c) for c in self.challengers for m, se, n, rel in [self._diff(c)]
                 if n >= LEAD_TURNS and rel > MIN_GAIN and m > se]
        return max(ahead, key=lambda a: a[0])[1] if ahead else self.incumbent

    def _next_challenger(self) -> tuple:
        """The challenger whose turn is next: the first of those with the fewest turns, but the target's
        own step (`none`) first until it has the `AHEAD` turns that can settle it. It needs no drafter
        (no catch-up), and it is the arm that says whether drafting pays on this machine at all: where
        a verification costs several steps (the zoo's CPU with bfloat16 panels), `none` leads every
        drafter, and the rounds before it takes over were most of what the search cost (by
        `scripts/auto_sim.py`, 300 seeds: 0.892 -> 0.929 of the best fixed arm on such arms, no
        change where a drafter pays)."""
        first = [c for c in self.challengers if c[0] == "none" and self._turns_of(c) < AHEAD[0]]
        return first[0] if first else min(self.challengers, key=self._turns_of)

    def _judge(self) -> None:
        changed = True
        while changed and self.challengers:
            changed = False
            for c in list(self.challengers):
                m, se, n, rel = self._diff(c)
                if any(n >= turns and rel < -behind for turns, behind in FAR):  # far behind on the same text
                    self.challengers.remove(c)
                    self.dropped.append(c)
                    continue
                if n < self.min_turns and not self._far_ahead(c):
                    continue
                z = t95(n - 1)
                if m < -z * se:
                    self.challengers.remove(c)
                    self.dropped.append(c)
                elif (self._convincing(c) and n >= self.promote_turns) or self._far_ahead(c):
                    # clearly faster, on enough text: the new incumbent
                    self.challengers.remove(c)
                    self.challengers.append(self.incumbent)
                    self.incumbent = c
                    changed = True
                    break  # the others are judged against the new incumbent
                elif self._turns_of(c) >= self._quota():
                    self.challengers.remove(c)
                    self.capped.append(c)
        if not self.challengers:
            self._finish_stage()

    def _finish_stage(self) -> None:
        better = [c for c in self.capped if self._convincing(c)]
        if not better:  # none convincing: the best guess, if it is one (see `_likely`)
            better = [c for c in self.capped if self._likely(c)]
        if better:
            self.incumbent = max(better, key=lambda c: self._diff(c)[0])
        if self.stage == "algorithm":
            self.algorithm = self.incumbent[0]
            self._enter("length")
        else:
            self._enter("decided")

    def next_arm(self) -> tuple:
        """(algorithm, draft length or None) for the next round."""
        with self.lock:
            if self.stage == "decided":
                return self.choice
            arms = [self.incumbent] + self.challengers
            if self.turn_left > 0 and (self.turn in arms or self.turn is None):
                return self.turn or self.resting or self.incumbent
            if self.turn is not None and self.turn not in arms:
                self.phase = -1  # the arms changed under the running cycle: start a fresh one
            self.phase = (self.phase + 1) % 4
            if self.phase == 3 and self.rest <= 0:
                self.phase = 1  # no rest: incumbent and challengers alternate, each incumbent turn
                # serving as the turn after one challenger's and before the next one's
            if self.phase == 1:
                self.turn = self._next_challenger()
            elif self.phase == 3:
                self.turn = None
            else:
                self.turn = self.incumbent
            self.turn_left = self.rest if self.phase == 3 else self.block
            self.resting = self._leader() if self.phase == 3 else None
            return self.turn or self.resting or self.incumbent

    def begin_session(self) -> None:
        """A session (a new text) starts using this state."""
        with self.lock:
            self.session += 1

    def record(self, arm: tuple, tokens: int, seconds: float, measured: bool = True) -> None:
        """One round of `arm`: `tokens` committed in `seconds` of wall time. `measured` False: the
        round paid for a switch (see the module's note) and does not count. Rounds may be picked ahead
        of the records of those before them (`rounds.run_rounds` keeps target steps in flight): a turn
        counts its first `block` rounds, the others count for their arm's figures only."""
        with self.lock:
            self.text += tokens
            if self.stage != "decided" and self.turn is None and arm == (self.resting or self.incumbent):
                self.turn_left -= 1  # a round of rest
            if not measured:
                self.unmeasured += 1
                return
            self.stats.setdefault(arm, ArmStats()).add(tokens, seconds)
            if self.stage == "decided" or self.turn is None or arm != self.turn or self.turn_left <= 0:
                return  # (turn_left 0: a round picked before the turn ended, answered after: no turn's)
            self._cur[0] += tokens
            self._cur[1] += seconds
            self.turn_left -= 1
            if self.turn_left <= 0:  # the turn is over: it is one sample of its arm
                self.turns.append((arm, self._cur[0], self._cur[1], self.text, self.session))
                self._cur = [0, 0.0]
                self._judge()

    def algorithms_in_play(self) -> list:
        """The algorithms a round may still run, the incumbent's first: a session starts a drafter for
        each (a dropped one costs nothing more)."""
        with self.lock:
            if self.stage != "algorithm":
                return [self.algorithm]
            return list(dict.fromkeys(a for a, _ in [self.incumbent] + self.challengers + self.capped))

    def best(self) -> tuple:
        """The arm auto keeps (or would keep now, mid-search)."""
        with self.lock:
            return self.choice if self.choice is not None else self.incumbent

    # --- reporting ----------------------------------------------------------------------------
    def summary(self) -> dict:
        with self.lock:
            arms = sorted(self.stats.items(), key=lambda kv: -kv[1].tokens_per_second)
            return {
                "stage": self.stage,
                "unmeasured_rounds": self.unmeasured,
                "dropped": [arm_name(*a) for a in self.dropped],
                "incumbent": arm_name(*self.incumbent),
                "paired": {arm_name(*c): {"mean_difference": round(m, 2), "relative": round(rel, 4),
                                          "se": round(se, 2) if se != float("inf") else None, "turns": n}
                           for c in self.challengers + self.capped for m, se, n, rel in [self._diff(c)]},
                "choice": None if self.choice is None else {"algorithm": self.choice[0],
                                                            "draft_tokens": self.choice[1]},
                "arms": [{"algorithm": a, "draft_tokens": k, "rounds": s.rounds, "tokens": s.tokens,
                          "tokens_per_second": round(s.tokens_per_second, 2)} for (a, k), s in arms],
            }

    def explain(self) -> str:
        s = self.summary()
        figures = ", ".join(f"{arm_name(a['algorithm'], a['draft_tokens'])} {a['tokens_per_second']:.1f} tok/s "
                            f"({a['rounds']} rounds)" for a in s["arms"][:6])
        if s["stage"] == "decided":
            c = s["choice"]
            return f"measured in this process: {figures}; keeps {arm_name(c['algorithm'], c['draft_tokens'])}"
        return f"still measuring ({s['stage']} stage, {s['incumbent']} leads): {figures}"


MEMORY_ENTRIES = 64  # AutoStates a process keeps (pairs x decoding modes x fixed lengths), least recently used out


class AutoMemory:
    """The `AutoState`s of a process, one per key (the pair and the decoding mode), at most `max_entries`
    of them: the least recently used is forgotten (a session that holds it keeps using it; the next
    session with that key searches again). Keys come from requests (`mode_key` buckets their sampling
    parameters), so without the bound a client could grow a process's memory with distinct keys."""

    def __init__(self, max_entries: int = MEMORY_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"an AutoMemory keeps at least one state, got {max_entries}")
        self.max_entries = max_entries
        self._states: "OrderedDict" = OrderedDict()  # key -> AutoState, least recently used first
        self._lock = threading.Lock()

    def get(self, key, algorithms: list, lengths: tuple) -> AutoState:
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._install(key, AutoState(algorithms, lengths))
            self._states.move_to_end(key)
            return st

    def put(self, key, state: AutoState) -> None:
        """Install a state (a caller that already knows, or a test that forces a schedule)."""
        with self._lock:
            self._install(key, state)

    def _install(self, key, state: AutoState) -> AutoState:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.max_entries:
            self._states.popitem(last=False)
        return state

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._states

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


def mode_key(params) -> tuple:
    """Decoding modes that auto measures apart: greedy, or sampling in a bucket of temperature (steps of
    0.1), top-k (0: off, else its power of two: 1, 2-3, 4-7, ...) and top-p (steps of 0.05). Nearby
    settings draft alike, so they share what auto measured; the buckets also keep a client from making a
    new key with every request."""
    if params.greedy:
        return ("greedy",)
    top_k = 1 << (params.top_k.bit_length() - 1) if params.top_k > 0 else 0
    return ("sampling", round(params.temperature, 1), top_k, round(params.top_p * 20) / 20)
