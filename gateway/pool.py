"""Pools of drafters and verifiers: which replica (pod) runs a session.

Owns: a pool's members (the union of its membership sources, `membership.py`), one channel per member,
what each member serves and how loaded it says it is (its `GetInfo`), its health as this gateway sees it,
and the routing rules:
- drafter: least loaded per member: the sessions this gateway has in flight on it, or the member's own
  count of open sessions (all gateways') when that is higher; ties: the first address; optionally only the
  members serving a named drafter model;
- verifier: session affinity by rendezvous hashing (highest blake2b(session id, address) wins) over the
  members that are ready now, so a session maps to the same verifier on every gateway replica, and adding
  or removing a verifier moves only the sessions it wins or loses.
A member takes new sessions when its source says it is ready and not terminating, its last health check
did not answer NOT_SERVING or fail (a draining or dead pod), and no call on it failed since its last good
check (`suspect`: a session that failed over from it keeps others from being placed there until it
answers SERVING again).

A prober thread (`start`) checks every member every `health_s` seconds: `grpc.health.v1` Check (SERVING,
NOT_SERVING when draining or still loading) and `GetInfo` (model, open sessions). Members that left every
source are forgotten, their channels closed, once this gateway has no session on them.

Never: holds session state (the in-flight counts are this process's load, not a session's state).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossdraft.errors import FailedPrecondition, InvalidArgument, Unavailable
from crossdraft.serving.channels import CHANNEL_OPTIONS, PLAINTEXT, TLS
from crossdraft.serving.status import one_line
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

from .membership import Member, StaticSource, is_ip

log = logging.getLogger("crossdraft.gateway")

INFO_TIMEOUT_S = 5.0
HEALTH_S = 1.0  # how often the prober checks every member
UNREACHABLE_S = 2.0  # a member whose GetInfo failed is not asked again for this long when placing a session
# A static address may be a DNS name with several replicas behind it (`--discovery static` with a headless
# Service): round_robin spreads the calls over all of them, where gRPC's default pick_first sends all to one.
# Reconnects are retried quickly, so that a member restarted on its address is seen again within seconds.
POOL_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [("grpc.lb_policy_name", "round_robin"),
                                          ("grpc.initial_reconnect_backoff_ms", 200),
                                          ("grpc.min_reconnect_backoff_ms", 200),
                                          ("grpc.max_reconnect_backoff_ms", 2000)]
_SERVING = health_pb2.HealthCheckResponse.SERVING


def parse_addresses(text: str, what: str) -> list:
    """'host:port,host:port' -> ['host:port', ...] (at least one, no duplicates). Under `--discovery
    kubernetes` an entry is SERVICE:PORT, PORT a port name or number."""
    out = []
    for a in (text or "").split(","):
        a = a.strip()
        if not a:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port or (port.isdigit() and not 0 < int(port) < 65536):
            raise InvalidArgument(f"{what}: {a!r} is not HOST:PORT")
        if a not in out:
            out.append(a)
    if not out:
        raise InvalidArgument(f"{what}: give at least one HOST:PORT")
    return out


class _State:
    """What this gateway knows of one member beyond its source's word."""
    __slots__ = ("health", "checked", "suspect", "model", "load", "unreachable_until")

    def __init__(self):
        self.health: Optional[str] = None  # None: not checked yet; "serving", "not serving", "down"
        self.checked = 0.0  # monotonic start of the last health check that answered
        self.suspect = 0.0  # monotonic time a call on it failed; cleared by a later good check
        self.model: Optional[str] = None
        self.load = 0  # open sessions it reported (GetInfo.active_sessions), all gateways'
        self.unreachable_until = 0.0


