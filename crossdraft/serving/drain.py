"""Draining: how a drafter or a verifier leaves a pool (scale-down, rolling update, node drain) without a
client seeing an error.

Owns: a service's draining state and its sessions' part in it. On SIGTERM, `Service.wait` calls `begin`:
from then on `admit` refuses new sessions with UNAVAILABLE (the gateway places them on another member;
health is NOT_SERVING, so it stops choosing this one), and the running sessions go on. Those still
running at `hand_back` (half the grace period later) end at their next message with UNAVAILABLE and
`HAND_BACK`: the gateway fails each over to another member, which resumes it from the committed ids in
the session store, with identical output. `wait_idle` tells when none is left.

A servicer hooks in with two calls: `drain.admit()` where a session starts, and `drain.hold(messages)`
around the stream of its messages.

Never: knows what a session is or sends anything itself; the gRPC server's life is `service.py`'s.
"""
from __future__ import annotations

import re
import threading
import time

from crossdraft.errors import Unavailable

HAND_BACK = "draining (shutting down): the session is handed back, resume it on another replica"
_DRAINING = re.compile(r"\bthis (\w+) is draining \(shutting down\)")


def draining_role(message: str) -> str:
    """The role ("verifier", "drafter") whose draining ended a call with this status message (a session
    handed back, or a new one refused), as relayed through other services; "" for any other message."""
    m = _DRAINING.search(message or "")
    return m.group(1) if m else ""


class Drain:
    def __init__(self, role: str = "service"):
        self.role = role
        self.draining = threading.Event()
        self.handing_back = threading.Event()
        self._cond = threading.Condition()
        self.active = 0

    def admit(self) -> None:
        """Raise UNAVAILABLE when draining: a new session goes to another replica."""
        if self.draining.is_set():
            raise Unavailable(f"this {self.role} is draining (shutting down) and takes no new sessions")

    def hold(self, messages):
        """Yield `messages` (a session's stream), counting it as running; once handing back, end it with
        UNAVAILABLE after the message in hand (so the caller has everything committed so far)."""
        with self._cond:
            self.active += 1
        try:
            for m in messages:
                yield m
                if self.handing_back.is_set():
                    raise Unavailable(f"this {self.role} is {HAND_BACK}")
        finally:
            close = getattr(messages, "close", None)
            if close is not None:  # the producer behind it stops now, not when collected
                close()
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    def begin(self) -> None:
        self.draining.set()

    def hand_back(self) -> None:
        self.handing_back.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Until no session is running, at most `timeout_s`; True if none is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
