"""One Verify stream's rounds, run back to back in the model's scheduler while proposals wait.

Owns: `StreamRounds`, between a stream's two threads and the scheduler:
- the reader (a worker thread) takes each request off the wire and `put`s its proposal;
- a program in the model's scheduler takes the proposals in order and runs each round
  (`TargetSessions.round`: taken over -> ABORTED, stale -> an empty verdict without a pass);
- the handler's thread `get`s each verdict (or the error that ends the stream) and sends it.
When a round ends and the next proposal is already here (a pipelined session: the target's own steps,
up to four in flight), the next round starts in the scheduler's thread at once, in the next pass, without a
round trip through this stream's threads; the scheduler does not have to wait for it (its gathering
wait, crossdraft/scheduler.py). Measured before this, on the 2-core machine: that round trip left the
verifier idle about 11% of the time at 1 and at 8 clients. When no proposal waits, the program ends and
the next `put` submits a new one. A stale proposal that comes while nothing of the stream is in the
scheduler (idle: every verdict before it handed on) is answered by `put` itself: its empty verdict needs
no pass, and a program would first wait for the pass in progress to end. That is the gateway's first
proposal after a session's prefill (gateway/steps.py), whose verdict its first steps wait for: under load,
with prefill chunks in the passes, waiting for the pass cost each new session one pass (about 200 ms at
8 clients on the 2-core machine) before its first token. The program hands verdicts on through the scheduler's `later`, so the
stream's handler wakes once the pass's bookkeeping is over (crossdraft/scheduler.py).

Bounded: at most `limit` proposals may be taken off the wire and not yet sent as verdicts (a drafter
that sends without reading stalls its own stream, not the verifier's memory). The program never
blocks the scheduler: verdicts go to an unbounded queue whose length that limit bounds.

Never: touches the wire format, seals, metrics or the sessions table (TargetSessions does).
"""
from __future__ import annotations

import queue
import threading
from collections import deque

_END = object()


class StreamRounds:
    def __init__(self, sessions, sid: str, mine, limit: int):
        self.sessions, self.sid, self.mine = sessions, sid, mine
        self._lock = threading.Lock()
        self._inbox: deque = deque()
        self._running = False
        self._closed = False  # no more rounds: a finished verdict, an error, or the stream ended
        self._idle = threading.Event()
        self._idle.set()
        self._out: "queue.Queue" = queue.Queue()
        self._room = threading.Semaphore(limit)

    # --- the reader's side -------------------------------------------------------------------------
    def put(self, proposal, stop: threading.Event) -> bool:
        """Queue a round (after those queued before); False if `stop` was set while waiting for room."""
        while not self._room.acquire(timeout=0.1):
            if stop.is_set():
                return False
        with self._lock:
            if self._closed:
                return False
            if not self._running and not self._inbox and self._idle.is_set():
                verdict = self.sessions.stale_verdict(self.sid, proposal, self.mine)
                if verdict is not None:  # answered here: no program, so no wait for a pass to end
                    self._out.put((verdict, None))
                    return True
            self._inbox.append(proposal)
            if self._running:
                return True
            self._running = True
            self._idle.clear()
        try:
            self.sessions.model.submit(self._program()).add_done_callback(self._ended)
        except BaseException as e:  # noqa: BLE001 - the scheduler is closed: the stream ends with it
            self._stopped()
            self._out.put((_END, e))
        return True

    def end(self, error: "BaseException | None" = None) -> None:
        """No more proposals (the requests ended, or reading them failed with `error`): after the verdicts
        of those queued, `get` raises `error` or reports the end."""
        self._idle.wait()
        self._out.put((_END, error))

    # --- the handler's side ------------------------------------------------------------------------
    def get(self):
        """The next verdict; None at the end of the requests; raises what ended the stream."""
        item, err = self._out.get()
        if item is _END:
            if err is not None:
                raise err
            return None
        self._room.release()
        return item

    def close(self, timeout_s: float = 30.0) -> None:
        """No more rounds; waits for a round in a pass to end (its session's cache is about to go)."""
        with self._lock:
            self._closed = True
        self._idle.wait(timeout_s)

    # --- the scheduler's side ----------------------------------------------------------------------
    def _program(self):
        """Rounds while proposals wait (a program of crossdraft/scheduler.py, in its thread). What it hands
        to the other threads goes through `later` (the scheduler's wake-ups after a pass), in order: each
        verdict, then the error or the idle signal that `end` waits for after them."""
        later = self.sessions.model.later
        normal = False
        try:
            while True:
                with self._lock:  # the check and the stop in one step: a `put` now submits anew
                    if self._closed or not self._inbox:
                        self._running, normal = False, True
                    else:
                        proposal = self._inbox.popleft()
                if normal:
                    later(self._idle_unless_running)
                    return
                try:
                    verdict = yield from self.sessions.round(self.sid, proposal, self.mine)
                except GeneratorExit:
                    raise
                except BaseException as e:  # noqa: BLE001 - this stream's error, handed to its handler
                    later(self._out.put, (_END, e))
                    return
                if verdict.finished:
                    with self._lock:
                        self._closed = True
                later(self._out.put, (verdict, None))
        finally:
            if not normal:  # an error, or the scheduler closed the program: no more rounds
                later(self._stopped)

    def _idle_unless_running(self) -> None:
        """(After the verdicts handed on before it.) Idle, unless a `put` has started a new program since."""
        with self._lock:
            if not self._running:
                self._idle.set()

    def _ended(self, fut) -> None:
        """The program's future: an error from outside its rounds (a failed pass, a closed scheduler)."""
        err = None if fut.cancelled() else fut.exception()
        if err is not None:
            self._stopped()
            self._out.put((_END, err))

    def _stopped(self) -> None:
        with self._lock:
            self._closed, self._running = True, False
            self._inbox.clear()
        self._idle.set()
