"""The target models a gateway serves, as its HTTP API needs them: names, context, tokenizer.

Owns: the list of targets (the model id of each verifier of the pool, with the drafters beside them),
the `GetInfo` of a verifier serving a named target (kept INFO_TTL_S, so a verifier restarted with
another model is seen), and that target's tokenizer, fetched from the verifier
(`VerifierService.GetTokenizer`, as drafters fetch it) and kept per tokenizer fingerprint: its chat
template, and the prompt's length in target tokens (usage, and a prompt too long for the context
refused before anything is written).

Never: holds session state, or picks the verifier that runs a session (the servicer does).
"""
from __future__ import annotations

import threading
import time

import grpc

from crossdraft.errors import NotFound, Unavailable
from crossdraft.serving.status import one_line
from crossdraft.serving.tokenizers import fetch_tokenizer
from crossdraft.v1 import verifier_pb2, verifier_pb2_grpc

from .pool import INFO_TIMEOUT_S, Pool

INFO_TTL_S = 10.0
MAX_TOKENIZERS = 16


class Targets:
    def __init__(self, verifiers: Pool, drafters: Pool):
        self.verifiers, self.drafters = verifiers, drafters
        self._lock = threading.Lock()
        self._info: dict = {}  # address -> (time, GetInfo response)
        self._vocabs: dict = {}  # tokenizer fingerprint -> Vocab
        self._fetching: dict = {}  # fingerprint -> lock, so one request fetches while others wait

    @staticmethod
    def _models(pool: Pool) -> tuple:
        """({model id: [addresses]}, whether any replica could not be reached)."""
        out: dict = {}
        down = False
        for a in pool.addresses:
            try:
                out.setdefault(pool.model_of(a), []).append(a)
            except Unavailable:
                down = True
        return out, down

    def models(self) -> list:
        """[{"id", "drafters"}] for every target a reachable verifier serves; Unavailable when none is."""
        targets, down = self._models(self.verifiers)
        if not targets and down:
            raise Unavailable("no verifier of this gateway can be reached")
        drafters = sorted(self._models(self.drafters)[0])
        return [{"id": m, "drafters": drafters} for m in sorted(targets)]

    def info(self, model: str) -> tuple:
        """(address, GetInfo) of a verifier serving `model`: NotFound when no reachable verifier serves it,
        Unavailable when none can be reached."""
        targets, down = self._models(self.verifiers)
        if model not in targets:
            if not targets and down:
                raise Unavailable("no verifier of this gateway can be reached")
            known = ", ".join(sorted(targets)) or "none"
            raise NotFound(f"the model {model!r} does not exist here; served: {known}")
        address = targets[model][0]
        now = time.monotonic()
        with self._lock:
            hit = self._info.get(address)
        if hit is not None and now - hit[0] < INFO_TTL_S:
            return address, hit[1]
        try:
            info = self._stub(address).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.RpcError as e:
            raise Unavailable(f"verifier {address} cannot be reached: {one_line(e.details() or '')}") from None
        with self._lock:
            self._info[address] = (now, info)
        return address, info

    def vocab(self, address: str, info):
        """The target tokenizer of the verifier at `address` (its GetInfo `info`), as a Vocab with `.hf`."""
        fp = info.tokenizer_fingerprint
        with self._lock:
            if fp in self._vocabs:
                return self._vocabs[fp]
            gate = self._fetching.setdefault(fp, threading.Lock())
        with gate:
            with self._lock:
                if fp in self._vocabs:
                    return self._vocabs[fp]
            try:
                vocab = fetch_tokenizer(self._stub(address), fp, address)
            except grpc.RpcError as e:
                raise Unavailable(f"verifier {address} did not send its tokenizer: {one_line(e.details() or '')}") \
                    from None
            with self._lock:
                while len(self._vocabs) >= MAX_TOKENIZERS:
                    self._vocabs.pop(next(iter(self._vocabs)))
                self._vocabs[fp] = vocab
                self._fetching.pop(fp, None)
            return vocab

    def _stub(self, address: str):
        return verifier_pb2_grpc.VerifierServiceStub(self.verifiers.channel(address))
