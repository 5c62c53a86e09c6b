"""The gateway: `crossdraft.v1.GatewayService`, the client-facing API.

Owns: validating a client's request (before anything is written), placing a session (a drafter member by
least load, a verifier member by session affinity: `pool.py`), creating it in the session store, running it
(one `DrafterService.RunSession` call per session, in a background thread, so that a generation goes
on when its client goes away; a session of the target alone, `none`, on a Verify stream of its own, with
no drafter: `_verifier_alone`), appending every committed delta to the session with
`store.commit(expected_len, ...)`, and serving the session's event stream from the store to clients
(`Generate`, `AttachSession`: both follow the store's events, so any gateway replica can serve them).

Session state lives in the store only, the final statistics too (resolved algorithm, why, timings:
the final commit's `result`), so any replica reports the same end. This process keeps, besides its
pools' load counts, only the handles of the RunSession calls it runs (so `CancelSession` can stop them
at once; a session run by another replica stops at its next commit, which the cancelled status refuses).

A request refused by validation writes nothing: the gateway's own checks (prompt size,
max_new_tokens, algorithm, sampling parameters, draft length, session id, concurrent sessions) run
before the session is created, and a refusal by the drafter or the verifier before the first commit
(INVALID_ARGUMENT, FAILED_PRECONDITION, UNIMPLEMENTED: a prompt longer than the target's context, a
pair that cannot be bridged) deletes the session again and returns that status. Any other failure
before the first commit returns its status and leaves the session `failed`; a failure after it ends
the stream with FINISH_REASON_ERROR and its message.

Failover (docs/pools.md): a drafter member that fails (dies, hangs, or hands its sessions back while it
drains) moves only its own sessions, each to another member of its pool, resumed from the committed
ids on the verifier its affinity gives now; a session runs on the verifier alone only when no drafter is
left, and its end says so.

Handed back (docs/serving.md): a drafter whose session's drafting the verifier's load has cut to nothing
ends the call with `handed_back` (the gateway allows it: `may_hand_back`), and the gateway steps the
session on the verifier itself (`_verifier_alone`, the verifier takes the parked session up without a
prefill) until the verifier's load falls below what the drafter said drafting would pay at
(`come_back_below`), or for `HAND_BACK_STEPS` tokens, twice as many at each later hand-back up to
`HAND_BACK_STEPS_MAX`; then the session goes back to its drafter, which measures again. New sessions of
a kind that was handed back start on the verifier while its load stays above that (`handback.py`).

Text: the drafter commits raw bytes; clients get valid UTF-8 (an incomplete character held back, an
invalid byte replaced as the engine's `decode(errors="replace")` does), and byte offsets count the
UTF-8 of that text.

Never: drafts, verifies, or touches models.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import grpc
from google.protobuf import json_format

from crossdraft import wire
from crossdraft.errors import Aborted, CrossdraftError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from crossdraft.load import SHARED
from crossdraft.seal import Sealer, sealer_from_args
from crossdraft.serving.channels import TLS, check_plaintext, is_loopback
from crossdraft.serving.drain import draining_role
from crossdraft.serving.metrics import ServiceMetrics
from crossdraft.serving.service import Service, setup_logging
from crossdraft.serving.status import status_of
from crossdraft.stops import check_stops
from crossdraft.store import COUNTERS, AlreadyExists, Conflict, MemoryStore, SessionClosed, SessionStore
from crossdraft.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .auth import ApiKeys, KeyLimits, caller_of, load_keys
from .handback import HAND_BACK_STEPS, HAND_BACK_STEPS_MAX, HandBacks
from .steps import TargetSteps
from .membership import DNS_REFRESH_S, sources_for, wait_synced
from .pool import HEALTH_S, Pool, parse_addresses
from .stops import SessionStops, Stopped

log = logging.getLogger("crossdraft.gateway")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
MAX_PROMPT_BYTES = 256 << 10
MAX_NEW_TOKENS = 100_000  # as the CLI's limit; the verifier checks the target's context too
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
# Failover: a RunSession that fails with one of these (or sends nothing for DELTA_TIMEOUT_S: a hung
# drafter or verifier) is resumed from the committed ids on another drafter, for up to FAILOVER_S.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.CANCELLED})
DELTA_TIMEOUT_S = 10.0  # the longest a running session waits for its drafter's next delta
FIRST_DELTA_FACTOR = 3  # ... times this for the first one (the drafter may fetch a tokenizer, both prefill)
FAILOVER_S = 120.0
STORE_WAIT_S = 30.0  # how long a commit is retried while the session store is unreachable
LEASE_S = 30.0  # a running session nobody committed to for this long is taken over by a replica it is attached to
SLOW_CLIENT_S = 30.0  # a streaming client that takes no message for this long is cut (see `_paced`)
SYNC_WAIT_S = 10.0  # how long `serve` waits for the first answer of the pools' dynamic sources
SLOW_CLIENT_GRACE_S = 60.0  # ... and if it takes nothing for this long more, its call is cancelled
FOLLOW_BLOCK_MS = 500  # how long one read of the event stream waits before checking the client is still there
_STATUS = {"queued": gateway_pb2.SESSION_STATUS_PENDING, "running": gateway_pb2.SESSION_STATUS_RUNNING}


def _reason(name: str) -> int:
    try:
        return wire.finish_reason_to_proto(name)
    except InvalidArgument:
        return common_pb2.FINISH_REASON_UNSPECIFIED


class _StoreDown(Unavailable):
    """The session store stayed unreachable through a commit's retries: not a drafter's fault, so no
    failover; the session stops on this replica."""


@dataclass
class _Run:
    """One session's run on this replica: where it is (committed ids and length, the last draft length),
    the drafter it runs on (None: the verifier alone), the members it failed on, its deadline timer."""
    sid: str
    req: dict
    started: Future
    drafter: Optional[str]
    give_up: float
    ids: list = field(default_factory=list)
    length: int = 0
    k_next: int = 0
    why: str = ""
    finished: bool = False
    first: bool = True
    backoff: float = 0.25
    tried: set = field(default_factory=set)
    timer: Optional[threading.Timer] = None
    t0: float = field(default_factory=time.monotonic)
    steps_left: int = 0  # handed back by its drafter: target steps to run on the verifier before going back
    handbacks: int = 0
    come_back_below: float = 0.0  # handed back: going back once the verifier's sequences per pass fall below

    @property
    def params(self):
        from crossdraft.sampling import SamplingParams

        p = self.req["params"]
        return SamplingParams(p["temperature"], p["top_k"], p["top_p"], p["seed"])


class _Watchdog:
    """One thread per gateway that cancels a drafter call which sends nothing before its deadline
    (a hung drafter: SIGSTOP, a stuck verifier). Entries are [deadline, call, fired]."""

    def __init__(self, tick_s: float = 0.2):
        self._lock = threading.Lock()
        self._entries: list = []
        self._tick = tick_s
        self._thread: Optional[threading.Thread] = None

    def watch(self, call, seconds: float) -> list:
        entry = [time.monotonic() + seconds, call, False]
        with self._lock:
            self._entries.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="drafter-watchdog", daemon=True)
                self._thread.start()
        return entry

    @staticmethod
    def kick(entry: list, seconds: float) -> None:
        entry[0] = time.monotonic() + seconds

    def unwatch(self, entry: list) -> None:
        with self._lock:
            if entry in self._entries:
                self._entries.remove(entry)

    def _loop(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                late = [e for e in self._entries if not e[2] and now > e[0]]
            for e in late:
                e[2] = True
                e[1].cancel()


class _SlowClient:
    """A streaming client that stopped taking messages, as the watchdog sees it (`_paced`).

    gRPC holds the handler's thread in its send while the client's window is full, and its public API
    ends such a call only with CANCELLED (`ServicerContext.cancel`): a status of our own can only be
    raised by the handler, once gRPC hands it control again. Hence two steps:
    1. the watchdog's first `cancel`, when a message was not taken within `slow_client_s`: the stream is
       cut. Logged and counted now; the handler raises RESOURCE_EXHAUSTED with the message as soon as the
       client reads again (`check`): it gets what was already on its way, then the status.
    2. its second, `SLOW_CLIENT_GRACE_S` later if the client still took nothing: the call is cancelled
       (the client, should it ever read, sees CANCELLED), which frees the handler's thread."""

    def __init__(self, servicer: "GatewayServicer", sid: str, context):
        self.servicer, self.sid, self.context = servicer, sid, context
        self.cut = False
        self._grace: Optional[list] = None  # the watchdog's entry for step 2
        self._over = False  # the stream ended: nothing more to watch
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """The watchdog's call: step 1, then step 2."""
        s = self.servicer
        with self._lock:
            if self._over:
                return
            step2, self.cut = self.cut, True
            if not step2:
                self._grace = s._watchdog.watch(self, SLOW_CLIENT_GRACE_S)
        if step2:
            log.warning("session %s: the client took nothing for %g s more; its call is cancelled",
                        self.sid, SLOW_CLIENT_GRACE_S)
            self.context.cancel()
            return
        s.metrics.slow_client()
        log.warning("session %s: the client took no message for %g s; its stream is cut, the session goes on",
                    self.sid, s.slow_client_s)

    def check(self) -> None:
        """The client took a message: RESOURCE_EXHAUSTED if its stream was cut meanwhile."""
        with self._lock:
            cut = self.cut
        if cut:
            raise ResourceExhausted(
                f"the client read nothing for {self.servicer.slow_client_s:g} s, so the gateway cut its stream; the "
                f"session goes on: re-attach with AttachSession({self.sid}, offset = the bytes you have)")

    def done(self) -> None:
        """The stream ended (or was closed): nothing of it stays watched."""
        with self._lock:
            self._over, grace, self._grace = True, self._grace, None
        if grace is not None:
            self.servicer._watchdog.unwatch(grace)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, store: SessionStore, drafters: Pool, verifiers: Pool, max_sessions: int = 64,
                 max_prompt_bytes: int = MAX_PROMPT_BYTES, max_new_tokens: int = MAX_NEW_TOKENS,
                 owner: str = "", metrics: Optional[ServiceMetrics] = None, delta_timeout_s: float = DELTA_TIMEOUT_S,
                 failover_s: float = FAILOVER_S, lease_s: float = LEASE_S, store_wait_s: float = STORE_WAIT_S,
                 keys: Optional[ApiKeys] = None, limits: Optional[KeyLimits] = None, sealer: Optional[Sealer] = None,
                 slow_client_s: float = SLOW_CLIENT_S, hand_back: bool = True):
        self.store, self.drafters, self.verifiers = store, drafters, verifiers
        self.hand_back = hand_back  # drafters may hand a session back (and new ones may start direct): handback.py
        # with a sealer (--verdict-key-file), a drafter's delta is committed only with the verifier's seal
        # on it (crossdraft/seal.py): drafters relay the output, they cannot change it
        self.sealer = sealer
        # API keys (auth.py): None is an open gateway; with keys, a session belongs to the key that created
        # it (its name in the request as `key_name`) and any other key is told NOT_FOUND
        self.keys, self.limits = keys, limits
        self.metrics = metrics if metrics is not None else ServiceMetrics("gateway")
        self.delta_timeout_s, self.failover_s, self.lease_s = delta_timeout_s, failover_s, lease_s
        self.store_wait_s, self.slow_client_s = store_wait_s, slow_client_s
        self.first_delta_timeout_s = FIRST_DELTA_FACTOR * delta_timeout_s
        self._watchdog = _Watchdog()
        self.handbacks = HandBacks()  # where drafting stopped paying, and the verifiers' load (handback.py)
        self.max_sessions, self.max_prompt_bytes, self.max_new_tokens = max_sessions, max_prompt_bytes, max_new_tokens
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self._active = 0
        self._calls: dict = {}  # session id -> its RunSession call, while this process runs it
        self.stops = SessionStops(store)  # stop strings, applied to each delta before it is committed

    # --- validation -----------------------------------------------------------------------------
    def _request(self, spec: gateway_pb2.GenerationSpec) -> dict:
        """A GenerationSpec -> the request dict stored with the session; raises before anything is written."""
        prompt_bytes = len(spec.prompt.encode("utf-8"))
        if not spec.prompt:
            raise InvalidArgument("the prompt is empty")
        if prompt_bytes > self.max_prompt_bytes:
            raise InvalidArgument(f"the prompt is {prompt_bytes} bytes, at most {self.max_prompt_bytes} allowed")
        if not 1 <= spec.max_new_tokens <= self.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens must be in [1, {self.max_new_tokens}], got {spec.max_new_tokens}")
        algorithm = wire.algorithm_from_proto(spec.algorithm)
        params = wire.sampling_params_from_proto(spec.params if spec.HasField("params") else None)
        if spec.draft_tokens and not 1 <= spec.draft_tokens <= wire.MAX_TARGET_IDS:
            raise InvalidArgument(f"draft_tokens must be in [1, {wire.MAX_TARGET_IDS}] (or 0: adaptive), "
                                  f"got {spec.draft_tokens}")
        stops = check_stops(list(spec.stop_strings))
        return {"prompt": spec.prompt, "max_new_tokens": spec.max_new_tokens, "algorithm": algorithm,
                "params": {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                           "seed": params.seed},
                "draft_tokens": spec.draft_tokens, "model": spec.model, "drafter": spec.drafter,
                **({"stop": stops} if stops else {})}

    @staticmethod
    def _spec(req: dict) -> gateway_pb2.GenerationSpec:
        p = req.get("params", {})
        return gateway_pb2.GenerationSpec(
            prompt=req.get("prompt", ""), max_new_tokens=req.get("max_new_tokens", 0),
            params=common_pb2.SamplingParams(temperature=p.get("temperature", 0.0), top_k=p.get("top_k", 0),
                                             top_p=p.get("top_p", 1.0), seed=p.get("seed", 0)),
            algorithm=wire.algorithm_to_proto(req.get("algorithm", "auto")),
            draft_tokens=req.get("draft_tokens", 0), model=req.get("model", ""), drafter=req.get("drafter", ""),
            stop_strings=req.get("stop", []))

    # --- running a session ----------------------------------------------------------------------
    def _start(self, session_id: str, req: dict) -> Future:
        """Place and create the session, start its run; the future resolves at its first commit (or end),
        or raises the refusal/failure that happened before it."""
        with self._lock:
            if self._active >= self.max_sessions:
                raise ResourceExhausted(f"this gateway runs at most {self.max_sessions} sessions at once")
            self._active += 1
        drafter = None
        try:
            verifier = self.verifiers.pick_by_affinity(session_id, req["model"])
            drafter = self._drafter_for(req)
            req = dict(req, drafter_address=drafter, verifier_address=verifier)
            self.store.create(session_id, req, owner=self.owner)
        except BaseException:
            if drafter is not None:
                self.drafters.release(drafter)
            with self._lock:
                self._active -= 1
            raise
        self.metrics.session_started()
        started: Future = Future()
        threading.Thread(target=self._run, args=(session_id, req, started), name=f"session-{session_id}",
                         daemon=True).start()
        return started

    def _run(self, sid: str, req: dict, started: Future, resume: bool = False) -> None:
        """Run the session to its end: one RunSession call, and after a failure of the drafter or the
        verifier (UNAVAILABLE, a broken stream, a drafter silent for `delta_timeout_s`: see `_Watchdog`,
        a drafter handing its sessions back as it drains) another, on another member of the pool, resumed
        from the committed ids and the last draft length; the verifier alone when no drafter is left; a
        session that cannot go on within `failover_s` fails. `resume`: take up a session this process
        claimed (its ids are in the store)."""
        r = self._begin_run(sid, req, started, resume)
        try:
            while not r.finished:
                if r.drafter is None or r.steps_left:  # no drafter left to try, or handed back: the verifier
                    self._run_alone(r)
                else:
                    self._run_on_drafter(r)
        except SessionClosed:  # cancelled (here or on another replica): the store has its final event
            pass
        except _StoreDown as e:  # not marked failed: its committed part waits in the store for a takeover
            log.warning("session %s: stopped here, %s; a replica takes it over when a client attaches", sid, e)
            if not started.done():
                started.set_exception(e)
        except Exception as e:  # noqa: BLE001 - every failure ends the session with a status
            cancelled = isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED
            if not (cancelled and self._is_cancelled(sid)):
                self._fail(sid, e, started)
        finally:
            self._end_run(r)

    def _begin_run(self, sid: str, req: dict, started: Future, resume: bool) -> "_Run":
        """The run's state: the committed ids when resuming, the client's deadline timer."""
        r = _Run(sid=sid, req=req, started=started, drafter=req["drafter_address"],
                 give_up=time.monotonic() + self.failover_s)
        if resume:
            s = self.store.get(sid, include_output=True)
            r.ids, r.length, r.k_next = list(s.ids), s.length, int(s.resume.get("draft_tokens", 0))
        elif self.hand_back and r.drafter is not None and (below := self.handbacks.start_direct(req)) is not None:
            # sessions like it were handed back at this verifier's load: start as they go on (handback.py)
            r.steps_left, r.come_back_below, r.handbacks = HAND_BACK_STEPS, below, 1
        if req.get("deadline_unix"):
            r.timer = threading.Timer(max(0.0, req["deadline_unix"] - time.time()), self._expire, args=(sid,))
            r.timer.daemon = True
            r.timer.start()
        return r

    def _end_run(self, r: "_Run") -> None:
        if r.timer is not None:
            r.timer.cancel()
        with self._lock:
            self._calls.pop(r.sid, None)
            self._active -= 1
        if r.drafter is not None:
            self.drafters.release(r.drafter)
        seconds = time.monotonic() - r.t0
        self.metrics.session_finished(r.length, seconds, r.finished)
        self.metrics.session_time(seconds)
        if not r.started.done():
            r.started.set_result(None)

    def _run_on_drafter(self, r: "_Run") -> None:
        """One RunSession call on `r.drafter`, committing its deltas; on a failure that a failover can
        cure, `r.drafter` becomes the next member to try (None: the verifier alone)."""
        call = entry = None
        try:
            run = wire.session_request(r.req["verifier_address"], r.req["prompt"], r.req["max_new_tokens"],
                                       r.params, r.req["algorithm"], r.req["draft_tokens"] or None, session_id=r.sid,
                                       committed_ids=r.ids, resume_draft_tokens=r.k_next,
                                       may_hand_back=self.hand_back)
            call = self.drafters.drafter_stub(r.drafter).RunSession(run)
            with self._lock:
                self._calls[r.sid] = call
            if self.store.cancelled(r.sid):  # cancelled while being placed
                call.cancel()
            entry = self._watchdog.watch(call, self.first_delta_timeout_s)
            prev = dict.fromkeys(COUNTERS, 0)  # a call's statistics count that call only
            for msg in call:
                self._watchdog.kick(entry, self.delta_timeout_s)
                if msg.handed_back:
                    self._handed_back(r, msg)
                    return
                prev = self._commit_delta(r, msg, prev)
                if r.finished:
                    return
            raise Unavailable(f"drafter {r.drafter} ended the session's stream before it finished")
        except (SessionClosed, Conflict, _StoreDown):
            raise
        except Exception as e:  # noqa: BLE001 - decide: fail over, or fail
            hung = entry is not None and entry[2]
            code = grpc.StatusCode.DEADLINE_EXCEEDED if hung else status_of(e)[0]
            if code == grpc.StatusCode.CANCELLED and self._is_cancelled(r.sid):
                raise
            if code not in FAILOVER_CODES or (not r.started.done() and code in REFUSALS) \
                    or time.monotonic() > r.give_up:
                raise
            what = f"sent nothing for {self.delta_timeout_s:g} s" if hung else f"{code.name}: {status_of(e)[1]}"
            if not hung and draining_role(status_of(e)[1]) == "verifier":
                self._verifier_drains(r)  # the drafter is not at fault: it stays
            else:
                r.drafter = self._fail_over(r, what)
        finally:
            if entry is not None:
                self._watchdog.unwatch(entry)
            if call is not None and not r.finished:
                call.cancel()

    def _commit_delta(self, r: "_Run", msg, prev: dict) -> dict:
        """Check one RunSession delta (its offset, the verifier's seal) and commit it. -> the call's
        statistics so far (the next delta's increments are counted against them)."""
        if msg.token_offset != len(r.ids):
            raise Aborted(f"drafter {r.drafter} sent a delta at offset {msg.token_offset}, expected {len(r.ids)}")
        now = {k: getattr(msg.stats, k) for k in COUNTERS}
        inc = {k: max(0, now[k] - prev[k]) for k in COUNTERS}
        r.why = r.why or msg.why
        reason = wire.finish_reason_from_proto(msg.finish_reason) if msg.finished else ""
        if self.sealer is not None and not self.sealer.check(
                msg.seal, r.sid, msg.token_offset, list(msg.ids), msg.text, msg.finished, reason):
            self.metrics.unsealed_delta()
            raise Aborted(f"drafter {r.drafter} sent a delta at offset {msg.token_offset} without the verifier's "
                          "seal (changed on the way, or the verifier has another --verdict-key-file); nothing of "
                          "it was committed")
        result = None
        if msg.finished:  # the end's algorithm, why and statistics go with the final commit
            result = {"algorithm": wire.algorithm_from_proto(msg.algorithm), "why": r.why,
                      "stats": json_format.MessageToDict(msg.stats, preserving_proto_field_name=True)}
        k_next = msg.next_draft_tokens
        r.length = self._commit(r.sid, r.length, list(msg.ids), msg.text, inc, msg.finished, reason, result,
                                resume={"draft_tokens": k_next} if k_next else None)
        r.k_next = k_next or r.k_next
        self.metrics.committed(len(msg.ids), inc["rounds"], inc["draft_tokens"], inc["accepted_tokens"])
        self._committed(r, msg.ids, msg.finished)
        return now

    def _handed_back(self, r: "_Run", msg) -> None:
        """The drafter ended the call because drafting does not pay at the verifier's load: the session's
        next steps run on the verifier from here (see the module docstring)."""
        if msg.token_offset != len(r.ids):
            raise Aborted(f"drafter {r.drafter} handed the session back at offset {msg.token_offset}, "
                          f"expected {len(r.ids)}")
        r.k_next = msg.next_draft_tokens or r.k_next
        r.come_back_below = msg.come_back_below
        self.handbacks.handed_back(r.req, msg.come_back_below)
        r.steps_left = min(HAND_BACK_STEPS_MAX, HAND_BACK_STEPS << r.handbacks)
        r.handbacks += 1
        self.metrics.handed_back()
        log.info("session %s: handed back by drafter %s at token %d; up to %d target steps on the verifier, "
                 "until it runs fewer than %.2f sequences a pass", r.sid, r.drafter, len(r.ids), r.steps_left,
                 r.come_back_below)

    def _committed(self, r: "_Run", ids, finished: bool) -> None:
        """After a commit of `ids`: the run's ids and end, its first token's time, its start resolved."""
        r.ids.extend(ids)
        if r.first and ids:
            self.metrics.first_token(time.monotonic() - r.t0)
            r.first = False
        r.finished = finished
        if not r.started.done():
            r.started.set_result(None)

    def _run_alone(self, r: "_Run") -> None:
        """The verifier alone; when it fails too (a restarting verifier), wait and try again: the drafters
        too, unless the session is of the target alone (`none`), which stays on a verifier."""
        try:
            self._verifier_alone(r)
        except (SessionClosed, Conflict, _StoreDown):
            raise
        except Exception as e:  # noqa: BLE001 - the verifier is down too: wait, then try all again
            code = status_of(e)[0]
            if code not in FAILOVER_CODES or time.monotonic() > r.give_up:
                raise
            log.warning("session %s: the verifier alone failed too (%s: %s); retrying", r.sid, code.name,
                        status_of(e)[1])
            time.sleep(r.backoff)
            r.backoff = min(2.0, r.backoff * 2)
            r.tried.clear()
            self._repick_verifier(r)
            if r.steps_left:  # handed back: its drafter takes it up again (and fails over as it does)
                r.steps_left = 0
            elif r.req["algorithm"] != "none":
                r.drafter = self._pick_drafter(r.req["drafter"], r.tried)

    def _commit(self, sid: str, expected_len: int, ids: list, text: bytes, counters: dict, finished: bool,
                reason: str, result: Optional[dict] = None, resume: Optional[dict] = None) -> int:
        """store.commit, retried while the store is unreachable (a Redis restart) for up to `store_wait_s`:
        a retried commit is applied once (the store recognises a replay), so nothing is lost or doubled.
        Then `_StoreDown`: the session stops here; its committed part stays in the store, and a replica
        takes it over (its lease runs out) once the store is back and a client attaches.
        The session's stop strings apply first (stops.py): a commit that completes one is the last, and
        `Stopped` (a SessionClosed) then ends the run, which cancels its drafter and verifier."""
        try:
            text, finished, reason, resume, stopped = self.stops.apply(sid, text, finished, reason, resume)
        except CrossdraftError:
            self.stops.forget(sid)
            raise
        give_up, pause = time.monotonic() + self.store_wait_s, 0.05
        while True:
            try:
                length = self.store.commit(sid, expected_len, ids, text, counters, finished, reason, result,
                                           resume=resume)
            except Unavailable as e:
                if time.monotonic() > give_up:
                    self.stops.forget(sid)
                    raise _StoreDown(f"the session store is unreachable: {e}") from None
                log.warning("session %s: the session store is unreachable, retrying the commit: %s", sid, e)
                time.sleep(pause)
                pause = min(1.0, pause * 2)
                continue
            except CrossdraftError:  # a conflict, a closed session: whoever goes on reads the matcher's state
                self.stops.forget(sid)
                raise
            if finished:
                self.stops.forget(sid)
            if stopped:
                raise Stopped(f"session {sid!r} ended at a stop string")
            return length

    def _drafter_for(self, req: dict) -> Optional[str]:
        """A new run's drafter: the least-loaded member of its pool (counted), or None for the target alone,
        which runs on the verifier directly (`_verifier_alone`): a drafter would only relay its steps."""
        if req.get("algorithm") == "none":
            return None
        return self.drafters.pick_least_loaded(req.get("drafter", ""))

    def _pick_drafter(self, model: str, tried: set, prefer_model: str = "") -> Optional[str]:
        """The least-loaded drafter (serving `model`) not in `tried`, counted; None when none is left."""
        try:
            return self.drafters.pick_least_loaded(model, exclude=tried, prefer_model=prefer_model)
        except CrossdraftError:
            return None

    def _fail_over(self, r: "_Run", what: str) -> Optional[str]:
        """`r.drafter` failed: only this session moves, to the least-loaded other member of its pool (the
        same drafter model first), on the verifier its affinity gives now. -> the drafter to resume on, or
        None: no drafter is left, run on the verifier alone."""
        drafter = r.drafter
        r.tried.add(drafter)
        self.drafters.release(drafter)
        self.drafters.suspect(drafter)  # no new session there until it answers SERVING again
        try:
            model = self.drafters.model_of(drafter)
        except CrossdraftError:
            model = ""
        self._repick_verifier(r)
        nxt = self._pick_drafter(r.req["drafter"], r.tried, prefer_model=model)
        self.metrics.failover()
        log.warning("session %s: drafter %s %s; resuming at %d tokens on %s", r.sid, drafter, what, len(r.ids),
                    f"drafter {nxt}" if nxt else "the verifier alone")
        try:
            self.store.touch(r.sid)  # this replica still owns it
        except CrossdraftError as e:
            self._store_error("touch", r.sid, e)
        return nxt

    def _verifier_drains(self, r: "_Run") -> None:
        """The session's verifier is draining (it handed the session back, or refused it, and the drafter
        relayed that): the session resumes on the same drafter, on the verifier its affinity gives among
        the others; while none other is ready, after a pause."""
        old = r.req["verifier_address"]
        try:
            self.verifiers.suspect(old)
        except KeyError:
            pass  # (no longer a member)
        self._repick_verifier(r)
        self.metrics.failover()
        if r.req["verifier_address"] == old:
            time.sleep(r.backoff)
            r.backoff = min(2.0, r.backoff * 2)
        log.warning("session %s: verifier %s drains; resuming at %d tokens on verifier %s, drafter %s", r.sid,
                    old, len(r.ids), r.req["verifier_address"], r.drafter)
        try:
            self.store.touch(r.sid)  # this replica still owns it
        except CrossdraftError as e:
            self._store_error("touch", r.sid, e)

    def _repick_verifier(self, r: "_Run") -> None:
        """The session's verifier by affinity over the verifiers ready now: the same one while it is, another
        when it left or drains (then the session resumes there from the committed ids)."""
        try:
            v = self.verifiers.pick_by_affinity(r.sid, r.req.get("model", ""))
        except CrossdraftError:
            return  # none ready now: keep the last one; the retry will tell
        if v != r.req["verifier_address"]:
            log.info("session %s: verifier %s is no longer ready; resuming on verifier %s", r.sid,
                     r.req["verifier_address"], v)
            r.req = dict(r.req, verifier_address=v)

    def _store_error(self, op: str, sid: str, e: Exception) -> None:
        """A session store error this replica can go on after: logged and counted, never swallowed."""
        self.metrics.store_error(op)
        log.warning("session %s: the session store failed at %s: %s", sid, op, e)

    def _verifier_alone(self, r: "_Run") -> None:
        """Run the session on the verifier with no drafter (a session of the target alone, one no drafter
        of its pool can run, or one its drafter handed back: `r.steps_left` steps then): a Verify stream of
        the target's own steps kept ahead (`steps.TargetSteps`), each verdict committed. A handed-back
        session's stream ends cleanly after its steps, or sooner once the verifier's load falls below what
        the drafter said drafting pays at (`come_back_below`; `load.SHARED` at least): the verifier parks
        the session for the drafter's next stream."""
        from crossdraft.v1 import verifier_pb2_grpc

        steps = TargetSteps(self._verify_start(r), r.steps_left or None)
        call = verifier_pb2_grpc.VerifierServiceStub(self.verifiers.channel(r.req["verifier_address"])).Verify(
            steps.requests())
        with self._lock:
            self._calls[r.sid] = call
        entry = self._watchdog.watch(call, self.first_delta_timeout_s)
        at, rounds, verify_ns = None, 0, 0  # at: the committed length (prompt included) the next verdict starts at
        try:
            for resp in call:
                self._watchdog.kick(entry, self.delta_timeout_s)
                v = wire.verdict_from_proto(resp.verdict)
                if at is None and not v.finished:  # the stale proposal's verdict: where the session is
                    if v.ids:
                        raise Aborted(f"the verifier answered a stale proposal with {len(v.ids)} tokens")
                    at = v.seq
                    steps.begin(at)
                    continue
                if at is not None and (v.seq != at or not (len(v.ids) == 1 or v.finished)):
                    raise Aborted(f"the verifier answered a target step at {v.seq} with {len(v.ids)} tokens, "
                                  f"expected one at {at}")
                rounds, verify_ns = rounds + 1, verify_ns + v.verify_ns
                self._commit_step(r, v, rounds, verify_ns)
                if r.finished:
                    return
                at = v.seq + len(v.ids)
                self._load_seen(r, v.load, steps)
                steps.answered(at)
                if steps.done:  # a handed-back session's steps: end the stream cleanly, the verifier parks it
                    steps.close()
                    for _ in call:
                        pass
                    r.steps_left = 0
                    return
            raise Unavailable("the verifier ended the session's stream before it finished")
        finally:
            steps.close()
            self._watchdog.unwatch(entry)
            if not r.finished:
                call.cancel()

    def _verify_start(self, r: "_Run"):
        """The VerifyStart of the gateway's own stream for `r`, from its committed ids."""
        from crossdraft.v1 import verifier_pb2

        p = r.req["params"]
        return verifier_pb2.VerifyStart(
            session_id=r.sid, prompt=r.req["prompt"], committed_ids=r.ids, max_new_tokens=r.req["max_new_tokens"],
            params=common_pb2.SamplingParams(temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                                             seed=p["seed"]), algorithm=common_pb2.ALGORITHM_NONE)

    def _load_seen(self, r: "_Run", load, steps: TargetSteps) -> None:
        """A verdict's load: remembered (handback.py); a handed-back session whose drafting would pay at it
        proposes no more steps (it goes back to its drafter once those in flight are answered)."""
        if load is None:
            return
        self.handbacks.load(r.req["verifier_address"], load.sequences)
        if steps.left is not None and load.sequences < max(SHARED, r.come_back_below):
            steps.stop()

    def _commit_step(self, r: "_Run", v, rounds: int, verify_ns: int) -> None:
        """Commit one verdict of `_verifier_alone` (the last with the session's result)."""
        reason, result = (v.finish_reason if v.finished else ""), None
        if v.finished:
            why = "asked for" if r.req["algorithm"] == "none" else \
                "drafting did not pay at the verifier's load: the target's own steps" if r.steps_left else \
                "no drafter could be reached: the verifier alone"
            result = {"algorithm": "none", "why": why,
                      "stats": {"new_tokens": len(r.ids) + len(v.ids), "rounds": rounds, "verify_ns": verify_ns}}
        r.length = self._commit(r.sid, r.length, list(v.ids), v.text, {"rounds": 1}, v.finished, reason, result)
        self.metrics.committed(len(v.ids), 1)
        self._committed(r, v.ids, v.finished)

    def _adopt_if_orphaned(self, s) -> bool:
        """A queued or running session nobody has written to for `lease_s` (its gateway stopped): claim
        it in the store (one replica wins) and run it on from its committed ids. True if taken over."""
        if s.terminal or time.time() - s.updated <= self.lease_s:
            return False
        with self._lock:
            if s.id in self._calls or self._active >= self.max_sessions:
                return False
        if not self.store.claim(s.id, self.owner, self.lease_s):
            return False
        req = dict(s.request)
        with self._lock:
            self._active += 1
        try:
            req["verifier_address"] = self.verifiers.pick_by_affinity(s.id, req.get("model", ""))
            req["drafter_address"] = self._drafter_for(req)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise
        self.metrics.takeover()
        self.metrics.session_started()
        log.warning("session %s: nobody has written to it for %g s (its gateway %s stopped or lost the store); "
                    "taking it over at %d tokens", s.id, self.lease_s, s.owner, s.length)
        done: Future = Future()
        done.set_result(None)
        threading.Thread(target=self._run, args=(s.id, req, done, True), name=f"session-{s.id}", daemon=True).start()
        return True

    def _expire(self, sid: str) -> None:
        """The client's deadline passed: cancel the session as CancelSession does (drafter and verifier
        end their streams and free its caches)."""
        try:
            if self.store.set_status(sid, "cancelled", error="the client's deadline passed",
                                     finish_reason="cancelled") != "cancelled":
                return
        except CrossdraftError as e:  # not recorded: the session runs on rather than end unrecorded
            self._store_error("expire", sid, e)
            return
        log.info("session %s: the client's deadline passed; cancelled", sid)
        with self._lock:
            call = self._calls.get(sid)
        if call is not None:
            call.cancel()

    def _is_cancelled(self, sid: str) -> bool:
        try:
            return self.store.cancelled(sid)
        except CrossdraftError as e:
            self._store_error("cancelled", sid, e)
            return False

    def _fail(self, sid: str, e: Exception, started: Future) -> None:
        code, message = status_of(e)
        log.info("session %s: %s: %s", sid, code.name, message)
        try:
            if not started.done() and code in REFUSALS:
                self.store.delete(sid)  # a refused request leaves nothing behind
            else:
                self.store.set_status(sid, "failed", error=message, finish_reason="error")
        except CrossdraftError as e2:  # closed meanwhile, or the store is down: the status still goes out
            log.warning("session %s: could not record the failure: %s", sid, e2)
        if not started.done():
            started.set_exception(e)

    # --- reading a session ----------------------------------------------------------------------
    def _get(self, sid: str, include_output: bool = True, caller: Optional[str] = None):
        """The session; NOT_FOUND when it does not exist or (with API keys) belongs to another key than `caller`."""
        wire.check_session_id(sid)
        s = self.store.get(sid, include_output)
        if s is None or not self._owns(caller, s):
            raise NotFound(f"session {sid!r} not found")
        return s

    def _owns(self, caller: Optional[str], s) -> bool:
        return self.keys is None or caller is None or s.request.get("key_name", "") == caller

    def _caller(self, context) -> str:
        """The calling key's name ('' without API keys), counted against its requests per minute."""
        name = caller_of(self.keys, context)
        if self.limits is not None:
            self.limits.request(name)
        return name

    def _end(self, s) -> gateway_pb2.GenerationEnd:
        text_bytes = len(s.text.decode("utf-8", errors="replace").encode("utf-8"))
        if s.status == "done" and s.result:  # recorded by the final commit, whichever replica made it
            r = s.result
            algorithm, why = wire.algorithm_to_proto(r.get("algorithm", "auto")), r.get("why", "")
            stats = json_format.ParseDict(r.get("stats", {}), common_pb2.Stats(), ignore_unknown_fields=True)
        else:
            algorithm, why, stats = wire.algorithm_to_proto(s.request.get("algorithm", "auto")), "", self._stats(s)
        return gateway_pb2.GenerationEnd(finish_reason=_reason(s.finish_reason), algorithm=algorithm, why=why,
                                         stats=stats, error_message=s.error, text_bytes=text_bytes)

    @staticmethod
    def _stats(s) -> common_pb2.Stats:
        end = s.finished if s.finished is not None else s.updated
        return common_pb2.Stats(new_tokens=s.length, total_ns=max(0, int((end - s.created) * 1e9)),
                                **{k: s.counters.get(k, 0) for k in COUNTERS})

    def _session(self, s, include_output: bool) -> gateway_pb2.Session:
        msg = gateway_pb2.Session(
            session_id=s.id, status=_STATUS.get(s.status, gateway_pb2.SESSION_STATUS_FINISHED),
            spec=self._spec(s.request), new_tokens=s.length, stats=self._stats(s),
            created_unix_ns=int(s.created * 1e9), updated_unix_ns=int(s.updated * 1e9),
            drafter_address=s.request.get("drafter_address") or "", verifier_address=s.request.get("verifier_address", ""))
        if include_output:
            dec = codecs.getincrementaldecoder("utf-8")("replace")
            text = dec.decode(s.text, final=s.terminal)
            msg.text, msg.text_bytes = text, len(text.encode("utf-8"))
            msg.ids.extend(s.ids)
        if s.terminal:
            msg.end.CopyFrom(self._end(s))
            msg.text_bytes = msg.end.text_bytes
            if s.status == "done" and s.result:
                msg.stats.CopyFrom(msg.end.stats)
        return msg

    def _follow(self, sid: str, offset: int, context):
        """('delta', TextDelta) ... ('end', GenerationEnd): the session's output from byte `offset` on,
        read from the store's event stream until its final event."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        at_bytes = at_ids = 0
        while True:
            events = self.store.read_events(sid, at_ids, block_ms=FOLLOW_BLOCK_MS)
            if not events and context is not None and not context.is_active():
                return
            if not events:  # quiet: is anybody still running it?
                self._adopt_if_orphaned(self._get(sid, include_output=False))
            for ev in events:
                skip = at_ids - ev.start  # > 0 only if an event straddles where we are
                ids = list(ev.ids[skip:]) if skip > 0 else list(ev.ids)
                token_offset = at_ids
                at_ids = ev.offset
                data = dec.decode(ev.text, final=ev.final).encode("utf-8")
                start, at_bytes = at_bytes, at_bytes + len(data)
                if at_bytes > offset or offset == 0:
                    cut = max(0, offset - start)
                    if cut and cut < len(data) and 0x80 <= data[cut] < 0xC0:
                        raise InvalidArgument(f"offset {offset} is inside a UTF-8 character")
                    text = data[cut:].decode("utf-8")
                    if text or ids:
                        yield "delta", gateway_pb2.TextDelta(offset=max(start, offset), text=text,
                                                             token_offset=token_offset, ids=ids)
                if ev.final:
                    yield "end", self._end(self._get(sid, include_output=True))
                    return

    def _open(self, spec, session_id: str, context, caller: str = ""):
        """Validate, then start a new session or (a known session id of the caller's key) attach to it;
        -> (id, events)."""
        req = self._request(spec)
        if self.keys is not None:
            req["key_name"] = caller
        if session_id:
            wire.check_session_id(session_id)
            existing = self.store.get(session_id, include_output=False)
            if existing is not None:
                if not self._owns(caller, existing):
                    raise NotFound(f"session {session_id!r} not found")
                self._adopt_if_orphaned(existing)
                return session_id, self._follow(session_id, 0, context)
        sid = session_id or uuid.uuid4().hex
        self.stops.note(sid, req.get("stop"))
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:  # the client's deadline: the session is cancelled when it passes
            req = dict(req, deadline_unix=time.time() + remaining)
        if self.limits is not None:
            self.limits.acquire(caller, sid)  # RESOURCE_EXHAUSTED before anything of the session is written
        try:
            try:
                started = self._start(sid, req)
            except AlreadyExists:  # the same id sent twice at once: attach to the one that won
                self.stops.forget(sid)  # its stop strings are the stored request's
                if self.limits is not None:
                    self.limits.release(caller, sid)
                self._get(sid, include_output=False, caller=caller)
                return sid, self._follow(sid, 0, context)
            started.result()  # raises a refusal before the first commit
        except BaseException:
            if self.limits is not None:
                self.limits.release(caller, sid)
            raise
        return sid, self._follow(sid, 0, context)

    def _paced(self, sid: str, messages, context):
        """Hand `messages` to a streaming client. gRPC's flow control holds a send once the client's
        window is full, so a client that stops reading holds this handler's thread, and nothing more: the
        gateway buffers no output of its own (it reads the store as the client takes messages), and the
        session runs on, committing to the store. A message the client has not taken within
        `slow_client_s` cuts the stream with RESOURCE_EXHAUSTED, and a client that takes nothing for
        `SLOW_CLIENT_GRACE_S` more has its call cancelled, which frees the thread for others (`_SlowClient`);
        the client may re-attach from the bytes it has."""
        cut = _SlowClient(self, sid, context) if context is not None else None
        try:
            for msg in messages:
                entry = self._watchdog.watch(cut, self.slow_client_s) if cut is not None else None
                try:
                    yield msg
                finally:
                    if entry is not None:
                        self._watchdog.unwatch(entry)
                if cut is not None:
                    cut.check()  # RESOURCE_EXHAUSTED once cut
        finally:
            if cut is not None:
                cut.done()

    # --- RPCs -----------------------------------------------------------------------------------
    def Generate(self, request, context):
        sid, events = self._open(request.spec, request.session_id, context, self._caller(context))
        yield from self._paced(sid, (gateway_pb2.GenerateResponse(session_id=sid, **{kind: value})
                                     for kind, value in events), context)

    def GenerateUnary(self, request, context):
        sid, events = self._open(request.spec, request.session_id, context, self._caller(context))
        out = gateway_pb2.GenerateUnaryResponse(session_id=sid)
        text = []
        for kind, value in events:
            if kind == "delta":
                text.append(value.text)
                out.ids.extend(value.ids)
            else:
                out.end.CopyFrom(value)
        out.text = "".join(text)
        return out

    def AttachSession(self, request, context):
        s = self._get(request.session_id, caller=self._caller(context))
        self._adopt_if_orphaned(s)
        have = len(codecs.getincrementaldecoder("utf-8")("replace").decode(s.text, final=s.terminal).encode("utf-8"))
        if request.offset > have:
            raise InvalidArgument(f"offset {request.offset} is beyond the {have} bytes committed so far")
        yield from self._paced(s.id, (gateway_pb2.AttachSessionResponse(session_id=s.id, **{kind: value})
                                      for kind, value in self._follow(s.id, request.offset, context)), context)

    def GetSession(self, request, context):
        s = self._get(request.session_id, include_output=request.include_output, caller=self._caller(context))
        return gateway_pb2.GetSessionResponse(session=self._session(s, request.include_output))

    def CancelSession(self, request, context):
        self._get(request.session_id, include_output=False, caller=self._caller(context))
        cancelled = self.cancel(request.session_id)
        s = self._get(request.session_id, include_output=False)
        return gateway_pb2.CancelSessionResponse(cancelled=cancelled, session=self._session(s, False))

    # --- for the HTTP API (http.py): the same keys, checks and sessions as the RPCs ------------------
    def caller(self, context) -> str:
        return self._caller(context)

    def open(self, spec, session_id: str, context, caller: str = ""):
        return self._open(spec, session_id, context, caller)

    def cancel(self, sid: str) -> bool:
        """Cancel a session: in the store, and its RunSession call if this process runs it."""
        cancelled = self.store.cancel(sid)
        with self._lock:
            call = self._calls.get(sid)
        if call is not None:
            call.cancel()
        return cancelled


# --- serving ------------------------------------------------------------------------------------

def make_store(redis_url: Optional[str], ttl_s: float):
    if redis_url:
        from crossdraft.store import RedisStore

        store = RedisStore(redis_url, ttl_s=ttl_s)
        store.ping()
        log.info("sessions in redis at %s", re.sub(r"//[^/@]*@", "//", redis_url))  # never the password
        return store
    log.info("no --redis: sessions kept in memory (MemoryStore), lost when this process stops")
    return MemoryStore(ttl_s=ttl_s)


def gateway_service(args, store, drafters: list, verifiers: list, host: str, port: int, handle_signals=True,
                    metrics: Optional[ServiceMetrics] = None, pool_tls: Optional[TLS] = None,
                    sealer: Optional[Sealer] = None):
    """The gateway's gRPC server, started. TLS of its listener from --tls-cert/--tls-key (client certificates
    required when --tls-client-ca is given); its pools' channels use `pool_tls` (default: --tls-ca with the
    same certificate as client identity). API keys and per-key limits from --api-keys and --key-*."""
    tls = TLS.from_args(args)
    if pool_tls is None:
        pool_tls = tls
        if not tls.calls_tls:  # refuse plaintext to a non-loopback pool at start, not at the first request
            for a in list(drafters) + list(verifiers):
                check_plaintext(a, tls.insecure, f"pool address {a}", listening=False)
    keys, limits = api_keys_and_limits(args, store)
    if sealer is None:
        sealer = sealer_from_args(args)
        if sealer is None:
            log.warning("no --verdict-key-file: drafters are trusted to relay the verifiers' verdicts unchanged")
    pools = [Pool(kind, pool_sources(args, addresses, f"--{kind}s"), pool_tls,
                  health_s=getattr(args, "health_seconds", HEALTH_S))
             for kind, addresses in (("drafter", drafters), ("verifier", verifiers))]
    for p in pools:
        p.start()
    servicer = GatewayServicer(store, *pools,
                               max_sessions=args.max_sessions, max_prompt_bytes=args.max_prompt_bytes,
                               metrics=metrics, delta_timeout_s=args.drafter_timeout,
                               failover_s=args.failover_seconds, lease_s=args.session_lease,
                               keys=keys, limits=limits, sealer=sealer,
                               slow_client_s=getattr(args, "slow_client_seconds", SLOW_CLIENT_S),
                               store_wait_s=getattr(args, "store_wait_seconds", STORE_WAIT_S),
                               hand_back=not getattr(args, "no_hand_back", False))
    svc = Service(SERVICE_NAME, gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer, host, port,
                  max_workers=2 * args.max_sessions + 8, grace_s=args.grace, on_error=servicer.metrics.error,
                  tls=tls, client_ca=getattr(args, "tls_client_ca", None) or "")
    svc.servicer = servicer
    svc.start(handle_signals=handle_signals)
    if getattr(args, "http_port", None) is not None:  # the OpenAI-compatible HTTP API beside gRPC
        from .http import serve_http

        svc.http = serve_http(args, servicer, svc, host)
    return svc


def pool_sources(args, addresses: list, what: str) -> list:
    """The membership sources of one pool flag under --discovery (static for `serve all`)."""
    return sources_for(getattr(args, "discovery", "static"), addresses, what,
                       refresh_s=getattr(args, "dns_refresh_seconds", DNS_REFRESH_S),
                       namespace=getattr(args, "kube_namespace", "") or "")


def api_keys_and_limits(args, store) -> tuple:
    """(ApiKeys or None, KeyLimits or None) from --api-keys, --key-requests-per-minute, --key-max-sessions."""
    path = getattr(args, "api_keys", None)
    rpm, per_key = getattr(args, "key_requests_per_minute", 0) or 0, getattr(args, "key_max_sessions", 0) or 0
    if rpm < 0 or per_key < 0:
        raise InvalidArgument("--key-requests-per-minute and --key-max-sessions must be >= 0")
    if not path:
        if rpm or per_key:
            raise InvalidArgument("--key-requests-per-minute and --key-max-sessions need --api-keys")
        if is_loopback(args.host):
            log.info("no --api-keys: the gateway is open to anyone who reaches %s", args.host)
        else:
            log.warning("no --api-keys: the gateway is open to anyone who reaches %s:%s", args.host, args.port)
        return None, None
    keys = ApiKeys(load_keys(path))
    log.info("API keys: %d (from %s); sessions belong to the key that created them", len(keys.hashes), path)
    limits = KeyLimits.for_store(store, rpm, per_key) if (rpm or per_key) else None
    return keys, limits


def serve(args) -> int:
    """`crossdraft serve gateway`: SERVING as soon as the store answers (it loads no model)."""
    setup_logging()
    drafters = parse_addresses(args.drafters, "--drafters")
    verifiers = parse_addresses(args.verifiers, "--verifiers")
    store = make_store(args.redis, args.ttl)
    metrics = ServiceMetrics("gateway")
    svc = gateway_service(args, store, drafters, verifiers, args.host, args.port, metrics=metrics)
    log.info("drafters %s, verifiers %s (--discovery %s)", ",".join(drafters), ",".join(verifiers),
             args.discovery)
    servicer = svc.servicer
    if not wait_synced(servicer.drafters.sources + servicer.verifiers.sources, SYNC_WAIT_S):
        log.warning("the pools' members are not all known after %g s; serving anyway, sessions wait for them",
                    SYNC_WAIT_S)
    mport = metrics.serve(getattr(args, "metrics_port", 0), args.host)
    if mport:
        log.info("metrics on http://%s:%d/metrics", args.host, mport)
    svc.set_serving()
    svc.wait()
    metrics.stop()
    store.close()
    return 0
