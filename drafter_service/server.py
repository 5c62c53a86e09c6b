"""The drafter service: a small model behind `crossdraft.v1.DrafterService`.

Owns: running a session against a verifier: it opens one Verify stream (the drafter is the client),
sends the VerifyStart, then per round `Drafter.propose(k)` -> Proposal -> Verdict ->
`Drafter.observe`, with the engine's adaptive draft length (`engine.DraftLength`), and streams each
committed delta back to its caller, the last one with the final statistics. The same loop as
`Engine.generate`, with the verifier on the other end of a stream, so outputs are identical.

The target's tokenizer comes from the verifier (`GetTokenizer`), is loaded with `Vocab.load` and
cached per tokenizer fingerprint; so are the per-mode drafters built against it (the TLI
intersection is computed once per target tokenizer). Building them is the check that the pair can be
bridged: `same` with different tokenizers, or a pair without an intersection for `tli`, is answered
FAILED_PRECONDITION. `auto` measures here as in process (`crossdraft/auto.py`; one `AutoState` per
target tokenizer and decoding mode, shared by this process's sessions, round trips included in what
it measures): an auto session holds one drafter per algorithm it may try, until the search decides.
A round's delta goes back to the caller once the next proposal is on its way (see `_run`).

Sessions and the KV cache: as on the verifier, per-session KV caches live in a `runner.KVPool` of
`--kv-slots` caches (least recently used evicted); each session keeps its state in its own `Drafter`
(a copy of the cached one), its drafting runs under one lock, and a session whose cache was evicted
rebuilds it from its own context (its canonical tokenization of the committed text) at its next draft.

Never: decides acceptance or commits anything; the verifier alone does.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Optional

import grpc

from crossdraft import wire
from crossdraft.auto import LENGTHS, AutoMemory, mode_key
from crossdraft.drafter import Drafter
from crossdraft.engine import DraftLength, RoundStats, auto_algorithms, resolve_algorithm
from crossdraft.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from crossdraft.protocol import TOKENS, Proposal
from crossdraft.runner import KVPool
from crossdraft.serving.channels import CHANNEL_OPTIONS, PLAINTEXT, TLS
from crossdraft.serving.drain import Drain
from crossdraft.serving.metrics import ServiceMetrics
from crossdraft.serving.models import dtype_name, load_warm, model_id
from crossdraft.serving.service import run_model_service, setup_logging
from crossdraft.serving.status import one_line
from crossdraft.serving.streams import decoupled
from crossdraft.serving.tokenizers import fetch_tokenizer
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

log = logging.getLogger("crossdraft.drafter_service")

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name
ALGORITHMS = ("same", "tli", "slem", "slrs")
# The drafter's settings, as the in-process engine's defaults (Engine.__init__), so that a session
# here drafts exactly what `crossdraft generate` drafts.
WINDOW, DRAFT_TOP_K, MIN_CONFIDENCE = 4, 0, 0.4
INFO_TIMEOUT_S = 10.0
DEFAULT_KV_SLOTS = 4  # per-session KV caches kept
DELTA_BUFFER = 64  # committed deltas queued for a caller that reads slowly, then the session waits


class DrafterSessions:
    """The drafter runner's per-session KV caches (`KVPool`, `kv_slots`) and the session count."""

    def __init__(self, runner, max_sessions: int = 16, metrics: Optional[ServiceMetrics] = None,
                 kv_slots: int = DEFAULT_KV_SLOTS):
        self.runner, self.max_sessions = runner, max_sessions
        self.metrics = metrics
        self.lock = threading.Lock()
        self.kv = KVPool(runner, kv_slots)
        self.active = 0
        self.misses = 0

    def acquire(self) -> None:
        with self.lock:
            if self.active >= self.max_sessions:
                raise ResourceExhausted(f"this drafter runs at most {self.max_sessions} sessions at once")
            self.active += 1

    def release(self, drafters) -> None:
        """The session ended: one session fewer, and its drafters' caches hold nothing."""
        with self.lock:
            self.active -= 1
            for d in drafters:
                self.kv.release(d.kv)

    def start(self, drafter: Drafter, prompt: str, ids: list, params) -> None:
        with self.lock:
            self.kv.activate(drafter.kv)  # an empty cache for it; the previous owner's is parked or evicted
            drafter.start(prompt, ids, params)

    def propose(self, drafter: Drafter, k: int) -> Proposal:
        with self.lock:
            rows = drafter.inter.rows if drafter.inter is not None else None
            if self.runner.pruned_rows is not rows:  # sessions of other modes share the runner
                self.runner.prune_head(rows)
            if not self.kv.activate(drafter.kv):  # a miss: its cache was evicted by other sessions
                self.misses += 1
                if self.metrics is not None:
                    self.metrics.kv_rebuild()
                drafter.kv_ids = []  # recomputed from the session's context at this draft
            return drafter.propose(k)


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, model: str, max_sessions: int = 16, metrics: Optional[ServiceMetrics] = None,
                 kv_slots: int = DEFAULT_KV_SLOTS, tls: TLS = PLAINTEXT):
        self.model = model
        self.tls = tls  # how it calls verifiers: TLS with the CA and its own certificate, or plaintext
        self.max_sessions, self.kv_slots = max_sessions, kv_slots
        self.metrics = metrics if metrics is not None else ServiceMetrics("drafter")
        self.sessions: Optional[DrafterSessions] = None  # set by load()
        self._channels: dict = {}  # verifier address -> channel
        self._vocabs: dict = {}  # target tokenizer fingerprint -> Vocab
        self._templates: dict = {}  # (fingerprint, mode) -> Drafter (copied per session)
        self.auto_memory = AutoMemory()  # what `auto` measured, per target tokenizer and decoding mode
        self._cache_lock = threading.Lock()
        self.drain = Drain("drafter")  # on SIGTERM: no new sessions, running ones handed back (serving/drain.py)

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self, device: Optional[str] = None, fast: bool = True) -> None:
        vocab, runner = load_warm(self.model, device, fast)
        self.vocab, self.runner = vocab, runner
        self.fingerprint = vocab.fingerprint()
        self.sessions = DrafterSessions(runner, self.max_sessions, metrics=self.metrics, kv_slots=self.kv_slots)

    def _ready(self) -> DrafterSessions:
        if self.sessions is None:
            raise Unavailable("the drafter's model is still loading")
        return self.sessions

    # --- the verifier's side: channel, tokenizer, drafters built against it -----------------------
    def _stub(self, address: str):
        with self._cache_lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = self.tls.channel(address, CHANNEL_OPTIONS, "verifier")
        return verifier_pb2_grpc.VerifierServiceStub(ch)

    def _target(self, address: str):
        """(stub, target Vocab, fingerprint) of the verifier at address."""
        stub = self._stub(address)
        try:
            info = stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"verifier {address} cannot be reached: {one_line(e.details() or '')}") from None
            raise
        fp = info.tokenizer_fingerprint
        with self._cache_lock:  # one fetch per tokenizer, even with sessions starting together
            vocab = self._vocabs.get(fp)
            if vocab is None:
                vocab = self._vocabs[fp] = fetch_tokenizer(stub, fp, address)
        return stub, vocab, fp

    def _template(self, fp: str, mode: str, target_vocab) -> Drafter:
        """The drafter for this target tokenizer and mode, built once: this is where an unbridgeable
        pair is found (FailedPrecondition)."""
        key = (fp, mode)
        with self._cache_lock:
            d = self._templates.get(key)
            if d is None:
                d = self._templates[key] = Drafter(self.runner, self.vocab, target_vocab, mode, DRAFT_TOP_K,
                                                   WINDOW, MIN_CONFIDENCE)
        return d

    # --- RPCs ---------------------------------------------------------------------------------
    def GetInfo(self, request, context):
        sessions = self._ready()
        return drafter_pb2.DrafterServiceGetInfoResponse(
            model_id=model_id(self.model), tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.runner.vocab_size, algorithms=[wire.algorithm_to_proto(a) for a in ALGORITHMS],
            max_context=self.runner.max_length, device=str(self.runner.device), dtype=dtype_name(self.runner),
            active_sessions=sessions.active, max_sessions=sessions.max_sessions)

    def RunSession(self, request, context):
        sessions = self._ready()
        self.drain.admit()
        yield from self.drain.hold(self._run_session(sessions, request, context))

    def _run_session(self, sessions: DrafterSessions, request, context):
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
                raise InvalidArgument(f"{name.replace('_', ' ')} must be in [1, {wire.MAX_TARGET_IDS}] (or 0: adaptive), got {v}")
        stub, target_vocab, fp = self._target(request.verifier_address)
        state = None
        if algorithm == "auto":  # measured, as in process (crossdraft/auto.py), per target and mode
            algos = auto_algorithms(params, target_vocab, self.vocab, lambda: self._template(fp, "tli", target_vocab))
            fixed = request.draft_tokens or None
            state = self.auto_memory.get((fp, mode_key(params), fixed), algos, (fixed,) if fixed else LENGTHS)
            state.begin_session()
            modes = state.algorithms_in_play()
            # The verifier needs a resolved algorithm to open the stream: the first this session runs.
            # It decides every round by the proposal's kind, so later rounds may run another.
            algo, why = modes[0], ""
        else:
            algo, why = resolve_algorithm(algorithm, params, target_vocab, self.vocab,
                                          lambda: self._template(fp, "tli", target_vocab), slrs=True)
            modes = [algo] if algo != "none" else []
        drafters = {m: self._template(fp, m, target_vocab).fork() for m in modes}
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
        self.metrics.session_started()
        done = SimpleNamespace(new_tokens=0, seconds=0.0, finished=False)  # filled in by _run
        try:
            # The round loop runs in a worker thread: sending a delta to the caller (which blocks until
            # the transport takes it) overlaps the next round instead of delaying it.
            yield from decoupled(
                lambda stop: self._run(stub, start, request.prompt, drafters, why, request.draft_tokens or None,
                                       context, done, stop, request.resume_draft_tokens or None, state),
                maxsize=DELTA_BUFFER, name=f"draft-{sid[:16]}")
        finally:
            sessions.release(list(drafters.values()))
            self.metrics.session_finished(done.new_tokens, done.seconds, done.finished)

    def _run(self, stub, start: wire.SessionStart, prompt: str, drafters: dict, why: str,
             draft_tokens: Optional[int], context, done: Optional[SimpleNamespace] = None,
             stop: Optional[threading.Event] = None, resume_k: Optional[int] = None, state=None):
        """The engine's loop (`Engine.generate`) with the verifier on the other end of a stream; `done`
        gets the session's new_tokens, seconds and finished (for the metrics). `drafters`: algorithm ->
        this session's Drafter (none: the target alone; several: `auto`, whose `state` picks each round's)."""
        m = self.metrics
        done = done if done is not None else SimpleNamespace()
        requests: "queue.SimpleQueue" = queue.SimpleQueue()

        def request_stream():
            while (msg := requests.get()) is not None:
                yield msg

        requests.put(verifier_pb2.VerifyRequest(start=wire.start_to_proto(start)))
        call = stub.Verify(request_stream())
        context.add_callback(call.cancel)  # the caller went away: end the Verify stream too
        finished = False
        algo_enum = wire.algorithm_to_proto(start.algorithm)
        try:
            committed_len = len(start.prompt_ids) + len(start.committed_ids)
            offset = len(start.committed_ids)
            t0 = time.perf_counter()
            for d in drafters.values():
                self.sessions.start(d, prompt, start.prompt_ids + start.committed_ids, start.params)
            lengths: dict = {}  # arm -> its DraftLength in this session

            def length_of(arm) -> DraftLength:
                k = lengths.get(arm)
                if k is None:
                    k = lengths[arm] = DraftLength(arm[1])
                    if resume_k is not None and arm[1] is None:  # a resumed session: where it left off
                        k.k = max(k.lo, min(k.hi, resume_k))
                return k

            arm = (next(iter(drafters)), draft_tokens) if drafters else None
            k = length_of(arm) if arm is not None else DraftLength(draft_tokens)
            drafter = last = None
            c = RoundStats()
            first = True
            # A round's delta goes to the caller once the next proposal is on its way, not before the
            # next draft: sending it (serialising, the gateway's commit to Redis, its reply to the
            # client) then runs while the verifier works and this process waits, instead of taking
            # the GIL and a core from the drafting. Costs the caller one draft of latency.
            pending = None
            while not finished:
                r0 = time.perf_counter()
                if state is not None and drafters:
                    arm = state.next_arm()
                    k = length_of(arm)
                drafter = drafters.get(arm[0]) if arm is not None else None
                if drafter is None:
                    proposal = Proposal(seq=committed_len, kind=TOKENS)  # none: the target alone
                else:
                    proposal = self.sessions.propose(drafter, k.k)
                sent = time.perf_counter_ns()
                requests.put(verifier_pb2.VerifyRequest(proposal=wire.proposal_to_proto(proposal)))
                if pending is not None:
                    yield pending
                    pending = None
                resp = next(call, None)
                if resp is None:
                    raise Unavailable("the verifier closed the session's stream before it finished")
                rtt = time.perf_counter_ns() - sent
                verdict = wire.verdict_from_proto(resp.verdict)
                if verdict.seq != committed_len:
                    raise Aborted(f"the verifier is at committed length {verdict.seq}, this drafter at {committed_len}")
                c.add(proposal, verdict)
                c.network_ns += max(0, rtt - verdict.verify_ns)
                m.round(verdict.candidates, verdict.accepted, len(verdict.ids), draft_ns=proposal.draft_ns,
                        network_ns=rtt - verdict.verify_ns, round_ns=proposal.draft_ns + rtt)
                committed_len += len(verdict.ids)
                finished = verdict.finished
                done.new_tokens = committed_len - len(start.prompt_ids) - len(start.committed_ids)
                done.seconds, done.finished = time.perf_counter() - t0, finished
                if drafter is not None and not finished:
                    drafter.observe(verdict)
                    for d in drafters.values():  # the others catch up when they next draft
                        if d is not drafter:
                            d.defer(verdict)
                    k.update(verdict.candidates, verdict.accepted)
                if state is not None and drafter is not None:
                    state.record(arm, len(verdict.ids), time.perf_counter() - r0, measured=drafter is last)
                    last = drafter
                    if len(drafters) > 1 and state.stage == "decided":  # the others are done with
                        drafters = {state.algorithm: drafters[state.algorithm]}
                if verdict.ids or finished:
                    seconds = time.perf_counter() - t0
                    stats = SimpleNamespace(
                        new_tokens=committed_len - len(start.prompt_ids) - len(start.committed_ids), rounds=c.rounds,
                        draft_tokens=c.draft_tokens, accepted_tokens=c.accepted_tokens, drafted=c.drafted,
                        accepted_by_position=c.accepted_by_position, seconds=seconds, profile=c.profile())
                    if state is not None:  # auto: the algorithm of this round; why, at the end
                        algo_enum = wire.algorithm_to_proto(arm[0] if arm is not None else "none")
                        why = state.explain() if finished else ""
                    msg = drafter_pb2.RunSessionResponse(
                        token_offset=offset, ids=verdict.ids, text=verdict.text, finished=finished,
                        finish_reason=wire.finish_reason_to_proto(verdict.finish_reason), algorithm=algo_enum,
                        why=why if first or state is not None else "",
                        stats=wire.stats_to_proto(stats, network_ns=c.network_ns),
                        next_draft_tokens=k.k, seal=resp.verdict.seal)
                    if finished or (stop is not None and stop.is_set()):
                        yield msg
                    else:
                        pending = msg
                    first = False
                    offset += len(verdict.ids)
                if stop is not None and stop.is_set():
                    break  # the caller went away
            log.info("session %s: %s, %d rounds, %d new tokens, %.3f s", start.session_id, start.algorithm,
                     c.rounds, committed_len - len(start.prompt_ids) - len(start.committed_ids),
                     time.perf_counter() - t0)
        finally:
            requests.put(None)  # half-close the Verify stream
            if not finished:
                call.cancel()


def serve(args) -> int:
    """`crossdraft serve drafter`: listen at once (health NOT_SERVING), load and warm the model,
    then SERVING until SIGTERM."""
    setup_logging()
    servicer = DrafterServicer(args.model, max_sessions=args.max_sessions, kv_slots=args.kv_slots,
                               tls=TLS.from_args(args))
    return run_model_service(SERVICE_NAME, drafter_pb2_grpc.add_DrafterServiceServicer_to_server, servicer, args, log)
