"""One model served to many sessions at once: what a model service (verifier or drafter) runs.

Owns: a model's runner with the `Scheduler` that batches its sessions' steps (continuous batching,
crossdraft/scheduler.py), the `CostModel` of its passes (the load a verifier reports for load-aware
speculation, crossdraft/load.py), the `KVBudget` its sessions are admitted under
(crossdraft/kvbudget.py), the limits an operator sets for all of them (`Limits`), and the pass log
an operator may ask for (`PassLog`, `--pass-log`).

Never: knows what a session is for (verification or drafting), imports grpc or metrics libraries
(a service passes an `observer` for each pass and reads `usage()`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import InvalidArgument
from .kvbudget import KVBudget, default_budget
from .load import MIN_PASSES, CostModel
from .runner import KVCache, Runner, Step
from .scheduler import DEFAULT_MAX_BATCH_TOKENS, Scheduler

log = logging.getLogger("crossdraft.batched")

PRIME_SIZES = (2, 3, 4, 6, 8, 12, 16, 24)  # tokens of the passes `prime_cost` times: a spread, MIN_PASSES of them
assert len(PRIME_SIZES) >= MIN_PASSES


def prime_cost(cost: CostModel, runner: Runner) -> None:
    """Seed `cost` with passes of a few sizes timed on a scratch cache, before any session runs (the runner
    must be free: at a service's load, or before a batch starts). Without it the load cap has no price
    for a busy start's first rounds (the fit needs MIN_PASSES passes of several sizes), and each of them
    drafts at full length, its drafter prefilling the whole prompt for a round of little gain. One
    sequence a pass, every row's logits (as a verification): on the weights, which dominate a pass, as
    many rows of many sequences cost about the same. Real passes outweigh these within a few dozen."""
    vocab = max(1, getattr(runner, "vocab_size", 2) - 1)
    for n in PRIME_SIZES:
        ids = [1 + i % vocab for i in range(n)]
        t0 = time.perf_counter()
        runner.forward_batch([Step(runner.new_cache(), ids)])
        cost.prime(n, time.perf_counter() - t0)


@dataclass(frozen=True)
class Limits:
    """An operator's limits for one model service (`crossdraft serve verifier|drafter` flags)."""
    max_sessions: int = 16  # sessions open at once
    kv_budget_mb: float = 0.0  # KV cache memory of all sessions; 0: max_sessions x max_model_len
    kv_wait_s: float = 10.0  # how long a session waits for KV room before RESOURCE_EXHAUSTED
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # tokens in one forward pass (prefill is chunked to fit)
    pass_log: str = ""  # not a limit, a diagnostic: a file for one JSON line per pass (`PassLog`); "": none

    def check(self) -> "Limits":
        if not 1 <= self.max_sessions <= 4096:
            raise InvalidArgument(f"--max-sessions must be in [1, 4096], got {self.max_sessions}")
        if self.kv_budget_mb < 0:
            raise InvalidArgument(f"--kv-budget-mb must be >= 0, got {self.kv_budget_mb:g}")
        if not 0 <= self.kv_wait_s <= 3600:
            raise InvalidArgument(f"--kv-wait-seconds must be in [0, 3600], got {self.kv_wait_s:g}")
        if not 16 <= self.max_batch_tokens <= 1 << 20:
            raise InvalidArgument(f"--max-batch-tokens must be in [16, 1048576], got {self.max_batch_tokens}")
        return self

    @classmethod
    def from_args(cls, args) -> "Limits":
        return cls(max_sessions=args.max_sessions, kv_budget_mb=getattr(args, "kv_budget_mb", 0.0) or 0.0,
                   kv_wait_s=getattr(args, "kv_wait_seconds", 10.0),
                   max_batch_tokens=getattr(args, "max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS),
                   pass_log=getattr(args, "pass_log", "") or "").check()


class PassLog:
    """`--pass-log FILE`: one JSON line per forward pass of a model service (the Scheduler's `trace`):
    `model` "verifier" or "drafter" (`serve all` logs both to one file), `t` when it started (wall
    clock, seconds), `steps` the tokens of each whole step in it (1: a target or drafter step; 1 + k: a
    verification), `chunks` those of each piece of a prefill, `forward_ms` and `after_ms` (the programs
    run on to their next steps, and the wake-ups), `inline` for a pass run in a session's own thread.
    What a timeline of passes shows and the metrics' histograms do not: when each session's steps come
    back (docs/benchmarks.md read a wave of new sessions from one). Appends; each model stops writing,
    once said in the log, at `max_bytes` of its own."""

    MAX_BYTES = 64 << 20

    def __init__(self, path: str, max_bytes: int = MAX_BYTES):
        try:
            self._fh = open(path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise InvalidArgument(f"--pass-log: cannot write {path}: {e.strerror or e}") from e
        self.path, self.max_bytes, self._left, self._lock = path, max_bytes, max_bytes, threading.Lock()

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh is None:
                return
            if len(line) > self._left:
                log.warning("--pass-log %s: %d bytes written, no more passes logged", self.path, self.max_bytes)
                self._fh.close()
                self._fh = None
                return
            self._fh.write(line)
            self._left -= len(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class BatchedModel:
    """A runner, its scheduler, the cost model of its passes and the KV budget of its sessions."""

    def __init__(self, runner: Runner, limits: Limits = Limits(), name: str = "model",
                 observer: Optional[Callable] = None, expected: Optional[Callable[[], int]] = None,
                 inline: Optional[Callable[[], bool]] = None):
        """`expected`: how many sessions will submit again (the scheduler's gathering wait), or None.
        `inline`: when `run` may drive a program in the caller's thread (Scheduler), or None: never."""
        self.runner, self.limits, self.name = runner, limits, name
        self.cost = CostModel()
        self.budget = KVBudget(default_budget(runner.bytes_per_token, runner.max_length, limits.max_sessions,
                                              limits.kv_budget_mb),
                               runner.bytes_per_token, runner.max_length, limits.kv_wait_s, what=f"{name} KV cache")
        self._observer = observer
        self.pass_log = PassLog(limits.pass_log) if limits.pass_log else None
        self.scheduler = Scheduler(runner, limits.max_batch_tokens, name, observer=self._observe, expected=expected,
                                   inline=inline, trace=self.pass_log)

    def _observe(self, sequences: int, tokens: int, seconds: float, waits: list) -> None:
        self.cost.observe(sequences, tokens, seconds)
        if self._observer is not None:
            self._observer(sequences, tokens, seconds, waits)

    def admit(self, cache: KVCache, positions: int) -> int:
        """Admit a session's cache under the budget for at most `positions` (waits, then ResourceExhausted
        naming the limit); the cache then never grows past them. Returns the bytes reserved, to give back
        with `release` when the session ends."""
        positions = max(1, min(positions, self.runner.max_length))
        reserved = self.budget.reserve(positions)
        cache.limit = positions
        return reserved

    def release(self, reserved: int) -> None:
        self.budget.release(reserved)

    def run(self, program):
        return self.scheduler.run(program)

    def submit(self, program):
        return self.scheduler.submit(program)

    def later(self, fn, *args) -> None:
        """fn(*args) once the programs of the pass in progress have all advanced (Scheduler.later)."""
        self.scheduler.later(fn, *args)

    def allocated(self, caches) -> int:
        """Bytes the given caches hold now (their capacity, not their length)."""
        cap = getattr(self.runner, "capacity", None)
        return sum(cap(c) for c in caches) * self.runner.bytes_per_token if cap else 0

    def usage(self, caches=()) -> dict:
        out = self.budget.usage()
        out.update(allocated_bytes=self.allocated(caches), max_model_len=self.runner.max_length,
                   kv_dtype=str(getattr(self.runner, "kv_dtype", "")).replace("torch.", ""),
                   max_batch_tokens=self.limits.max_batch_tokens, passes=self.scheduler.passes)
        hint = self.cost.hint()
        if hint is not None:
            out.update(sequences_per_pass=round(hint.sequences, 3), pass_fixed_s=hint.fixed_s,
                       pass_token_s=hint.token_s)
        return out

    def close(self) -> None:
        self.scheduler.close()
        if self.pass_log is not None:
            self.pass_log.close()

