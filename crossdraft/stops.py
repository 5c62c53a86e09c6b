"""Stop strings: where a generation's output ends when the target writes one of them.

Owns: checking a request's stop strings (`check_stops`: at most MAX_STOPS, each 1-MAX_STOP_BYTES bytes
of UTF-8) and `StopCut`, a matcher over the committed byte stream, fed one delta at a time. It says
which bytes may go out now, holds back a tail that could be the start of a stop string (so that a
stop string split across two deltas is caught, and nothing of it was sent), and, once a stop string
is complete and no stop string that starts earlier can still complete, where the output ends: right
before the earliest stop string, as OpenAI's API does (the stop string itself is not part of the
output; at the end of a generation `flush` settles one still waiting). The output before the cut is
exactly the target's.

Stop strings match the generated text only (never the prompt), as bytes: a UTF-8 stop string can only
match at character boundaries, so the cut never splits a character.

Never: decides anything else about a generation (the target's EOS and max_new_tokens stay the
verifier's), imports grpc or redis.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .errors import InvalidArgument

MAX_STOPS = 16
MAX_STOP_BYTES = 256


def check_stops(stops) -> list:
    """A request's stop strings -> a list of str (duplicates dropped, order kept); InvalidArgument
    for anything else than up to MAX_STOPS non-empty strings of at most MAX_STOP_BYTES bytes."""
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, (list, tuple)):
        raise InvalidArgument("stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise InvalidArgument(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    out: list = []
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidArgument("every stop string must be a non-empty string")
        n = len(s.encode("utf-8", errors="surrogatepass"))
        if n > MAX_STOP_BYTES:
            raise InvalidArgument(f"a stop string is at most {MAX_STOP_BYTES} bytes of UTF-8, got {n}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("a stop string must be valid Unicode (no lone surrogates)") from None
        if s not in out:
            out.append(s)
    return out


class StopCut:
    """Feed the committed bytes in order; `feed` returns what may be output now. After a stop string
    is found (`hit`), nothing more goes out and `cut` is its start in the whole output (bytes)."""

    def __init__(self, stops: Sequence[str], held: bytes = b"", sent: int = 0):
        """`held`, `sent`: the state of a matcher to take over (a session resumed elsewhere): the bytes
        held back so far and the length of the output sent before them."""
        self.stops = [s.encode("utf-8") for s in check_stops(list(stops))]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held, self.sent = bytes(held), sent
        self.hit, self.cut = False, None

    def feed(self, data: bytes) -> bytes:
        """The bytes of `data` (and of what was held back) that may go out: none after a hit; up to the
        earliest stop string when one completes; else all but a tail that could begin one."""
        if self.hit:
            return b""
        buf = self.held + bytes(data)
        at = self._earliest(buf)
        keep = self._open_tail(buf)
        if at is not None and len(buf) - keep >= at:  # no stop string can still complete before it
            return self._stop(buf, at)
        # (with a stop string found, one that starts earlier may still complete: hold both)
        out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.sent += len(out)
        return out

    def ends(self, data: bytes) -> bool:
        """Feed `data`; whether a stop string has ended the output (the engine's check per round)."""
        self.feed(data)
        return self.hit

    def flush(self) -> bytes:
        """At the end of the generation: the bytes held back, which go out up to a stop string among
        them (one that was waiting on a longer one starting earlier, which never completed)."""
        if self.hit:
            return b""
        at = self._earliest(self.held)
        if at is not None:
            return self._stop(self.held, at)
        out, self.held = self.held, b""
        self.sent += len(out)
        return out

    def _stop(self, buf: bytes, at: int) -> bytes:
        self.hit, self.cut = True, self.sent + at
        self.held = b""
        self.sent += at
        return buf[:at]

    def _earliest(self, buf: bytes) -> Optional[int]:
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _open_tail(self, buf: bytes) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self.longest - 1), 0, -1):
            tail = buf[len(buf) - n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
