"""The requests of the gateway's own Verify stream: the target's steps, one token each, kept ahead.

Owns: `TargetSteps`, what `GatewayServicer._verifier_alone` sends on a Verify stream it runs itself (a
session of the target alone, one no drafter can run, one its drafter handed back): the start, then a
proposal stale on purpose (its empty verdict says the committed length the verifier has for the session),
then empty proposals, each the target's own step, `STEPS_IN_FLIGHT` of them in flight as the drafter
service keeps them (crossdraft/rounds.py), so that the verifier finds the session's next step waiting when
a pass ends. A handed-back session proposes at most `limit` steps; `done` says when each of them has been
answered, so that its stream can end cleanly.

Never: reads verdicts, commits, or decides when a session goes back to its drafter (the gateway does).
"""
from __future__ import annotations

import queue
from typing import Optional

from crossdraft.protocol import STEPS_IN_FLIGHT
from crossdraft.v1 import verifier_pb2


def _step(seq: int) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(proposal=verifier_pb2.Proposal(seq=seq, kind=verifier_pb2.PROPOSAL_KIND_TOKENS))


class TargetSteps:
    def __init__(self, start: verifier_pb2.VerifyStart, limit: Optional[int] = None):
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._q.put(verifier_pb2.VerifyRequest(start=start))
        self._q.put(_step(0))  # stale on purpose: its empty verdict says where the session is
        self.left = limit  # steps still to propose (None: to the session's end)
        self.sent = 0  # steps proposed and not answered yet

    def requests(self):
        """The stream's requests (give it to the Verify call)."""
        while (m := self._q.get()) is not None:
            yield m

    def begin(self, at: int) -> None:
        """The session is at committed length `at` (the stale proposal's verdict): the first steps."""
        for seq in range(at, at + STEPS_IN_FLIGHT):
            self._propose(seq)

    def answered(self, at: int) -> None:
        """A step was answered and the session is at `at` now: keep `STEPS_IN_FLIGHT` ahead."""
        self.sent = max(0, self.sent - 1)
        self._propose(at + STEPS_IN_FLIGHT - 1)

    def stop(self) -> None:
        """No more steps after those in flight."""
        self.left = 0

    @property
    def done(self) -> bool:
        """Every step of a limited run proposed and answered."""
        return self.left == 0 and self.sent == 0

    def close(self) -> None:
        """Half-close the stream."""
        self._q.put(None)

    def _propose(self, seq: int) -> None:
        if self.left is not None:
            if self.left <= 0:
                return
            self.left -= 1
        self.sent += 1
        self._q.put(_step(seq))
