"""A verifier's tokenizer, fetched over gRPC: what a drafter (and the gateway) needs of the target
without a copy of its files.

Never: caches (callers keep what they fetched), or loads a model.
"""
from __future__ import annotations

import logging
import os
import tempfile

from crossdraft.errors import FailedPrecondition
from crossdraft.v1 import verifier_pb2
from crossdraft.vocab import Vocab

log = logging.getLogger("crossdraft.services")

MAX_TOKENIZER_BYTES = 256 << 20
TOKENIZER_TIMEOUT_S = 60.0


def fetch_tokenizer(stub, fp: str, address: str):
    """The target tokenizer of the verifier behind `stub` (`VerifierService.GetTokenizer`), as a `Vocab`:
    its files streamed in chunks, checked (names, order, size, the fingerprint the verifier's GetInfo
    gave), written to a temporary directory and loaded. FailedPrecondition for anything wrong."""
    files: dict = {}
    total = 0
    for chunk in stub.GetTokenizer(verifier_pb2.GetTokenizerRequest(), timeout=TOKENIZER_TIMEOUT_S):
        name = os.path.basename(chunk.file_name)
        if chunk.tokenizer_fingerprint != fp:
            raise FailedPrecondition(f"verifier {address} changed its tokenizer while sending it")
        if not name or name.startswith("."):
            raise FailedPrecondition(f"verifier {address} sent a tokenizer file with a bad name {chunk.file_name!r}")
        buf = files.setdefault(name, bytearray())
        total += len(chunk.data)
        if chunk.offset != len(buf) or total > MAX_TOKENIZER_BYTES:
            raise FailedPrecondition(f"verifier {address} sent its tokenizer file {name!r} out of order or too large")
        buf += chunk.data
    if not files:
        raise FailedPrecondition(f"verifier {address} sent no tokenizer files")
    with tempfile.TemporaryDirectory(prefix="crossdraft-target-tokenizer-") as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        vocab = Vocab.load(d)
    if vocab.fingerprint() != fp:
        raise FailedPrecondition(f"the tokenizer received from verifier {address} does not match its fingerprint")
    log.info("loaded the tokenizer of verifier %s (fingerprint %s, %d tokens)", address, fp, len(vocab))
    return vocab
