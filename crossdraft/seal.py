"""Verdict seals: the verifier's signature on what it committed.

Owns: the key (a file), and which bytes of a verdict are signed.

Why: a drafter relays the verifier's verdicts to the gateway (drafter_service/server.py, one
RunSession stream), and the gateway commits what it relays. The verifier checks every proposal (the
trust boundary, verifier.py), but without a seal a buggy or hostile drafter could still rewrite the
committed ids or text on their way to the gateway. With a key shared by the verifiers and the gateway
and never given to the drafters, the verifier seals each verdict, the drafter passes the seal along, and
the gateway commits a delta only when its seal checks; a delta that does not check is the drafter's
failure (the session fails over to another drafter, or to the verifier alone). So a drafter can slow a
session down, never change its output.

The seal is HMAC-SHA256 over: a version tag, the session id, the delta's offset in the generated ids,
the ids, the text, finished and the finish reason. Offset and session id bind a seal to its place: a
drafter cannot replay a verdict of another session or another position. What a drafter reports about
speed (statistics, the algorithm) is not sealed: it can lie about its own speed, not about the output.

Never: imports grpc or redis; logs a key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Sequence

from .errors import InvalidArgument

MIN_KEY_BYTES = 16
_TAG = b"crossdraft.verdict.v1\0"


def _message(session_id: str, offset: int, ids: Sequence[int], text: bytes, finished: bool,
             finish_reason: str) -> bytes:
    sid = session_id.encode("utf-8")
    reason = (finish_reason or "").encode("utf-8")
    return b"".join((_TAG, struct.pack("<I", len(sid)), sid, struct.pack("<IIB", offset, len(ids), bool(finished)),
                     struct.pack(f"<{len(ids)}i", *ids), struct.pack("<I", len(text)), bytes(text),
                     struct.pack("<I", len(reason)), reason))


class Sealer:
    """Seals verdicts (the verifier) and checks seals (the gateway) with one shared key."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise InvalidArgument(f"a verdict key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    @classmethod
    def from_file(cls, path: str) -> "Sealer":
        """The key is the file's bytes, surrounding whitespace stripped (`new_key_file` writes 64 hex
        characters; any long random string will do)."""
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            raise InvalidArgument(f"cannot read the verdict key file {path}: {e.strerror}") from None
        try:
            return cls(key)
        except InvalidArgument as e:
            raise InvalidArgument(f"{path}: {e}") from None

    def seal(self, session_id: str, offset: int, ids: Sequence[int], text: bytes, finished: bool,
             finish_reason: str) -> bytes:
        return hmac.new(self._key, _message(session_id, offset, ids, text, finished, finish_reason),
                        hashlib.sha256).digest()

    def check(self, seal: bytes, session_id: str, offset: int, ids: Sequence[int], text: bytes, finished: bool,
              finish_reason: str) -> bool:
        return hmac.compare_digest(bytes(seal), self.seal(session_id, offset, ids, text, finished, finish_reason))


def new_key_file(path: str) -> str:
    """Write a new random key (32 bytes, as hex) readable by its owner only; -> path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


def sealer_from_args(args):
    """A Sealer from --verdict-key-file, or None."""
    path = getattr(args, "verdict_key_file", None)
    return Sealer.from_file(path) if path else None