class Pool:
    """One kind of replica (drafters or verifiers), from `sources` (or a list of addresses: static)."""

    def __init__(self, kind: str, sources, tls: TLS = PLAINTEXT, health_s: float = HEALTH_S):
        """`tls`: how its channels are made (TLS with a CA and the gateway's certificate as client identity,
        or plaintext: loopback only unless --insecure)."""
        if kind not in ("drafter", "verifier"):
            raise ValueError(kind)
        if sources and all(isinstance(s, str) for s in sources):
            sources = [StaticSource(list(sources))]
        self.kind, self.sources, self.tls, self.health_s = kind, list(sources), tls, health_s
        self._lock = threading.Lock()
        self._channels: dict = {}
        self._state: dict = defaultdict(_State)
        self.in_flight: dict = defaultdict(int)
        self._stop = threading.Event()
        self._prober: Optional[threading.Thread] = None

    # --- members --------------------------------------------------------------------------------
    def members(self) -> dict:
        """address -> Member, over all sources (an address in two: the routable one wins)."""
        out: dict = {}
        for s in self.sources:
            for a, m in s.members().items():
                if a not in out or (m.routable and not out[a].routable):
                    out[a] = m
        return out

    @property
    def addresses(self) -> list:
        return sorted(self.members())

    def _takes_sessions(self, m: Member) -> bool:
        st = self._state.get(m.address)
        return m.routable and (st is None or (st.health not in ("not serving", "down") and not st.suspect))

    def routable(self) -> list:
        """The members that take new sessions now, in their sources' order."""
        members = self.members()
        with self._lock:
            return [a for a, m in members.items() if self._takes_sessions(m)]

    def _recheck(self) -> bool:
        """Before refusing for want of a member: check now the members only this gateway's last health
        check keeps out (one that was loading a moment ago may be SERVING now). True if one came back."""
        members = self.members()
        with self._lock:
            out = {a: m for a, m in members.items() if m.routable and not self._takes_sessions(m)}
        if not out:
            return False
        self.probe(out, forget=False)
        with self._lock:
            return any(self._takes_sessions(m) for m in out.values())

    def suspect(self, address: str) -> None:
        """A call on this member failed: place no new session on it until a later health check says SERVING."""
        with self._lock:
            self._state[address].suspect = time.monotonic()

    # --- channels and GetInfo -------------------------------------------------------------------
    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                options = list(POOL_CHANNEL_OPTIONS)
                m = self.members().get(address)
                if self.tls.calls_tls and not self.tls.server_name and m is not None and m.name \
                        and not is_ip(m.name) and is_ip(address.rpartition(":")[0].strip("[]")):
                    # a pod found by its Service's name: its certificate carries that name, not the pod's IP
                    options.append(("grpc.ssl_target_name_override", m.name))
                ch = self._channels[address] = self.tls.channel(address, options, self.kind)
            return ch

    def drafter_stub(self, address: str):
        return drafter_pb2_grpc.DrafterServiceStub(self.channel(address))

    def _info_call(self, address: str):
        if self.kind == "drafter":
            return self.drafter_stub(address).GetInfo, drafter_pb2.DrafterServiceGetInfoRequest()
        return verifier_pb2_grpc.VerifierServiceStub(self.channel(address)).GetInfo, \
            verifier_pb2.VerifierServiceGetInfoRequest()

    def model_of(self, address: str) -> str:
        with self._lock:
            st = self._state[address]
            if st.model is not None:
                return st.model
            if time.monotonic() < st.unreachable_until:
                raise Unavailable(f"{self.kind} {address} could not be reached a moment ago")
        method, request = self._info_call(address)
        try:
            info = method(request, timeout=INFO_TIMEOUT_S)
        except grpc.RpcError as e:
            with self._lock:
                self._state[address].unreachable_until = time.monotonic() + UNREACHABLE_S
            raise Unavailable(f"{self.kind} {address} cannot be reached: {one_line(e.details() or '')}") from None
        with self._lock:
            st = self._state[address]
            st.model, st.load = info.model_id, info.active_sessions
        return info.model_id

    # --- routing --------------------------------------------------------------------------------
    def _serving(self, model: str, exclude=()) -> list:
        try:
            return self._serving_now(model, exclude)
        except (Unavailable, FailedPrecondition):
            if not self._recheck():
                raise
            return self._serving_now(model, exclude)

    def _serving_now(self, model: str, exclude=()) -> list:
        addresses = [a for a in self.routable() if a not in exclude]
        if not addresses:
            known = "" if self.members() else f" (its sources list none: {'; '.join(s.what for s in self.sources)})"
            raise Unavailable(f"no {self.kind} of this gateway is left to try{known}")
        if not model:
            return addresses
        out, unreachable = [], None
        for a in addresses:
            try:
                if self.model_of(a) == model:
                    out.append(a)
            except Unavailable as e:  # a replica that is down is skipped, not fatal
                unreachable = e
        if not out:
            if unreachable is not None:
                raise unreachable
            if exclude:
                raise Unavailable(f"no {self.kind} serving model {model!r} is left to try")
            raise FailedPrecondition(f"no {self.kind} of this gateway serves model {model!r}")
        return out

    def load_of(self, address: str) -> int:
        st = self._state.get(address)
        return max(self.in_flight[address], st.load if st is not None else 0)

    def pick_least_loaded(self, model: str = "", exclude=(), prefer_model: str = "") -> str:
        """The member (serving `model`, if given; not in `exclude`) with the fewest sessions; counts it.
        `prefer_model`: among those, the members serving this model first (a failover stays in its pool)."""
        candidates = self._serving(model, exclude)
        if prefer_model and not model:
            same = [a for a in candidates if self._state[a].model == prefer_model]
            candidates = same or candidates
        with self._lock:
            address = min(candidates, key=self.load_of)  # ties: the first in the sources' order
            self.in_flight[address] += 1
            return address

    def hold(self, address: str) -> None:
        """Count one more session in flight on this member (picked by other means)."""
        with self._lock:
            self.in_flight[address] += 1

    def release(self, address: str) -> None:
        with self._lock:
            self.in_flight[address] -= 1

    def pick_by_affinity(self, session_id: str, model: str = "") -> str:
        """Rendezvous hashing: the same session id gets the same member while it is ready (among those
        serving `model`); a member that joins takes only the sessions it wins."""
        def weight(a: str) -> bytes:
            return hashlib.blake2b(f"{session_id}\0{a}".encode(), digest_size=8).digest()

        return max(self._serving(model), key=weight)

    # --- the prober -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sources and the prober thread."""
        for s in self.sources:
            s.start()
        if self._prober is None and self.health_s > 0:
            self._prober = threading.Thread(target=self._probe_loop, name=f"{self.kind}-prober", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.health_s):
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - never let the prober die; it logs and tries again
                log.exception("%s pool: health check round failed", self.kind)

    def probe(self, members: Optional[dict] = None, forget: bool = True) -> None:
        """One round: check every member's (or `members`') health and GetInfo at once; forget members
        that left."""
        members = self.members() if members is None else members
        t0 = time.monotonic()
        timeout = max(0.2, min(self.health_s, 2.0))
        calls = {}
        for a in members:
            try:
                health = health_pb2_grpc.HealthStub(self.channel(a)).Check.future(
                    health_pb2.HealthCheckRequest(), timeout=timeout)
                method, request = self._info_call(a)
                calls[a] = (health, method.future(request, timeout=timeout))
            except Exception as e:  # noqa: BLE001 - e.g. plaintext refused to a non-loopback member
                calls[a] = (None, None)
                log.warning("%s %s: cannot be checked: %s", self.kind, a, e)
        for a, (health, info) in calls.items():
            self._record(a, health, info, t0)
        if forget:
            self._forget(members)

    def _record(self, address: str, health, info, t0: float) -> None:
        try:
            status = "serving" if health.result().status == _SERVING else "not serving"
        except Exception:  # noqa: BLE001 - refused, timed out, or not checkable at all
            status = "down"
        try:
            got = info.result() if status == "serving" else None
        except Exception:  # noqa: BLE001 - serving health but no GetInfo yet: keep what we had
            got = None
        with self._lock:
            st = self._state[address]
            before = st.health
            st.health, st.checked = status, t0
            if status == "serving" and st.suspect and st.suspect < t0:
                st.suspect = 0.0
            if got is not None:
                st.model, st.load = got.model_id, got.active_sessions
        if before is not None and before != status:
            log.info("%s %s: %s (was %s)", self.kind, address, status, before)

    def _forget(self, members: dict) -> None:
        with self._lock:
            for a in [a for a in self._channels if a not in members and not self.in_flight.get(a)]:
                self._channels.pop(a).close()
                self._state.pop(a, None)
                self.in_flight.pop(a, None)

    def close(self) -> None:
        self._stop.set()
        for s in self.sources:
            s.close()
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
