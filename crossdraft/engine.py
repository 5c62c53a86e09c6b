"""The in-process engine: one target, optionally one drafter, and generations run on them.

Owns: resolving the algorithm (the static rule, and `auto`'s measuring state per decoding mode),
setting a generation up (its verifier, its drafters), running it through the round loop
(`rounds.run_rounds`, the same loop the drafter service runs) and its result and statistics. One
prompt runs alone (`generate`); several run together (`generate_batch`), each its own session, their
forward passes batched by one `Scheduler` per model, exactly as the services batch their sessions.
The drafter and the verifier only exchange `Proposal`s and `Verdict`s, so the services run the same
objects on two machines with the same results.

Never: parses command lines, prints, imports grpc or redis.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from .auto import LENGTHS, AutoMemory, AutoState, arm_name, mode_key
from .batched import prime_cost
from .drafter import ALTERNATIVES, Drafter
from .errors import FailedPrecondition, InvalidArgument, Unimplemented
from .load import CostModel
from .rounds import DraftLength, LocalVerifier, RoundStats, run_rounds  # noqa: F401 - DraftLength, RoundStats: re-exported
from .runner import Runner, load_model, make_runner
from .sampling import SamplingParams
from .scheduler import DEFAULT_MAX_BATCH_TOKENS, Scheduler
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
    alternatives: int = 0  # rounds whose last committed candidate was a drafter's alternative (verifier.py)

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


def resolve_algorithm(algorithm: str, params: SamplingParams, target_vocab: Vocab,
                      drafter_vocab: Optional[Vocab], check_tli: Optional[Callable[[], object]] = None,
                      slrs: bool = False) -> tuple:
    """(algorithm, why). An explicit algorithm checked against the pair; `auto` by the static rule:
    identical tokenizers -> same; otherwise greedy -> slem, sampling -> tli (slem if the vocabularies
    share too little for tli). The measuring `auto` (auto.py) of the engine and of the drafter service
    does not call this for `auto` with a drafter: it starts from the same pick (`auto_algorithms`
    lists it first, as the incumbent) and measures the others against it, slrs among them under
    sampling, and the target's own step (`none`). On the zoo's CPU (docs/benchmarks.md, main table)
    slem was faster than tli greedy with drafter-spm4k and drafter-bpe2k and level with
    drafter-bpe6k-alt, and tli faster than slem at temperature 1 with every drafter: exact match of a
    string only pays when the target's choice is predictable, rejection sampling accepts on agreement
    in probability.

    drafter_vocab None: no drafter. check_tli raises FailedPrecondition when tli cannot apply to
    the pair (it builds the intersection); the engine and the drafter service share this rule.
    slrs: whether the caller runs slrs; without it, slrs is refused UNIMPLEMENTED. The engine and the
    drafter service both run slrs and pass slrs=True."""
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
    Without a drafter, none; for identical tokenizers same (tli and slem only add work there);
    otherwise slem and tli (when the vocabularies share enough), and under sampling slrs too
    (greedy, slrs is slem). Always, second (the first challenger): none, the target's own step, so
    that where no algorithm pays for its drafting (a weak drafter, a fast target), auto finds that out
    early and is no slower than the target alone (auto.AHEAD)."""
    if drafter_vocab is None:
        return ["none"]
    if drafter_vocab.same_as(target_vocab):
        return ["same", "none"]
    tli = True
    try:
        if check_tli is not None:
            check_tli()
    except FailedPrecondition:
        tli = False
    if params.greedy:
        algos = ["slem", "tli"] if tli else ["slem"]
    else:
        algos = ["tli", "slem", "slrs"] if tli else ["slem", "slrs"]
    return algos[:1] + ["none"] + algos[1:]


class _Count:
    """A thread-safe count of what is inside a `with` block."""

    def __init__(self):
        self.n, self._lock = 0, threading.Lock()

    def __enter__(self):
        with self._lock:
            self.n += 1

    def __exit__(self, *exc):
        with self._lock:
            self.n -= 1

    def get(self) -> int:
        return self.n


