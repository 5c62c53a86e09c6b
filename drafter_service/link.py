"""The drafter's end of a session's Verify stream, as the round loop's "verifier" (`rounds.VerifierLink`).

Owns: opening the bidirectional Verify stream (the drafter is the client) with the session's
VerifyStart, sending each round's proposal, reading each verdict (checked by `wire.verdict_from_proto`,
its seal kept for the gateway), remembering the verifier's load hint, and ending the stream: a
half-close after the last verdict, a cancel otherwise (the caller went away, or the session failed).

Never: drafts, decides anything about acceptance, or trusts the verdict's shape without checking it.
"""
from __future__ import annotations

import queue
from typing import Optional

from crossdraft import wire
from crossdraft.errors import Unavailable
from crossdraft.protocol import STEPS_IN_FLIGHT, Proposal, Verdict
from crossdraft.v1 import verifier_pb2


class RemoteVerifier:
    depth = STEPS_IN_FLIGHT  # rounds of the target's own step a session keeps in flight (rounds.run_rounds)
    overlaps = True  # the verifier works elsewhere: drafting ahead meanwhile may pay (rounds.run_rounds)

    def __init__(self, stub, start: wire.SessionStart, context=None, loads: Optional[dict] = None, key: str = ""):
        """Open the stream; `context`: the RunSession call's, whose end cancels the stream too. `loads`:
        the last load hint of each verifier (`key`) this process heard, shared by its sessions: a session's
        first rounds, before a verdict of its own says the load, go by it (a session that starts or comes
        back under load does not draft, and prefill its drafter, for a round that cannot pay)."""
        self._requests: "queue.SimpleQueue" = queue.SimpleQueue()
        self._requests.put(verifier_pb2.VerifyRequest(start=wire.start_to_proto(start)))
        self.call = stub.Verify(self._stream())
        if context is not None:
            context.add_callback(self.call.cancel)  # the caller went away: end the Verify stream too
        self._loads, self._key = loads, key
        self._load = loads.get(key) if loads is not None else None
        self.finished = False

    def _stream(self):
        while (msg := self._requests.get()) is not None:
            yield msg

    def submit(self, proposal: Proposal) -> None:
        self._requests.put(verifier_pb2.VerifyRequest(proposal=wire.proposal_to_proto(proposal)))

    def result(self) -> Verdict:
        resp = next(self.call, None)
        if resp is None:
            raise Unavailable("the verifier closed the session's stream before it finished")
        verdict = wire.verdict_from_proto(resp.verdict)
        verdict.seal = resp.verdict.seal
        if verdict.load is not None:
            self._load = verdict.load
            if self._loads is not None:
                self._loads[self._key] = verdict.load
        self.finished = verdict.finished
        return verdict

    def load(self) -> Optional[object]:
        return self._load

    def end(self) -> None:
        """Half-close with no round in flight, and read the stream to its end: by then the verifier has
        closed its side, and parked the session for whoever steps it next (a hand-back)."""
        self._requests.put(None)
        for _ in self.call:
            pass
        self.finished = True  # (nothing left to cancel)

    def close(self) -> None:
        self._requests.put(None)  # half-close the Verify stream
        if not self.finished:
            self.call.cancel()
