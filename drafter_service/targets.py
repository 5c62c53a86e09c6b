"""The verifiers a drafter service runs sessions against, and what it keeps of each, in bounded caches.

Owns:
- the check that a verifier address is allowed (`allowed.AllowedVerifiers`, --allowed-verifiers) before
  anything dials it;
- channels: one per verifier address, at most `max_channels`, least recently used evicted; an evicted
  channel is closed once no call on it is left (every call of a `VerifierStub` leases the address's
  current channel until the call ends, so a session's Verify stream never loses its channel);
- target tokenizers: one `Vocab` per tokenizer fingerprint, at most `max_vocabs`, fetched with
  `GetTokenizer` (`crossdraft.serving.tokenizers.fetch_tokenizer`) outside the cache lock, one fetch per
  fingerprint in flight: sessions that need that tokenizer wait for it, the others go on;
- template drafters: one per (fingerprint, mode), at most `max_drafters`, built once the same way (the
  build is where an unbridgeable pair is found, FailedPrecondition); sessions fork them.

Never: runs sessions or rounds; holds its lock while it talks to a verifier or builds a drafter.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Optional

import grpc

from crossdraft.errors import Unavailable
from crossdraft.serving.channels import CHANNEL_OPTIONS, PLAINTEXT, TLS
from crossdraft.serving.status import one_line
from crossdraft.serving.tokenizers import fetch_tokenizer
from crossdraft.v1 import verifier_pb2, verifier_pb2_grpc

from .allowed import AllowedVerifiers

INFO_TIMEOUT_S = 10.0
MAX_CHANNELS = 64  # verifier addresses a drafter keeps a channel to
MAX_VOCABS = 8  # target tokenizers kept (a deployment has one or a few targets)
MAX_DRAFTERS = 32  # template drafters kept: target tokenizers x modes


class _Channel:
    """A channel to one verifier address and the calls that use it."""

    __slots__ = ("address", "channel", "calls", "evicted")

    def __init__(self, address: str, channel):
        self.address, self.channel, self.calls, self.evicted = address, channel, 0, False


class VerifierStub:
    """The VerifierService at one address, as a session calls it: each call leases the address's current
    channel for as long as the call runs (streams: until they end), so eviction never cuts a call."""

    def __init__(self, targets: "Targets", address: str):
        self.targets, self.address = targets, address

    def GetInfo(self, request, **kw):
        ch = self.targets._lease(self.address)
        try:
            return verifier_pb2_grpc.VerifierServiceStub(ch.channel).GetInfo(request, **kw)
        finally:
            self.targets._release(ch)

    def GetTokenizer(self, request, **kw):
        return self._streaming("GetTokenizer", request, **kw)

    def Verify(self, request_iterator, **kw):
        return self._streaming("Verify", request_iterator, **kw)

    def _streaming(self, method: str, request, **kw):
        ch = self.targets._lease(self.address)
        try:
            call = getattr(verifier_pb2_grpc.VerifierServiceStub(ch.channel), method)(request, **kw)
        except BaseException:
            self.targets._release(ch)
            raise
        call.add_done_callback(lambda _call: self.targets._release(ch))  # at once if it already ended
        return call


class Targets:
    """Channels, target tokenizers and template drafters of the verifiers sessions name (module docstring).

    `make_drafter(target_vocab, mode)` builds a template drafter (the service's model and settings)."""

    def __init__(self, make_drafter: Callable, tls: TLS = PLAINTEXT, allowed: Optional[AllowedVerifiers] = None,
                 max_channels: int = MAX_CHANNELS, max_vocabs: int = MAX_VOCABS, max_drafters: int = MAX_DRAFTERS):
        self.make_drafter, self.tls = make_drafter, tls
        self.allowed = allowed if allowed is not None else AllowedVerifiers(None)
        self.max_channels, self.max_vocabs, self.max_drafters = max_channels, max_vocabs, max_drafters
        self._lock = threading.Lock()
        self._channels: "OrderedDict[str, _Channel]" = OrderedDict()  # least recently used first
        self._vocabs: OrderedDict = OrderedDict()  # fingerprint -> Vocab
        self._drafters: OrderedDict = OrderedDict()  # (fingerprint, mode) -> Drafter
        self._building: dict = {}  # key -> Future of what is being fetched or built

    def target(self, address: str) -> tuple:
        """(stub, target Vocab, fingerprint) of the verifier at `address`; PermissionDenied if it is not
        allowed, Unavailable if it cannot be reached."""
        self.allowed.check(address)
        stub = VerifierStub(self, address)
        try:
            info = stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"verifier {address} cannot be reached: {one_line(e.details() or '')}") from None
            raise
        fp = info.tokenizer_fingerprint
        vocab = self._once(self._vocabs, self.max_vocabs, fp, lambda: fetch_tokenizer(stub, fp, address))
        return stub, vocab, fp

    def drafter(self, fp: str, mode: str, target_vocab):
        """The template drafter for this target tokenizer and mode (FailedPrecondition: the pair cannot
        be bridged that way)."""
        return self._once(self._drafters, self.max_drafters, (fp, mode), lambda: self.make_drafter(target_vocab, mode))

    def _once(self, cache: OrderedDict, limit: int, key, build: Callable):
        """cache[key]; if missing, `build()` outside the lock, one build per key in flight (the callers of
        that key meanwhile wait for it, and get its error if it fails); at most `limit` kept."""
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            pending = self._building.get((id(cache), key))
            mine = pending is None
            if mine:
                pending = self._building[(id(cache), key)] = Future()
        if not mine:
            return pending.result()
        try:
            value = build()
        except BaseException as e:
            with self._lock:
                del self._building[(id(cache), key)]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._building[(id(cache), key)]
            cache[key] = value
            while len(cache) > limit:
                cache.popitem(last=False)
        pending.set_result(value)
        return value

    # --- channels -------------------------------------------------------------------------------
    def _lease(self, address: str) -> _Channel:
        to_close = []
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = _Channel(address, self.tls.channel(address, CHANNEL_OPTIONS, "verifier"))
                while len(self._channels) > self.max_channels:
                    _, old = self._channels.popitem(last=False)
                    old.evicted = True
                    if old.calls == 0:
                        to_close.append(old)
            self._channels.move_to_end(address)
            ch.calls += 1
        for old in to_close:
            old.channel.close()
        return ch

    def _release(self, ch: _Channel) -> None:
        with self._lock:
            ch.calls -= 1
            close = ch.evicted and ch.calls == 0
        if close:
            ch.channel.close()

    def cached(self) -> dict:
        """What is kept now: {"channels": addresses, "vocabs": fingerprints, "drafters": (fingerprint, mode)s},
        least recently used first (for the metrics and the tests)."""
        with self._lock:
            return {"channels": list(self._channels), "vocabs": list(self._vocabs), "drafters": list(self._drafters)}
