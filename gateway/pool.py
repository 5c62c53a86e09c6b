"""Pools of drafters and verifiers: which replica runs a session.

Owns: the static address lists given on the command line, one channel per address, the model id of
each replica (its `GetInfo`, fetched on first need and cached), and the routing rules:
- drafter: least loaded, i.e. the fewest sessions this gateway has in flight on it (ties: the first
  in the list); optionally only the replicas serving a named drafter model;
- verifier: session affinity by rendezvous hashing (highest blake2b(session id, address) wins), so a
  session maps to the same verifier on every gateway replica, and adding or removing a verifier moves
  only the sessions it gains or loses; optionally only the replicas serving a named target model.

Never: holds session state (the in-flight counts are this process's load, not a session's state).
"""
from __future__ import annotations

import hashlib
import threading

import grpc

from crossdraft.errors import FailedPrecondition, InvalidArgument, Unavailable
from crossdraft.serving.channels import CHANNEL_OPTIONS, PLAINTEXT, TLS
from crossdraft.serving.status import one_line
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

INFO_TIMEOUT_S = 5.0
# An address may be a DNS name with several replicas behind it (a Kubernetes headless Service: one drafter
# pool): round_robin spreads the calls over all of them, where gRPC's default pick_first sends all to one.
POOL_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [("grpc.lb_policy_name", "round_robin")]


def parse_addresses(text: str, what: str) -> list:
    """'host:port,host:port' -> ['host:port', ...] (at least one, no duplicates)."""
    out = []
    for a in (text or "").split(","):
        a = a.strip()
        if not a:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"{what}: {a!r} is not HOST:PORT")
        if a not in out:
            out.append(a)
    if not out:
        raise InvalidArgument(f"{what}: give at least one HOST:PORT")
    return out


class Pool:
    """One kind of replica (drafters or verifiers)."""

    def __init__(self, kind: str, addresses: list, tls: TLS = PLAINTEXT):
        """`tls`: how its channels are made (TLS with a CA and the gateway's certificate as client identity,
        or plaintext: loopback only unless --insecure)."""
        if kind not in ("drafter", "verifier"):
            raise ValueError(kind)
        self.kind, self.addresses, self.tls = kind, list(addresses), tls
        self._lock = threading.Lock()
        self._channels: dict = {}
        self._models: dict = {}  # address -> model id (GetInfo)
        self.in_flight = dict.fromkeys(self.addresses, 0)

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = self.tls.channel(address, POOL_CHANNEL_OPTIONS, self.kind)
            return ch

    def drafter_stub(self, address: str):
        return drafter_pb2_grpc.DrafterServiceStub(self.channel(address))

    def model_of(self, address: str) -> str:
        with self._lock:
            if address in self._models:
                return self._models[address]
        try:
            if self.kind == "drafter":
                info = self.drafter_stub(address).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(),
                                                          timeout=INFO_TIMEOUT_S)
            else:
                info = verifier_pb2_grpc.VerifierServiceStub(self.channel(address)).GetInfo(
                    verifier_pb2.VerifierServiceGetInfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.RpcError as e:
            raise Unavailable(f"{self.kind} {address} cannot be reached: {one_line(e.details() or '')}") from None
        with self._lock:
            self._models[address] = info.model_id
        return info.model_id

    def _serving(self, model: str, exclude=()) -> list:
        addresses = [a for a in self.addresses if a not in exclude]
        if not model:
            if not addresses:
                raise Unavailable(f"no {self.kind} of this gateway is left to try")
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

    def pick_least_loaded(self, model: str = "", exclude=()) -> str:
        """The replica (serving `model`, if given; not in `exclude`) with the fewest sessions in
        flight; counts it."""
        candidates = self._serving(model, exclude)
        with self._lock:
            address = min(candidates, key=lambda a: self.in_flight[a])
            self.in_flight[address] += 1
            return address

    def hold(self, address: str) -> None:
        """Count one more session in flight on this replica (picked by other means)."""
        with self._lock:
            self.in_flight[address] += 1

    def release(self, address: str) -> None:
        with self._lock:
            self.in_flight[address] -= 1

    def pick_by_affinity(self, session_id: str, model: str = "") -> str:
        """Rendezvous hashing: the same session id always gets the same replica (among those serving `model`)."""
        def weight(a: str) -> bytes:
            return hashlib.blake2b(f"{session_id}\0{a}".encode(), digest_size=8).digest()

        return max(self._serving(model), key=weight)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
