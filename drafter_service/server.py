"""The drafter service: a small model behind `crossdraft.v1.DrafterService`.

Owns: running sessions against verifiers. A session opens one Verify stream (the drafter is the
client, `link.RemoteVerifier`) and runs the round loop every generation runs (`rounds.run_rounds`,
the same function as `Engine.generate`), streaming each committed delta back to its caller, the last
one with the final statistics. A round's delta goes back once the next proposal is on its way.

The target's tokenizer comes from the verifier (`GetTokenizer`), is loaded with `Vocab.load` and
cached per tokenizer fingerprint; so are the per-mode drafters built against it (the TLI
intersection is computed once per target tokenizer; `targets.Targets` keeps these caches and the
channels, and checks --allowed-verifiers). Building them is the check that the pair can be
bridged: `same` with different tokenizers, or a pair without an intersection for `tli`, is answered
FAILED_PRECONDITION. `auto` measures here as in process (`crossdraft/auto.py`; one `AutoState` per
target tokenizer and decoding mode, shared by this process's sessions, round trips included in what
it measures): an auto session holds one drafter per algorithm it may try, until the search decides.

Sessions, batching and memory: each session has its own drafters (forks of the cached ones) over one
KV cache of its own, admitted under the KV budget (`--kv-budget-mb`; it reserves about what its text
will take in drafter tokens, measured on its prompt). Every draft is a program run by the model's
scheduler (`crossdraft.batched.BatchedModel`), so the drafting steps of all sessions share forward
passes (continuous batching). Each verdict carries the verifier's load, from which a round's draft
length is capped where drafts cannot change the output (`crossdraft/load.py`): at high load a
session drafts less, or nothing.

Never: decides acceptance or commits anything; the verifier alone does.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Optional

from crossdraft import wire
from crossdraft.auto import LENGTHS, AutoMemory, mode_key
from crossdraft.batched import BatchedModel, Limits
from crossdraft.drafter import ALTERNATIVES, Drafter
from crossdraft.engine import auto_algorithms, resolve_algorithm
from crossdraft.errors import InvalidArgument, ResourceExhausted, Unavailable
from crossdraft.protocol import Proposal
from crossdraft.rounds import run_rounds
from crossdraft.serving.channels import PLAINTEXT, TLS, is_loopback
from crossdraft.serving.drain import Drain
from crossdraft.serving.metrics import ServiceMetrics
from crossdraft.serving.models import dtype_name, load_warm, model_id
from crossdraft.serving.service import run_model_service, setup_logging
from crossdraft.serving.streams import decoupled
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc

from .allowed import AllowedVerifiers
from .link import RemoteVerifier
from .targets import Targets

log = logging.getLogger("crossdraft.drafter_service")

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name
ALGORITHMS = ("same", "tli", "slem", "slrs")
# Rounds in a row the load cap may cut to the target's own step before a call whose caller allows it is
# handed back (RunSessionRequest.may_hand_back; crossdraft/rounds.py)
HAND_BACK_ROUNDS = 8
# The drafter's settings, as the in-process engine's defaults (Engine.__init__), so that a session
# here drafts exactly what `crossdraft generate` drafts.
WINDOW, DRAFT_TOP_K, MIN_CONFIDENCE = 4, 0, 0.4
DELTA_BUFFER = 64  # committed deltas queued for a caller that reads slowly, then the session waits


class DrafterSessions:
    """The drafter model's sessions: how many run, their KV reservations, and their drafting, batched."""

    def __init__(self, model: BatchedModel):
        self.model = model
        self.runner, self.max_sessions = model.runner, model.limits.max_sessions
        self.lock = threading.Lock()
        self.active = 0
        self.caches: dict = {}  # id -> the KV cache of a running session (GetInfo's allocated bytes)

    def acquire(self) -> None:
        with self.lock:
            if self.active >= self.max_sessions:
                raise ResourceExhausted(f"this drafter runs at most {self.max_sessions} sessions at once "
                                        "(--max-sessions)")
            self.active += 1

    def admit(self, drafters: dict, target_prompt: int, remaining: int) -> int:
        """Reserve KV room for a started session's drafters (one cache, see `Drafter.share_kv`): its
        prompt in drafter tokens plus `remaining` target tokens at 1.5 times the prompt's ratio of drafter
        to target tokens (at least 2: a drafter is small, so a generous reservation is cheap). A context
        that outgrows it drafts nothing more (target-only rounds: slower, never wrong)."""
        caches = {id(d.kv.cache): d.kv.cache for d in drafters.values()}
        if not caches:
            return 0
        ctx = max(len(d.ctx) for d in drafters.values())
        ratio = max(2.0, 1.5 * ctx / max(1, target_prompt))
        positions = int(ctx + ratio * remaining) + 16
        reserved = 0
        for c in caches.values():
            reserved += self.model.admit(c, positions)
        with self.lock:
            self.caches.update(caches)
        return reserved

    def release(self, drafters: dict, reserved: int) -> None:
        with self.lock:
            self.active -= 1
            for d in drafters.values():
                self.caches.pop(id(d.kv.cache), None)
        if reserved:
            self.model.release(reserved)

    def draft(self, drafter: Drafter, k: int) -> Proposal:
        return self.model.run(drafter.draft(k))

    def usage(self) -> dict:
        with self.lock:
            caches = list(self.caches.values())
        return self.model.usage(caches)


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, model: str, limits: Limits = Limits(), metrics: Optional[ServiceMetrics] = None,
                 tls: TLS = PLAINTEXT, max_model_len: Optional[int] = None,
                 allowed: Optional[AllowedVerifiers] = None, draft_ahead: bool = False,
                 alternatives: int = ALTERNATIVES):
        self.model = model
        self.draft_ahead = draft_ahead  # draft the next round while the verifier checks this one (rounds.py)
        self.alternatives = alternatives  # next guesses sent beside an unsure last candidate (verifier.py)
        self.tls = tls  # how it calls verifiers: TLS with the CA and its own certificate, or plaintext
        self.limits, self.max_model_len = limits, max_model_len
        self.max_sessions = limits.max_sessions
        self.metrics = metrics if metrics is not None else ServiceMetrics("drafter")
        self.sessions: Optional[DrafterSessions] = None  # set by load()
        # channels, target tokenizers and template drafters (copied per session), bounded; the allow-list
        self.targets = Targets(self._make_drafter, tls, allowed)
        self.auto_memory = AutoMemory()  # what `auto` measured, per target tokenizer and decoding mode
        self.loads: dict = {}  # the last load hint each verifier sent (drafter_service/link.py)
        self.drain = Drain("drafter")  # on SIGTERM: no new sessions, running ones handed back (serving/drain.py)

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self, device: Optional[str] = None, fast: bool = True, dtype=None, kv_dtype=None) -> None:
        vocab, runner = load_warm(self.model, device, fast, dtype, max_length=self.max_model_len, kv_dtype=kv_dtype)
        self.vocab, self.runner = vocab, runner
        self.fingerprint = vocab.fingerprint()
        # one session alone drafts in its own thread (Scheduler's `inline`: two thread hand-offs fewer a draft)
        model = BatchedModel(runner, self.limits, "drafter", observer=self.metrics.batch,
                             inline=lambda: self.sessions is not None and self.sessions.active <= 1)
        self.metrics.kv_budget(model.budget.budget)
        self.sessions = DrafterSessions(model)

    def _ready(self) -> DrafterSessions:
        if self.sessions is None:
            raise Unavailable("the drafter's model is still loading")
        return self.sessions

    def _make_drafter(self, target_vocab, mode: str) -> Drafter:
        """A template drafter for this target tokenizer and mode (`Targets` keeps it; sessions fork it)."""
        return Drafter(self.runner, self.vocab, target_vocab, mode, DRAFT_TOP_K, WINDOW, MIN_CONFIDENCE,
                       alternatives=self.alternatives)

    # --- RPCs ---------------------------------------------------------------------------------
    def GetInfo(self, request, context):
        sessions = self._ready()
        return drafter_pb2.DrafterServiceGetInfoResponse(
            model_id=model_id(self.model), tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.runner.vocab_size, algorithms=[wire.algorithm_to_proto(a) for a in ALGORITHMS],
            max_context=self.runner.max_length, device=str(self.runner.device), dtype=dtype_name(self.runner),
            active_sessions=sessions.active, max_sessions=sessions.max_sessions,
            cache=wire.cache_usage_to_proto(sessions.usage()))

    def RunSession(self, request, context):
        sessions = self._ready()
        self.drain.admit()
        yield from self.drain.hold(self._run_session(sessions, request, context))

    def _run_session(self, sessions: DrafterSessions, request, context):
        sid, params, algorithm, committed = self._check(request)
        stub, target_vocab, fp = self.targets.target(request.verifier_address)
        algo, modes, why, state = self._plan(algorithm, params, request.draft_tokens or None, target_vocab, fp)
        drafters = {m: self.targets.drafter(fp, m, target_vocab).fork() for m in modes}
        text = [d for d in drafters.values() if d.mode != "same"]
        for d in text[1:]:  # tli, slem and slrs of one session draft on one KV cache (Drafter.share_kv)
            d.share_kv(text[0])
        prompt_ids = list(request.prompt_ids) or target_vocab.encode_prompt(request.prompt)
        n_target = len(target_vocab)
        for t in prompt_ids + committed:
            if not 0 <= t < n_target:
                raise InvalidArgument(f"token id {t} is outside the target's vocabulary of {n_target}")
        start = wire.SessionStart(sid, prompt_ids, committed, params, request.max_new_tokens, algo)
        sessions.acquire()
        reserved = 0
        done = SimpleNamespace(new_tokens=0, seconds=0.0, finished=False)  # filled in by _run
        try:
            for d in drafters.values():
                d.start(request.prompt, prompt_ids + committed, params)
            reserved = sessions.admit(drafters, len(prompt_ids) + len(committed), start.remaining)
            self.metrics.session_started()
            # The round loop runs in a worker thread: sending a delta to the caller (which blocks until
            # the transport takes it) overlaps the next round instead of delaying it.
            yield from decoupled(
                lambda stop: self._run(stub, start, drafters, why, request.draft_tokens or None, context, done,
                                       stop, request.resume_draft_tokens or None, state,
                                       HAND_BACK_ROUNDS if request.may_hand_back else None),
                maxsize=DELTA_BUFFER, name=f"draft-{sid[:16]}")
        finally:
            sessions.release(drafters, reserved)
            self.metrics.kv_usage(sessions.model.budget.usage())
            self.metrics.session_finished(done.new_tokens, done.seconds, done.finished)

    @staticmethod
    def _check(request) -> tuple:
        """(session id, sampling params, algorithm, committed ids) of a RunSessionRequest, checked."""
        sid = wire.check_session_id(request.session_id or uuid.uuid4().hex)
        params = wire.sampling_params_from_proto(request.params if request.HasField("params") else None)
        algorithm = wire.algorithm_from_proto(request.algorithm)
        if not request.verifier_address:
            raise InvalidArgument("verifier_address is required")
        if not request.prompt_ids and not request.prompt:
            raise InvalidArgument("the prompt is empty")
        committed = list(request.committed_ids)
        if not len(committed) < request.max_new_tokens <= wire.MAX_SEQUENCE_IDS:
            raise InvalidArgument(f"max_new_tokens must be more than the {len(committed)} ids committed "
                                  f"(and at most {wire.MAX_SEQUENCE_IDS}), got {request.max_new_tokens}")
        for name in ("draft_tokens", "resume_draft_tokens"):
            v = getattr(request, name)
            if v and not 1 <= v <= wire.MAX_TARGET_IDS:
                raise InvalidArgument(f"{name.replace('_', ' ')} must be in [1, {wire.MAX_TARGET_IDS}] "
                                      f"(or 0: adaptive), got {v}")
        return sid, params, algorithm, committed

    def _plan(self, algorithm: str, params, fixed: Optional[int], target_vocab, fp: str) -> tuple:
        """(the algorithm the Verify stream opens with, the modes to start drafters for, why, auto state)."""
        tli = lambda: self.targets.drafter(fp, "tli", target_vocab)  # noqa: E731
        if algorithm == "auto":  # measured, as in process (crossdraft/auto.py), per target and mode
            algos = auto_algorithms(params, target_vocab, self.vocab, tli)
            state = self.auto_memory.get((fp, mode_key(params), fixed), algos, (fixed,) if fixed else LENGTHS)
            state.begin_session()
            in_play = state.algorithms_in_play()
            # The verifier needs a resolved algorithm to open the stream: the first this session runs.
            # It decides every round by the proposal's kind, so later rounds may run another.
            return in_play[0], [a for a in in_play if a != "none"], "", state
        algo, why = resolve_algorithm(algorithm, params, target_vocab, self.vocab, tli, slrs=True)
        return algo, ([algo] if algo != "none" else []), why, None

    def _run(self, stub, start: wire.SessionStart, drafters: dict, why: str, draft_tokens: Optional[int],
             context, done: SimpleNamespace, stop: Optional[threading.Event] = None,
             resume_k: Optional[int] = None, state=None, hand_back: Optional[int] = None):
        """The session's rounds (`rounds.run_rounds`) against the verifier at the other end of a Verify
        stream, each committed delta as a RunSessionResponse; `done` gets the session's new_tokens, seconds
        and finished (for the metrics). `hand_back` (the caller allows it): the rounds the load cap may cut
        to nothing in a row before the call ends with a `handed_back` message (crossdraft/rounds.py)."""
        link = RemoteVerifier(stub, start, context, self.loads, getattr(stub, "address", ""))
        base = offset = len(start.committed_ids)
        t0 = time.perf_counter()
        algo_enum, first, rounds = wire.algorithm_to_proto(start.algorithm), True, 0
        ahead = (0, 0, 0)  # drafting ahead: what the metrics have counted of this session
        try:
            beside = self.sessions.model.submit if self.draft_ahead else None
            for r in run_rounds(link, drafters, self.sessions.draft, len(start.prompt_ids) + offset, state,
                                draft_tokens, resume_k, stop, hand_back=hand_back, run_beside=beside):
                v, c, rounds = r.verdict, r.stats, r.stats.rounds
                c.network_ns += max(0, r.rtt_ns - v.verify_ns)
                self.metrics.round(v.candidates, v.accepted, len(v.ids), draft_ns=r.proposal.draft_ns,
                                   network_ns=r.rtt_ns - v.verify_ns, round_ns=r.proposal.draft_ns + r.rtt_ns)
                if v.alternative:
                    self.metrics.alternative()
                ahead = self._ahead_counted(c, ahead)
                done.new_tokens = offset + len(v.ids) - base
                done.seconds, done.finished = time.perf_counter() - t0, v.finished
                if v.ids or v.finished:
                    if state is not None:  # auto: the algorithm of this round; why, at the end
                        algo_enum = wire.algorithm_to_proto(r.arm[0] if r.arm is not None else "none")
                        why = state.explain() if v.finished else ""
                    yield self._delta(r, offset, done.new_tokens, algo_enum,
                                      why if first or state is not None else "", done.seconds)
                    first = False
                    offset += len(v.ids)
                if r.handed_back:
                    link.end()  # the verifier parks the session for the caller's own stream
                    log.info("session %s: handed back after %d rounds: drafting does not pay at the verifier's "
                             "load", start.session_id, rounds)
                    yield drafter_pb2.RunSessionResponse(token_offset=offset, handed_back=True,
                                                         next_draft_tokens=r.k_next, come_back_below=r.come_back_below)
                    return
            c = r.stats if rounds else None
            log.info("session %s: %s, %d rounds, %d new tokens, %.3f s, %d of %d tokens drafted ahead, "
                     "%d rounds sent ahead, %d of them stale", start.session_id, start.algorithm, rounds,
                     done.new_tokens, time.perf_counter() - t0, c.early if c else 0, c.drafted if c else 0,
                     c.sent_ahead + c.stale_ahead if c else 0, c.stale_ahead if c else 0)
        finally:
            link.close()

    def _ahead_counted(self, c, counted: tuple) -> tuple:
        """Count in the metrics what this session drafted and sent ahead since `counted`; returns the totals."""
        now = (c.early, c.sent_ahead, c.stale_ahead)
        if now != counted:
            self.metrics.ahead(*(a - b for a, b in zip(now, counted)))
        return now

    @staticmethod
    def _delta(r, offset: int, new_tokens: int, algo_enum: int, why: str, seconds: float):
        """A round's RunSessionResponse; `new_tokens`: committed by this call so far."""
        v, c = r.verdict, r.stats
        stats = SimpleNamespace(new_tokens=new_tokens, rounds=c.rounds, draft_tokens=c.draft_tokens,
                                accepted_tokens=c.accepted_tokens, drafted=c.drafted,
                                accepted_by_position=c.accepted_by_position, seconds=seconds, profile=c.profile())
        return drafter_pb2.RunSessionResponse(
            token_offset=offset, ids=v.ids, text=v.text, finished=v.finished,
            finish_reason=wire.finish_reason_to_proto(v.finish_reason), algorithm=algo_enum, why=why,
            stats=wire.stats_to_proto(stats, network_ns=c.network_ns), next_draft_tokens=r.k_next, seal=v.seal)


def serve(args) -> int:
    """`crossdraft serve drafter`: listen at once (health NOT_SERVING), load and warm the model,
    then SERVING until SIGTERM."""
    setup_logging()
    allowed = AllowedVerifiers.parse(getattr(args, "allowed_verifiers", None))
    if allowed.any and not is_loopback(args.host):
        log.warning("no --allowed-verifiers: whoever can call this drafter can make it dial any address")
    servicer = DrafterServicer(args.model, Limits.from_args(args), tls=TLS.from_args(args),
                               max_model_len=args.max_model_len or None, allowed=allowed,
                               draft_ahead=args.draft_ahead, alternatives=args.draft_alternatives)
    return run_model_service(SERVICE_NAME, drafter_pb2_grpc.add_DrafterServiceServicer_to_server, servicer, args, log)
