"""KV memory that is sized, not guessed: admission of sessions under a budget of cache memory.

Owns: the budget of one model's KV caches (bytes, from `--kv-budget-mb`, or by default enough for
`max_sessions` sessions of the full context), what each open session has reserved (positions x the
runner's bytes per position), and admission: a session that does not fit waits for others to end, at
most `wait_s`, and is then refused with a message that names the limit. A session reserves what it can
use at most (the verifier: its prompt and max_new_tokens; see each service), and its cache grows
lazily up to that (`runner.KVCache.limit`), so the caches of the open sessions never pass the budget
and nothing is allocated for sessions that are not open. No cache is ever evicted and rebuilt while
its session is open.

Never: allocates memory itself, or knows what a session is beyond its reservation.
"""
from __future__ import annotations

import threading
import time

from .errors import InvalidArgument, ResourceExhausted

MIB = 1 << 20


class KVBudget:
    def __init__(self, budget_bytes: int, bytes_per_token: int, max_model_len: int, wait_s: float = 10.0,
                 what: str = "KV cache"):
        if budget_bytes < bytes_per_token:
            raise InvalidArgument(f"the {what} budget ({budget_bytes / MIB:.1f} MiB) holds not even one position "
                                  f"({bytes_per_token} bytes)")
        self.budget, self.per_token, self.max_model_len = int(budget_bytes), int(bytes_per_token), max_model_len
        self.wait_s, self.what = wait_s, what
        self._cond = threading.Condition()
        self.reserved = 0  # bytes
        self.sessions = 0
        self.queued = 0  # sessions waiting for room now
        self.refused = 0  # sessions refused for want of room, ever

    @property
    def positions(self) -> int:
        """Positions the whole budget holds."""
        return self.budget // self.per_token

    def reserve(self, positions: int, wait_s: float | None = None) -> int:
        """Reserve room for `positions` (waiting up to wait_s for sessions to end); returns the bytes
        reserved, to give back with `release`. ResourceExhausted, naming the limit, if it cannot fit."""
        need = positions * self.per_token
        if need > self.budget:
            self.refused += 1
            raise ResourceExhausted(
                f"this session needs {positions} {self.what} positions ({need / MIB:.1f} MiB), more than the whole "
                f"budget of {self.positions} positions ({self.budget / MIB:.1f} MiB, --kv-budget-mb)")
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        with self._cond:
            self.queued += 1
            try:
                while self.reserved + need > self.budget:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.refused += 1
                        raise ResourceExhausted(
                            f"{self.what} budget full: {self.reserved / MIB:.1f} of {self.budget / MIB:.1f} MiB "
                            f"(--kv-budget-mb) reserved by {self.sessions} sessions, this one needs {need / MIB:.1f} "
                            f"MiB ({positions} positions); waited {self.wait_s:g} s (--kv-wait-seconds)")
                    self._cond.wait(left)
            finally:
                self.queued -= 1
            self.reserved += need
            self.sessions += 1
        return need

    def release(self, reserved: int) -> None:
        with self._cond:
            self.reserved -= reserved
            self.sessions -= 1
            self._cond.notify_all()

    def usage(self) -> dict:
        with self._cond:
            return {"budget_bytes": self.budget, "reserved_bytes": self.reserved, "sessions": self.sessions,
                    "queued": self.queued, "refused": self.refused, "bytes_per_token": self.per_token}


def default_budget(bytes_per_token: int, max_model_len: int, max_sessions: int, budget_mb: float = 0.0) -> int:
    """`--kv-budget-mb` in bytes, or (0) enough for max_sessions sessions of max_model_len positions."""
    if budget_mb < 0:
        raise InvalidArgument(f"--kv-budget-mb must be >= 0, got {budget_mb:g}")
    if budget_mb:
        return int(budget_mb * MIB)
    return bytes_per_token * max_model_len * max_sessions
