"""What the gateway remembers of hand-backs: where drafting stopped paying, and each verifier's load.

Owns: `HandBacks`. A drafter hands a session back when the verifier's load has cut its drafting to nothing
(docs/serving.md, "Handed back"), saying below which load (sequences per pass) drafting would pay again.
The gateway remembers that threshold per (verifier, drafter model, algorithm, decoding mode), and the last
load each verifier reported in the verdicts of the sessions the gateway steps itself. A new session of
such a pair, while that verifier's recent load is at or above the threshold, starts on the verifier
directly: it skips the drafter's relayed rounds and the switch that the hand-back would cost a few tokens
later, and goes to its drafter once the load falls below the threshold, as a handed-back session does.

Both memories are short (`FRESH_LOAD_S`, `FRESH_THRESHOLD_S`): stale, a session starts on its drafter,
which measures for itself. Thread-safe: each session's thread reads and writes.

Never: decides a draft length, or anything a drafter measures; touches the wire or the store.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

# A session handed back runs this many target steps on the verifier before it goes back to its drafter
# to be measured again (unless the load falls first), twice as many at each later hand-back, at most
# HAND_BACK_STEPS_MAX: under steady load a session spends most of its tokens without the relay.
HAND_BACK_STEPS = 256
HAND_BACK_STEPS_MAX = 4096
FRESH_LOAD_S = 2.0  # a verifier's load older than this is not used to start a session on it directly
FRESH_THRESHOLD_S = 60.0  # ... nor a hand-back's threshold older than this
MAX_KEYS = 1024


class HandBacks:
    def __init__(self):
        self._lock = threading.Lock()
        self._below: dict = {}  # (verifier, drafter model, algorithm, greedy) -> (threshold, when)
        self._load: dict = {}  # verifier -> (sequences per pass, when)

    @staticmethod
    def key(req: dict) -> tuple:
        """(A caller's fixed draft length is never cut by the load: such sessions never hand back.)"""
        return (req["verifier_address"], req.get("drafter", ""), req["algorithm"], req["params"]["temperature"] == 0,
                bool(req.get("draft_tokens")))

    def handed_back(self, req: dict, come_back_below: float) -> None:
        with self._lock:
            if len(self._below) >= MAX_KEYS:
                self._below.clear()
            self._below[self.key(req)] = (come_back_below, time.monotonic())

    def load(self, verifier: str, sequences: float) -> None:
        with self._lock:
            if len(self._load) >= MAX_KEYS:
                self._load.clear()
            self._load[verifier] = (sequences, time.monotonic())

    def start_direct(self, req: dict) -> Optional[float]:
        """The threshold to come back below, if a new session of this kind should start on the verifier."""
        now = time.monotonic()
        with self._lock:
            below = self._below.get(self.key(req))
            load = self._load.get(req["verifier_address"])
        if below is None or load is None or now - below[1] > FRESH_THRESHOLD_S or now - load[1] > FRESH_LOAD_S:
            return None
        return below[0] if load[0] >= below[0] else None
