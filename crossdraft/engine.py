"""The in-process engine: one target, optionally one drafter, and the draft -> verify -> commit loop.

Owns: choosing the algorithm (`auto`), the draft length (fixed or adaptive), the loop, and the
statistics of a generation. The drafter and the verifier only exchange `Proposal`s and `Verdict`s,
so the services run the same two objects on two machines with the same results.

Never: parses command lines, prints, imports grpc or redis.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .drafter import Drafter
from .errors import FailedPrecondition, InvalidArgument, Unimplemented
from .auto import LENGTHS, AutoMemory, AutoState, arm_name, mode_key
from .drafter import MODES
from .runner import KVPool, Runner, load_model, make_runner
from .sampling import SamplingParams
from .slrs import DEFAULT_BUDGET, DEFAULT_TAU
from .stops import StopCut
from .verifier import Verifier
from .vocab import Vocab

ALGORITHMS = ("auto", "same", "tli", "slem", "slrs", "none")


@dataclass
class GenerationResult:
    text: str  # the generated continuation only
    ids: list  # its target token ids
    new_tokens: int
    seconds: float  # generation wall time: prompt encoding and prefill included, model loading excluded
    algorithm: str  # the one actually used
    rounds: int  # target forward passes after the prompt's prefill
    draft_tokens: int  # candidate target tokens sent for verification
    accepted_tokens: int  # of those, accepted by the target
    drafted: int = 0  # drafter tokens drafted (drafter forward passes)
    finish_reason: str = ""
    why: str = ""  # why `auto` chose the algorithm
    profile: dict = field(default_factory=dict)  # seconds in draft, verify (of which bridge), bookkeeping
    accepted_by_position: list = field(default_factory=list)  # [i]: rounds whose i-th candidate was accepted
    slrs_fallbacks: int = 0  # slrs: candidate positions where the work bound cut the tree (docs/slrs.md)
    slrs_rows: int = 0  # slrs: drafter positions run to compute r (`drafted` counts the passes)
    auto: Optional[dict] = None  # `auto`: what it measured and keeps (auto.AutoState.summary)

    def as_json(self) -> dict:
        out = {
            "text": self.text, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.new_tokens / self.seconds, 3) if self.seconds > 0 else None,
            "algorithm": self.algorithm, "rounds": self.rounds, "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance": round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else None,
            "drafted": self.drafted, "finish_reason": self.finish_reason, "why": self.why,
            "profile": {k: round(v, 6) for k, v in self.profile.items()},
        }
        if self.auto is not None:
            out["auto"] = self.auto
        if self.algorithm == "slrs":
            out["slrs_fallbacks"] = self.slrs_fallbacks
            out["slrs_rows"] = self.slrs_rows
        return out


@dataclass
class RoundStats:
    """A generation's round counters, kept the same way in process and by the drafter service."""

    rounds: int = 0
    draft_tokens: int = 0  # candidate target tokens verified
    accepted_tokens: int = 0
    drafted: int = 0  # drafter tokens drafted
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


def resolve_algorithm(algorithm: str, params: SamplingParams, target_vocab: Vocab,
                      drafter_vocab: Optional[Vocab], check_tli: Optional[Callable[[], object]] = None,
                      slrs: bool = False) -> tuple:
    """(algorithm, why). The static `auto` rule, for callers that do not measure (the services;
    the engine's `auto` measures, see auto.py, and uses `auto_algorithms`): identical tokenizers ->
    same; otherwise greedy -> slem, sampling -> tli (slem if the vocabularies share too little for
    tli). On the zoo (README, "Measured") slem beat tli greedy with every drafter, tli beat slem at
    temperature 1 with every drafter: exact match of a string only pays when the target's choice
    is predictable, rejection sampling accepts on agreement in probability.

    drafter_vocab None: no drafter. check_tli raises FailedPrecondition when tli cannot apply to
    the pair (it builds the intersection); the engine and the drafter service share this rule.
    slrs: whether the caller runs slrs (asked for explicitly; `auto` never picks it). The engine
    does; the services do not yet (they call this without it and so refuse slrs as UNIMPLEMENTED)."""
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "slrs" and not slrs:
        raise Unimplemented("algorithm 'slrs' is not implemented yet in the services (the engine runs it)")
    if algorithm != "auto":
        if algorithm == "same" and drafter_vocab is not None and not drafter_vocab.same_as(target_vocab):
            raise FailedPrecondition("algorithm 'same' needs the drafter to share the target's tokenizer; "
                                     "these tokenizers differ (use tli or slem)")
        return algorithm, "asked for"
    if drafter_vocab is None:
        return "none", "no drafter"
    if drafter_vocab.same_as(target_vocab):
        return "same", "identical tokenizers"
    if params.greedy:
        return "slem", "different tokenizers, greedy: exact match on text"
    try:
        if check_tli is not None:
            check_tli()
    except FailedPrecondition as e:
        return "slem", f"different tokenizers, sampling, tli cannot apply ({e})"
    return "tli", "different tokenizers, sampling: token-level rejection sampling over the intersection"


