"""The verifier service: the target model behind `crossdraft.v1.VerifierService`.

Owns: converting messages (`crossdraft.wire`) and calling the core's `crossdraft.verifier.Verifier`,
one per session; the sessions table; the tokenizer files it hands to drafters.

Sessions, batching and memory. Each open session (one Verify stream) has its own `Verifier` (committed
ids and text, sampling parameters, limits) and its own KV cache, admitted under the KV budget
(`--kv-budget-mb`: a session reserves its prompt plus max_new_tokens positions, waits up to
`--kv-wait-seconds` for room, then RESOURCE_EXHAUSTED naming the limit; its cache grows as it is
used, up to that). Every session's prefill and rounds are programs run by the model's scheduler
(`crossdraft.batched.BatchedModel`): whatever rounds wait when the model is free go into one forward
pass, a long prompt's prefill in chunks of `--max-batch-tokens` (continuous batching); a stream whose
next proposal is already here (target steps, up to four in flight) has its next round run at once, in the scheduler's
thread (verifier_service/stream.py). A round's
outcome depends only on its session's logits and (seed, position) uniforms; batched matrix products may
round differently in the last bits from one sequence alone. Every verdict carries the verifier's load
(`Verdict.load`: sequences per pass and the fitted cost of a pass), from which drafters choose their
draft lengths (crossdraft/load.py).

A stale proposal (its seq is not the committed length) gets `wire.empty_verdict` without a forward
pass; a malformed one (it fails `wire.proposal_from_proto`'s checks) is ignored: that round is the
target's own step (counted in `crossdraft_bad_proposals_total`); neither touches the other sessions of
the batch. A Verify stream opened for a session that already has one takes it over (a failover: the
gateway resumed the session on another drafter, from the committed ids); the older stream's next
round is refused ABORTED, so a drafter that wakes up late cannot change anything. A stream that ends
before its session finished leaves the session's state parked for `PARK_S` (its KV cache and reservation;
parked sessions give way, oldest first, to new ones that need the room): the next stream of the session,
from a prefix of what it had (the committed ids), takes it up without a prefill. That is how the gateway
takes a session's target steps over from its drafter and hands them back (docs/serving.md), and how a
drafter failover resumes. The trust boundary
stays in the core: a proposal can make a round commit fewer tokens, never different ones.

Never: drafts, decides acceptance itself, or imports anything of the drafter.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Optional

from crossdraft import wire
from crossdraft.batched import BatchedModel, Limits, prime_cost
from crossdraft.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable, Unimplemented
from crossdraft.protocol import TOKENS, Proposal
from crossdraft.seal import Sealer, sealer_from_args
from crossdraft.serving.drain import Drain
from crossdraft.serving.metrics import ServiceMetrics
from crossdraft.serving.models import dtype_name, load_warm, model_id
from crossdraft.serving.service import run_model_service, setup_logging
from crossdraft.v1 import verifier_pb2, verifier_pb2_grpc
from crossdraft.verifier import Verifier
from verifier_service.stream import StreamRounds

log = logging.getLogger("crossdraft.verifier_service")

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name
CHUNK_BYTES = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "config.json",
                   "generation_config.json")  # its eos_token_id ends generations too (Vocab.load)
ALGORITHMS = ("same", "tli", "slem", "slrs", "none")
# Verdicts computed but not yet sent, per stream: a drafter that sends proposals without reading
# verdicts stalls its own session here instead of growing the verifier's memory. At least the target
# steps a stream keeps in flight (protocol.STEPS_IN_FLIGHT).
VERDICT_BUFFER = 8
# How long the state of a session whose stream ended unfinished stays here for the next stream of it (a
# gateway taking the session's steps over from its drafter, a drafter failover): seconds. Its KV cache
# is kept, so the next stream starts without a prefill; it gives way to new sessions that need the room.
PARK_S = 30.0


class TargetSessions:
    """Open sessions over the one target model: per-session `Verifier` and KV cache (admitted under
    the model's KV budget), their programs batched by the model's scheduler."""

    def __init__(self, model: BatchedModel, vocab, window: int = 4, park_s: float = PARK_S):
        self.model, self.vocab, self.window = model, vocab, window
        self.runner = model.runner
        self.max_sessions = model.limits.max_sessions
        self.lock = threading.Lock()
        self.sessions: dict = {}  # session id -> (Verifier, bytes reserved)
        self.opening = 0  # sessions being admitted and prefilled
        # session id -> (Verifier, bytes reserved, until): sessions whose stream ended unfinished, oldest first
        self.parked: dict = {}
        self.park_s = park_s

    def __len__(self):
        return len(self.sessions)

    def open(self, start: wire.SessionStart) -> Verifier:
        """A session: validated against the model, admitted under the KV budget, prefilled; or, when an
        earlier stream of it left its state parked here and the start's ids continue it, that state taken
        up again without a prefill (`close` parks it)."""
        sid = start.session_id
        ids = start.prompt_ids + start.committed_ids
        with self.lock:
            old = self.sessions.pop(sid, None)
            parked, expired = self.parked.pop(sid, None), self._expired()
            if old is not None:  # a failover: the new stream takes the session over (see `verify`)
                expired.append(old[1])
                log.info("session %s: a new Verify stream takes it over from the previous one", sid)
            if len(self.sessions) + self.opening >= self.max_sessions:
                expired += [parked[1]] if parked is not None else []
                self._release(expired)
                raise ResourceExhausted(f"this verifier serves at most {self.max_sessions} sessions at once "
                                        "(--max-sessions)")
            self.opening += 1
        self._release(expired)
        reserved = 0
        try:
            if parked is not None:
                v, reserved = parked[0], parked[1]
                if v.cache.limit >= len(ids) + start.remaining and v.resume(ids, start.remaining, start.params):
                    log.debug("session %s: taken up from its parked state at %d ids, no prefill", sid, len(ids))
                    with self.lock:
                        self.sessions[sid] = (v, reserved)
                    return v
                self.model.release(reserved)
                reserved = 0
            v = Verifier(self.runner, self.vocab, self.window)
            v.open(ids, start.remaining, start.params)
            self._make_room(len(ids) + start.remaining)
            reserved = self.model.admit(v.cache, len(ids) + start.remaining)
            self.model.run(v.prefill())
            with self.lock:
                self.sessions[sid] = (v, reserved)
            return v
        except BaseException:
            if reserved:
                self.model.release(reserved)
            raise
        finally:
            with self.lock:
                self.opening -= 1

    def round(self, sid: str, proposal, mine: Optional[Verifier] = None):
        """Program (crossdraft/scheduler.py): a round of session `sid` -> its Verdict. `mine`, the
        stream's own `Verifier`: if another stream took the session over meanwhile, this (older) stream
        is refused ABORTED. A stale proposal gets an empty verdict without a forward pass."""
        with self.lock:
            entry = self.sessions.get(sid)
        if entry is None or (mine is not None and entry[0] is not mine):
            raise Aborted(f"session {sid!r} was taken over by a newer Verify stream")
        v = entry[0]
        if wire.stale(proposal, v.ids):
            return wire.empty_verdict(len(v.ids))  # no forward pass
        verdict = yield from v.round(proposal)
        verdict.load = self.model.cost.hint()
        return verdict

    def stale_verdict(self, sid: str, proposal, mine: Verifier):
        """The empty verdict of a stale proposal of `sid`, answered without a program (`StreamRounds.put`,
        while none of this stream's rounds runs, so its committed ids cannot move); None if the proposal is
        not stale or the stream is no longer the session's (its round then says so, as `round` does)."""
        with self.lock:
            entry = self.sessions.get(sid)
        if entry is None or entry[0] is not mine or not wire.stale(proposal, mine.ids):
            return None
        return wire.empty_verdict(len(mine.ids))

    def close(self, sid: str, mine: Optional[Verifier] = None) -> None:
        """A stream of `sid` ended (after its last round): a finished session's cache goes, an unfinished
        one's is parked for the next stream of it (`park_s`)."""
        with self.lock:
            entry = self.sessions.get(sid)
            if entry is None or (mine is not None and entry[0] is not mine):
                return  # taken over: the session (and its reservation) now belong to the newer stream
            del self.sessions[sid]
            gone = self._expired()
            if entry[0].finished or self.park_s <= 0:
                gone.append(entry[1])
            else:
                self.parked[sid] = (entry[0], entry[1], time.monotonic() + self.park_s)
        self._release(gone)

    def _expired(self) -> list:
        """(Under the lock.) The reservations of parked sessions whose time is up, taken out."""
        now = time.monotonic()
        gone = [sid for sid, (_, _, until) in self.parked.items() if until <= now]
        return [self.parked.pop(sid)[1] for sid in gone]

    def _make_room(self, positions: int) -> None:
        """Parked sessions give way, the oldest first, to a session that needs their room."""
        budget = self.model.budget
        need = positions * budget.per_token
        while True:
            with self.lock:
                if not self.parked or budget.reserved + need <= budget.budget:
                    return
                gone = self.parked.pop(next(iter(self.parked)))[1]
            self.model.release(gone)

    def _release(self, reservations: list) -> None:
        for reserved in reservations:
            self.model.release(reserved)

    def usage(self) -> dict:
        with self.lock:
            caches = [e[0].cache for e in (*self.sessions.values(), *self.parked.values())]
            parked = len(self.parked)
        return dict(self.model.usage(caches), parked=parked)


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    """Thin: messages in, the core's Verifier, messages out. Errors are raised as CrossdraftError and
    mapped to status codes by `crossdraft.serving.status.ErrorInterceptor`."""

    def __init__(self, model: str, limits: Limits = Limits(), metrics: Optional[ServiceMetrics] = None,
                 sealer: Optional[Sealer] = None, max_model_len: Optional[int] = None):
        self.model = model
        self.sealer = sealer  # seals every verdict for the gateway (crossdraft/seal.py); None: unsealed
        self.limits, self.max_model_len = limits, max_model_len
        self.max_sessions = limits.max_sessions
        self.metrics = metrics if metrics is not None else ServiceMetrics("verifier")
        self.sessions: Optional[TargetSessions] = None  # set by load()
        self._tmp = None
        self.drain = Drain("verifier")  # on SIGTERM: no new sessions, running ones handed back (serving/drain.py)

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self, device: Optional[str] = None, fast: bool = True, dtype=None, kv_dtype=None) -> None:
        vocab, runner = load_warm(self.model, device, fast, dtype, max_length=self.max_model_len, kv_dtype=kv_dtype)
        self.vocab, self.runner = vocab, runner
        self.fingerprint = vocab.fingerprint()
        self.tokenizer_files = self._tokenizer_files(vocab)
        # every open session submits a round after each verdict: the scheduler gathers them (scheduler.py)
        model = BatchedModel(runner, self.limits, "verifier", observer=self.metrics.batch,
                             expected=lambda: len(self.sessions) + self.sessions.opening if self.sessions else 0)
        prime_cost(model.cost, runner)  # the load it reports has a price from the first session on
        self.metrics.kv_budget(model.budget.budget)
        self.sessions = TargetSessions(model, vocab)

    def _tokenizer_files(self, vocab) -> list:
        """[(file name, path)]: the tokenizer files of the model directory, or (a Hub id) the
        loaded tokenizer saved once to a temporary directory."""
        d = os.path.expanduser(self.model)
        if not (os.path.isdir(d) and os.path.isfile(os.path.join(d, "tokenizer_config.json"))):
            self._tmp = tempfile.TemporaryDirectory(prefix="crossdraft-tokenizer-")
            vocab.hf.save_pretrained(self._tmp.name)
            d = self._tmp.name
            if vocab.eos_ids != vocab.own_eos_ids:  # the EOS of the Hub model's generation_config.json
                with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as f:
                    json.dump({"eos_token_id": sorted(vocab.eos_ids)}, f)
        return [(n, os.path.join(d, n)) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(d, n))]

    def _ready(self) -> TargetSessions:
        if self.sessions is None:
            raise Unavailable("the verifier's model is still loading")
        return self.sessions

    # --- RPCs ---------------------------------------------------------------------------------
    def GetInfo(self, request, context):
        sessions = self._ready()
        return verifier_pb2.VerifierServiceGetInfoResponse(
            model_id=model_id(self.model), tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.runner.vocab_size, algorithms=[wire.algorithm_to_proto(a) for a in ALGORITHMS],
            max_context=self.runner.max_length, eos_ids=sorted(self.vocab.eos_ids),
            device=str(self.runner.device), dtype=dtype_name(self.runner),
            active_sessions=len(sessions), max_sessions=sessions.max_sessions,
            cache=wire.cache_usage_to_proto(sessions.usage()))

    def GetTokenizer(self, request, context):
        self._ready()
        for name, path in self.tokenizer_files:
            with open(path, "rb") as f:
                data = f.read()
            for off in range(0, max(len(data), 1), CHUNK_BYTES):
                yield verifier_pb2.GetTokenizerResponse(file_name=name, offset=off, data=data[off: off + CHUNK_BYTES],
                                                        size=len(data), tokenizer_fingerprint=self.fingerprint)

    def Verify(self, request_iterator, context):
        sessions = self._ready()
        self.drain.admit()
        yield from self.drain.hold(self._verify(sessions, request_iterator, context))

    def _verify(self, sessions: TargetSessions, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("message") != "start":
            raise InvalidArgument("the first request of a Verify stream must carry a start")
        start = wire.start_from_proto(first.start)
        if not start.prompt_ids:  # the prompt as text (a gateway running the session on the verifier alone)
            start.prompt_ids = self.vocab.encode_prompt(start.prompt)
            if not start.prompt_ids:
                raise InvalidArgument("the prompt is empty")
        if start.algorithm not in ALGORITHMS:
            raise Unimplemented(f"algorithm {start.algorithm!r} is not implemented yet")
        t0 = time.perf_counter()
        try:
            v = sessions.open(start)
        finally:
            self.metrics.kv_usage(sessions.model.budget.usage())
        m = self.metrics
        m.session_started()
        rounds = 0

        rounds_q = StreamRounds(sessions, start.session_id, v, VERDICT_BUFFER)
        stop = threading.Event()

        reader = threading.Thread(target=self._read, args=(request_iterator, rounds_q, stop, start.session_id),
                                  name=f"verify-{start.session_id[:16]}", daemon=True)
        reader.start()

        def verdicts():
            nonlocal rounds
            while True:
                verdict = rounds_q.get()
                if verdict is None:
                    return
                rounds += 1
                m.round(verdict.candidates, verdict.accepted, len(verdict.ids), verify_ns=verdict.verify_ns)
                if verdict.alternative:
                    m.alternative()
                msg = wire.verdict_to_proto(verdict)
                if self.sealer is not None:
                    msg.seal = self.sealer.seal(start.session_id, verdict.seq - len(start.prompt_ids), verdict.ids,
                                                verdict.text, verdict.finished, verdict.finish_reason)
                yield verifier_pb2.VerifyResponse(verdict=msg)
                if verdict.finished:
                    return

        try:
            yield from verdicts()
        finally:
            stop.set()
            rounds_q.close()
            sessions.close(start.session_id, mine=v)
            m.kv_usage(sessions.model.budget.usage())
            m.session_finished(len(v.ids) - len(start.prompt_ids) - len(start.committed_ids),
                               time.perf_counter() - t0, finished=bool(v.finish_reason))
            log.info("session %s: %d rounds, %d new tokens, %s, %.3f s", start.session_id, rounds,
                     len(v.ids) - len(start.prompt_ids) - len(start.committed_ids),
                     v.finish_reason or "not finished", time.perf_counter() - t0)


    def _read(self, request_iterator, rounds_q: StreamRounds, stop: threading.Event, sid: str) -> None:
        """A Verify stream's requests after its start, in a worker thread: each proposal queued for the
        scheduler (stream.py), until the requests end, fail, or `stop`."""
        bad_logged, err = 0, None
        try:
            for req in request_iterator:
                if req.WhichOneof("message") != "proposal":
                    raise InvalidArgument("every request after the first of a Verify stream must carry a proposal")
                try:
                    proposal = wire.proposal_from_proto(req.proposal, vocab_size=self.runner.vocab_size)
                except InvalidArgument as e:
                    # A malformed proposal (ids out of range, NaN or unnormalised q, oversized text, ...)
                    # is ignored, not fatal: this round is the target's own step, so a buggy or hostile
                    # drafter slows its session down and changes nothing.
                    self.metrics.bad_proposal()
                    if bad_logged < 3:
                        log.warning("session %s: ignored a malformed proposal: %s", sid, e)
                    bad_logged += 1
                    proposal = Proposal(seq=int(req.proposal.seq), kind=TOKENS)
                if stop.is_set() or not rounds_q.put(proposal, stop):
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the handler's thread
            err = e
        rounds_q.end(err)


def serve(args) -> int:
    """`crossdraft serve verifier`: listen at once (health NOT_SERVING), load and warm the model,
    then SERVING until SIGTERM."""
    setup_logging()
    servicer = VerifierServicer(args.model, Limits.from_args(args), sealer=sealer_from_args(args),
                                max_model_len=args.max_model_len or None)
    return run_model_service(SERVICE_NAME, verifier_pb2_grpc.add_VerifierServiceServicer_to_server, servicer, args, log)

