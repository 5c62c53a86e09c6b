"""Stop strings of the sessions a gateway commits to (the services' side of `crossdraft/stops.py`).

Owns: one `StopCut` per session with stop strings, fed each delta before it is committed, so that the
store only ever holds the text a client may see: a tail that could begin a stop string is held back
(the delta's ids are committed, its text later), and when a stop string completes, that commit is
the session's last, with finish reason `stop` and the text cut right before the stop string. The
held-back bytes go into the commit's `resume` state (`stop_held`), so a replica that takes the session
over, or this one after losing its matcher, carries on exactly; at the end of a session no stop
string ended, they are committed with the final delta.

Never: talks to a drafter or a verifier (the caller cancels them), or commits anything itself.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

from crossdraft.stops import StopCut
from crossdraft.store import SessionClosed

MAX_TRACKED = 4096  # matchers kept; one dropped is rebuilt from the store at the session's next commit


class Stopped(SessionClosed):
    """A stop string ended the session: its final commit is made, its drafter and verifier must stop."""


class SessionStops:
    """Matchers by session id; None for a session without stop strings."""

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._cuts: OrderedDict[str, Optional[StopCut]] = OrderedDict()

    def note(self, sid: str, stops) -> None:
        """A session starts here with these stop strings (none: nothing to do at its commits)."""
        self._put(sid, StopCut(stops) if stops else None)

    def forget(self, sid: str) -> None:
        with self._lock:
            self._cuts.pop(sid, None)

    def apply(self, sid: str, text: bytes, finished: bool, reason: str, resume: Optional[dict]) -> tuple:
        """A delta about to be committed -> (text, finished, reason, resume, stopped): the text that may
        be committed now; finished with reason 'stop' when a stop string completed in it."""
        cut = self._get(sid)
        if cut is None:
            return text, finished, reason, resume, False
        out = cut.feed(text)
        if finished and not cut.hit:
            out += cut.flush()  # (a stop string among the held bytes ends it too)
        if cut.hit:
            finished, reason = True, "stop"
        return out, finished, reason, dict(resume or {}, stop_held=cut.held.hex()), cut.hit

    def _get(self, sid: str) -> Optional[StopCut]:
        with self._lock:
            if sid in self._cuts:
                self._cuts.move_to_end(sid)
                return self._cuts[sid]
        s = self.store.get(sid, include_output=False)  # a session taken over, or whose matcher was dropped
        stops = s.request.get("stop") if s is not None else None
        cut = StopCut(stops, held=bytes.fromhex(s.resume.get("stop_held", ""))) if stops else None
        self._put(sid, cut)
        return cut

    def _put(self, sid: str, cut: Optional[StopCut]) -> None:
        with self._lock:
            self._cuts[sid] = cut
            self._cuts.move_to_end(sid)
            while len(self._cuts) > MAX_TRACKED:
                self._cuts.popitem(last=False)