def auto_algorithms(params: SamplingParams, target_vocab: Vocab, drafter_vocab: Optional[Vocab],
                    check_tli: Optional[Callable[[], object]] = None) -> list:
    """The algorithms the measuring `auto` (auto.py) tries for a pair, the static rule's pick
    (`resolve_algorithm`) first: it is auto's incumbent, kept unless another measures faster.
    None without a drafter; same for identical tokenizers (tli and slem only add work there);
    otherwise slem and tli (when the vocabularies share enough), and under sampling slrs too
    (greedy, slrs is slem)."""
    if drafter_vocab is None:
        return ["none"]
    if drafter_vocab.same_as(target_vocab):
        return ["same"]
    tli = True
    try:
        if check_tli is not None:
            check_tli()
    except FailedPrecondition:
        tli = False
    if params.greedy:
        return ["slem", "tli"] if tli else ["slem"]
    return ["tli", "slem", "slrs"] if tli else ["slem", "slrs"]


class Engine:
    def __init__(self, target_runner: Runner, target_vocab: Vocab,
                 drafter_runner: Optional[Runner] = None, drafter_vocab: Optional[Vocab] = None,
                 window: int = 4, draft_top_k: int = 0, min_confidence: float = 0.4,
                 slrs_tau: float = DEFAULT_TAU, slrs_budget: int = DEFAULT_BUDGET):
        self.target_vocab = target_vocab
        self.slrs_tau, self.slrs_budget = slrs_tau, slrs_budget
        self.verifier = Verifier(target_runner, target_vocab, window)
        self.drafter_runner, self.drafter_vocab = drafter_runner, drafter_vocab
        self.window, self.draft_top_k, self.min_confidence = window, draft_top_k, min_confidence
        self._drafters: dict = {}
        self._kv: Optional[KVPool] = None  # one drafter KV cache per mode (auto switches modes per round)
        self.auto_memory = AutoMemory()  # what `auto` measured with this pair, per decoding mode

    @classmethod
    def load(cls, target: str, drafter: Optional[str] = None, device: Optional[str] = None,
             dtype=None, fast: bool = True, **kw) -> "Engine":
        tv = Vocab.load(target)
        tr = make_runner(load_model(target, device, dtype), fast=fast)
        dr = dv = None
        if drafter:
            dv = Vocab.load(drafter)
            dr = make_runner(load_model(drafter, device, dtype), fast=fast)
        return cls(tr, tv, dr, dv, **kw)

    def drafter(self, mode: str) -> Drafter:
        if self.drafter_runner is None:
            raise InvalidArgument(f"algorithm {mode!r} needs a drafter")
        d = self._drafters.get(mode)
        if d is None:
            d = Drafter(self.drafter_runner, self.drafter_vocab, self.target_vocab, mode,
                        self.draft_top_k, self.window, self.min_confidence, self.slrs_tau, self.slrs_budget)
            if mode != "same":  # tli, slem and slrs draft on one context: one KV cache (Drafter.share_kv)
                kin = next((o for o in self._drafters.values() if o.mode != "same"), None)
                if kin is not None:
                    d.share_kv(kin)
            self._drafters[mode] = d
        return d

    def resolve(self, algorithm: str, params: SamplingParams) -> tuple:
        """(algorithm, why): `resolve_algorithm` with this engine's two vocabularies."""
        return resolve_algorithm(algorithm, params, self.target_vocab,
                                 self.drafter_vocab if self.drafter_runner is not None else None,
                                 lambda: self.drafter("tli"), slrs=True)

    def _use(self, d: Drafter) -> None:
        """Install drafter `d`'s own KV cache in the shared drafter runner (and tli's pruned head)."""
        if self._kv is None:
            self._kv = KVPool(self.drafter_runner, slots=len(MODES))
        if not self._kv.activate(d.kv):
            d.kv_ids = []  # a fresh cache: the next draft recomputes its context
        rows = d.inter.rows if d.inter is not None else None
        if rows is not None and self.drafter_runner.pruned_rows is not rows:
            self.drafter_runner.prune_head(rows)

    def generate(self, prompt: str, max_new_tokens: int = 128, params: SamplingParams = SamplingParams(),
                 algorithm: str = "auto", draft_tokens: Optional[int] = None, stop=()) -> GenerationResult:
        """`stop`: stop strings (crossdraft/stops.py); the text ends before the first one the target
        writes, with finish_reason 'stop' (the ids keep the rounds up to the one that completed it)."""
        params = params.validate()
        stops = StopCut(stop or ()) if stop else None
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("the prompt is empty")
        if draft_tokens is not None and not 1 <= draft_tokens <= 64:
            raise InvalidArgument(f"draft tokens must be in [1, 64], got {draft_tokens}")
        state: Optional[AutoState] = None
        if algorithm == "auto" and self.drafter_runner is not None:
            algos = auto_algorithms(params, self.target_vocab, self.drafter_vocab, lambda: self.drafter("tli"))
            lengths = (draft_tokens,) if draft_tokens is not None else LENGTHS
            state = self.auto_memory.get((mode_key(params), draft_tokens), algos, lengths)
            state.begin_session()
            modes, why = state.algorithms_in_play(), ""
        else:
            algo, why = self.resolve(algorithm, params)
            modes = [algo] if algo != "none" else []
        # The clock starts before the prompt is encoded and prefilled: a generation's time is what its
        # caller waits, as for Hugging Face's generate() and for a request through the services.
        t0 = time.perf_counter()
        prompt_ids = self.target_vocab.encode_prompt(prompt)
        v = self.verifier
        v.start(prompt_ids, max_new_tokens, params)
        prefill_s = time.perf_counter() - t0
        drafters = {m: self.drafter(m) for m in modes}
        for d in drafters.values():
            self._use(d)
            d.start(prompt, prompt_ids, params)
        lengths: dict = {}  # algorithm -> its DraftLength in this session (per arm state of `adaptive`)
        stats = RoundStats()
        used: dict = {}  # algorithm -> rounds it ran in this session
        arm = (modes[0], draft_tokens) if modes else None
        last = None  # the drafter of the previous round: a round after a switch is not measured
        while not v.finished:
            r0 = time.perf_counter()
            if state is not None:
                arm = state.next_arm()
            drafter = drafters.get(arm[0]) if arm is not None else None
            if drafter is not None:
                k = lengths.get(arm)
                if k is None:  # (not setdefault: that would build a DraftLength every round)
                    k = lengths[arm] = DraftLength(arm[1])
                self._use(drafter)  # (a no-op unless the previous round ran another algorithm's drafter)
                prop = drafter.propose(k.k)
            else:
                prop = None
            verdict = v.verify(prop)  # None: the target alone, one token
            stats.add(prop, verdict)
            if drafter is not None and not verdict.finished:
                drafter.observe(verdict)
                for d in drafters.values():  # the others catch up when they next draft
                    if d is not drafter:
                        d.defer(verdict)
                k.update(verdict.candidates, verdict.accepted)
            if state is not None:
                state.record(arm, len(verdict.ids), time.perf_counter() - r0, measured=drafter is last)
                last = drafter
                if len(drafters) > 1 and state.stage == "decided":  # the other algorithms are done with
                    drafters = {state.algorithm: drafters[state.algorithm]}
            if arm is not None:
                used[arm[0]] = used.get(arm[0], 0) + 1
            if stops is not None and stops.ends(verdict.text):
                break
        seconds = time.perf_counter() - t0
        new = v.new_ids
        text = self.target_vocab.bytes_of(new)
        finish_reason = v.finish_reason
        if stops is not None and stops.hit:
            text, finish_reason = text[: stops.cut], "stop"
        text = text.decode("utf-8", errors="replace")
        profile = stats.profile()
        profile["prefill_s"] = prefill_s  # encoding the prompt and the target's prefill
        profile["other_s"] = seconds - prefill_s - (stats.draft_ns + stats.verify_ns) / 1e9
        auto = None
        if state is not None:
            best = state.best()
            algo = best[0]
            why = state.explain()
            auto = state.summary()
            auto["rounds_by_algorithm"] = used
            auto["keeps"] = arm_name(*best)
        else:
            algo = modes[0] if modes else "none"
        return GenerationResult(
            text=text, ids=new, new_tokens=len(new), seconds=seconds, algorithm=algo, rounds=stats.rounds,
            draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens, drafted=stats.drafted,
            finish_reason=finish_reason, why=why, profile=profile,
            accepted_by_position=stats.accepted_by_position, slrs_fallbacks=stats.slrs_fallbacks,
            slrs_rows=stats.slrs_rows, auto=auto)