class Engine:
    def __init__(self, target_runner: Runner, target_vocab: Vocab,
                 drafter_runner: Optional[Runner] = None, drafter_vocab: Optional[Vocab] = None,
                 window: int = 4, draft_top_k: int = 0, min_confidence: float = 0.4,
                 slrs_tau: float = DEFAULT_TAU, slrs_budget: int = DEFAULT_BUDGET, alternatives: int = ALTERNATIVES):
        self.target_vocab = target_vocab
        self.alternatives = alternatives
        self.slrs_tau, self.slrs_budget = slrs_tau, slrs_budget
        self.verifier = Verifier(target_runner, target_vocab, window)  # one stream's: its cache is reused
        self.drafter_runner, self.drafter_vocab = drafter_runner, drafter_vocab
        self.window, self.draft_top_k, self.min_confidence = window, draft_top_k, min_confidence
        self._drafters: dict = {}  # mode -> this engine's drafter (one stream's; batches fork them)
        self.auto_memory = AutoMemory()  # what `auto` measured with this pair, per decoding mode

    @classmethod
    def load(cls, target: str, drafter: Optional[str] = None, device: Optional[str] = None,
             dtype=None, fast: bool = True, kv_dtype=None, **kw) -> "Engine":
        tv = Vocab.load(target)
        tr = make_runner(load_model(target, device, dtype), fast=fast, kv_dtype=kv_dtype)
        dr = dv = None
        if drafter:
            dv = Vocab.load(drafter)
            dr = make_runner(load_model(drafter, device, dtype), fast=fast, kv_dtype=kv_dtype)
        return cls(tr, tv, dr, dv, **kw)

    @property
    def target_runner(self) -> Runner:
        return self.verifier.runner

    def drafter(self, mode: str) -> Drafter:
        if self.drafter_runner is None:
            raise InvalidArgument(f"algorithm {mode!r} needs a drafter")
        d = self._drafters.get(mode)
        if d is None:
            d = Drafter(self.drafter_runner, self.drafter_vocab, self.target_vocab, mode,
                        self.draft_top_k, self.window, self.min_confidence, self.slrs_tau, self.slrs_budget,
                        self.alternatives)
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

    def _plan(self, prompt: str, params: SamplingParams, algorithm: str, draft_tokens: Optional[int]) -> tuple:
        """(params, modes to start drafters for, why, auto state or None), the request checked."""
        params = params.validate()
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("the prompt is empty")
        if draft_tokens is not None and not 1 <= draft_tokens <= 64:
            raise InvalidArgument(f"draft tokens must be in [1, 64], got {draft_tokens}")
        if algorithm == "auto" and self.drafter_runner is not None:
            algos = auto_algorithms(params, self.target_vocab, self.drafter_vocab, lambda: self.drafter("tli"))
            lengths = (draft_tokens,) if draft_tokens is not None else LENGTHS
            state = self.auto_memory.get((mode_key(params), draft_tokens), algos, lengths)
            state.begin_session()
            return params, [a for a in state.algorithms_in_play() if a != "none"], "", state
        algo, why = self.resolve(algorithm, params)
        return params, ([algo] if algo != "none" else []), why, None

    def generate(self, prompt: str, max_new_tokens: int = 128, params: SamplingParams = SamplingParams(),
                 algorithm: str = "auto", draft_tokens: Optional[int] = None, stop=()) -> GenerationResult:
        """One prompt, alone: every forward pass is its own. `stop`: stop strings (crossdraft/stops.py);
        the text ends before the first one the target writes, with finish_reason 'stop' (the ids keep the
        rounds up to the one that completed it)."""
        params, modes, why, state = self._plan(prompt, params, algorithm, draft_tokens)
        # The clock starts before the prompt is encoded and prefilled: a generation's time is what its
        # caller waits, as for Hugging Face's generate() and for a request through the services.
        t0 = time.perf_counter()
        prompt_ids = self.target_vocab.encode_prompt(prompt)
        v = self.verifier
        v.start(prompt_ids, max_new_tokens, params)
        drafters = {m: self.drafter(m) for m in modes}
        return self._run(prompt, prompt_ids, params, v, drafters, LocalVerifier(v),
                         lambda d, k: d.propose(k), why, state, draft_tokens, t0, stop)

    def generate_batch(self, prompts: list, max_new_tokens: int = 128, params=SamplingParams(),
                       algorithm: str = "auto", draft_tokens: Optional[int] = None, concurrency: int = 8,
                       max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, stop=()) -> list:
        """Several prompts together, `concurrency` sessions at a time, each session's forward passes
        batched with the others' by one scheduler per model (continuous batching, as the services do
        it). `params`: one SamplingParams for all, or one per prompt. Results in the order of `prompts`;
        each equals what `generate` gives for its prompt, up to float rounding of batched products."""
        if not 1 <= concurrency <= 1024:
            raise InvalidArgument(f"concurrency must be in [1, 1024], got {concurrency}")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidArgument("give one SamplingParams for all prompts or one per prompt")
        cost = CostModel()
        if concurrency > 1:  # the load cap prices the first rounds too (batched.prime_cost)
            prime_cost(cost, self.target_runner)
        live = _Count()  # sessions running: each submits a round after each verdict (the scheduler gathers them)
        target = Scheduler(self.target_runner, max_batch_tokens, "target", observer=cost.observe,
                           expected=live.get)
        drafts = Scheduler(self.drafter_runner, max_batch_tokens, "drafter") if self.drafter_runner else None
        try:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="session") as pool:
                def session(p, sp):
                    with live:
                        return self._batched_session(p, max_new_tokens, sp, algorithm, draft_tokens, target, drafts,
                                                     cost, stop)
                futures = [pool.submit(session, p, sp) for p, sp in zip(prompts, plist)]
                return [f.result() for f in futures]
        finally:
            target.close()
            if drafts is not None:
                drafts.close()

    def _batched_session(self, prompt, max_new_tokens, params, algorithm, draft_tokens, target: Scheduler,
                         drafts: Optional[Scheduler], cost: CostModel, stop=()) -> GenerationResult:
        """One session of a batch: its own verifier and drafters (forks: own caches and state)."""
        params, modes, why, state = self._plan(prompt, params, algorithm, draft_tokens)
        t0 = time.perf_counter()
        prompt_ids = self.target_vocab.encode_prompt(prompt)
        v = Verifier(self.target_runner, self.target_vocab, self.window)
        v.open(prompt_ids, max_new_tokens, params)
        target.run(v.prefill())
        drafters = {m: self.drafter(m).fork() for m in modes}
        text = [d for d in drafters.values() if d.mode != "same"]
        for d in text[1:]:  # one KV cache for the session's drafters over one context (Drafter.share_kv)
            d.share_kv(text[0])
        return self._run(prompt, prompt_ids, params, v, drafters, LocalVerifier(v, target, cost),
                         lambda d, k: drafts.run(d.draft(k)), why, state, draft_tokens, t0, stop)

    def _run(self, prompt, prompt_ids, params, v: Verifier, drafters: dict, link, draft, why: str,
             state: Optional[AutoState], draft_tokens: Optional[int], t0: float, stop=()) -> GenerationResult:
        """The rounds of one started session (`rounds.run_rounds`), and its result."""
        prefill_s = time.perf_counter() - t0
        for d in drafters.values():
            d.start(prompt, prompt_ids, params)
        used: dict = {}  # algorithm -> rounds it ran in this session
        stats = RoundStats()
        stops = StopCut(stop) if stop else None
        until = (lambda verdict: stops.ends(verdict.text)) if stops is not None else None
        for r in run_rounds(link, drafters, draft, len(prompt_ids), state, draft_tokens, until=until):
            stats = r.stats
            if r.arm is not None:
                used[r.arm[0]] = used.get(r.arm[0], 0) + 1
        seconds = time.perf_counter() - t0
        new = v.new_ids
        text, finish_reason = self.target_vocab.bytes_of(new), v.finish_reason
        if stops is not None:
            stops.flush()  # (a stop string that waited on a longer one, which never completed, ends it too)
            if stops.hit:
                text, finish_reason = text[: stops.cut], "stop"
        profile = stats.profile()
        profile["prefill_s"] = prefill_s  # encoding the prompt and the target's prefill
        profile["other_s"] = seconds - prefill_s - (stats.draft_ns + stats.verify_ns) / 1e9
        auto = None
        if state is not None:
            best = state.best()
            algo, why = best[0], state.explain()
            auto = state.summary()
            auto["rounds_by_algorithm"] = used
            auto["keeps"] = arm_name(*best)
        else:
            algo = next(iter(drafters), "none")
        return GenerationResult(
            text=text.decode("utf-8", errors="replace"), ids=new, new_tokens=len(new),
            seconds=seconds, algorithm=algo, rounds=stats.rounds, draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens, drafted=stats.drafted, finish_reason=finish_reason, why=why,
            profile=profile, accepted_by_position=stats.accepted_by_position, slrs_fallbacks=stats.slrs_fallbacks,
            slrs_rows=stats.slrs_rows, auto=auto, alternatives=stats.alternatives)
