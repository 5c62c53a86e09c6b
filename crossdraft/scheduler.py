"""Continuous batching: many sequences' steps in each forward pass of one model.

Owns: running *programs* against one runner. A program is a generator that yields `runner.Step`s and
receives each step's logits back (`logits = yield Step(...)`), and finally returns its result: a
verification round (`Verifier.round`), a prefill (`Verifier.prefill`), a draft (`Drafter.draft`).
Written that way, the same program runs alone (`drive`: each step is a forward pass of its own, what
one stream in process does) or batched with every other program that waits (`Scheduler`).

The scheduler's loop, in one thread per model, as vLLM's and TGI's schedulers do it:
1. take the programs submitted since the last pass and run each up to its first step;
2. build the next pass from every waiting step, oldest first, under a token budget
   (`max_batch_tokens`): steps of running sequences first (a verification block, a drafted token),
   then chunks of long steps marked `chunk=True` (a new prompt's prefill) with what is left, so a long
   prompt adds at most one pass's worth of tokens to any pass and never stalls the others; a step
   alone in a pass always runs whatever its size;
3. one `runner.forward_batch`, then each program gets its logits and runs on to its next step.
No fixed timer: a pass starts as soon as the model is free and something waits, so alone a step runs
at once. One exception, bounded: each session's next step comes back only after a round trip outside
the model (its verdict goes to the drafter, which sends the next proposal), so right after a pass the
sessions that were in it are all away, and the first to return would start a pass alone, the others
joining the one after: batches fragment. With `expected` (how many sessions will submit again, e.g.
the verifier's open sessions), the loop waits for the ones still away, at most `GATHER_FRACTION` of a
recent pass and never more than `GATHER_MAX_S`: it costs a session alone nothing (none is away), and
under load it trades a fraction of a pass for whole batches.

One sequence's trouble never fails the others: a step that cannot run (context full) fails its own
program before the pass (`runner.check`); an exception in a program's own code fails that program;
a cancelled program (its future cancelled: the session ended) is dropped before the next pass.
What each pass cost goes to `observer(sequences, tokens, seconds, waits)` (metrics, the load model).

Alone, a program may also run in its caller's thread (`inline`, the drafter service with one session):
`run` then drives it there while the loop holds nothing and nothing waits, the model taken under the
lock every pass takes, so that a program submitted meanwhile waits for it and then runs as usual. Its
steps are checked and counted as the loop's are; a chunked step runs in chunks of the budget. It saves
the two thread hand-offs of each call: measured in the drafter service at 1 client (`same`, 2-core
CPU, 5 pairs), 0.24 ms of a 3.2 ms draft (docs/benchmarks.md).

Wake-ups wait for the pass's bookkeeping: a program that ends, or hands something to another thread
through `later` (a verdict to its stream's sender), wakes that thread only once every program of the
pass has run on to its next step. Woken earlier, those threads take the GIL at each small tensor op of
the programs still to run (an argmax, a truncation), and the model waits on each of them in turn:
measured in the verifier at 8 clients, 2.2 ms per pass of bookkeeping of which 0.6 ms was its own work.
Woken after, they run while the next pass is in its long matrix products, which release the GIL.

Never: knows what a program is for, or touches sessions, sampling or the wire.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable, Generator, Optional

from .runner import Runner, Step

log = logging.getLogger("crossdraft.scheduler")

DEFAULT_MAX_BATCH_TOKENS = 512
GATHER_FRACTION = 0.25  # of a recent pass: the longest the loop waits for sessions still away
GATHER_MAX_S = 0.004

Program = Generator  # yields Step, receives logits, returns its result


def drive(runner: Runner, program: Program):
    """Run a program alone: each of its steps is one forward pass. Returns its result."""
    try:
        step = next(program)
        while True:
            step = program.send(runner.forward_batch([step])[0])
    except StopIteration as done:
        return done.value


class _Entry:
    """A submitted program: its future, the step it waits on, and how much of a chunked step has run."""

    __slots__ = ("program", "future", "step", "done", "since")

    def __init__(self, program, future):
        self.program, self.future = program, future
        self.step: Optional[Step] = None
        self.done = 0  # tokens of a chunked step already run
        self.since = time.perf_counter()  # when its current step started waiting


class Scheduler:
    """One model's batching loop (see the module docstring). `submit(program)` from any thread returns a
    Future of the program's result; `run(program)` waits for it."""

    def __init__(self, runner: Runner, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, name: str = "model",
                 observer: Optional[Callable] = None, expected: Optional[Callable[[], int]] = None,
                 inline: Optional[Callable[[], bool]] = None, trace: Optional[Callable[[dict], None]] = None):
        """`inline`: whether `run` may drive a program in the caller's thread when the loop is idle (see
        the module docstring); None: never. `trace`: called after each pass with what it ran and what it
        cost (`_traced`; `--pass-log`, crossdraft/batched.py), or None."""
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.runner, self.max_batch_tokens, self.name = runner, max_batch_tokens, name
        self.observer, self.expected, self.inline, self.trace = observer, expected, inline, trace
        self._model = threading.Lock()  # the runner: taken by each pass, and by a program run inline
        self._holding = 0  # programs the loop holds (under _cond)
        self._pass_s = 0.0  # recent pass time (exponential mean): bounds the gathering wait
        self._cond = threading.Condition()
        self._incoming: deque = deque()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._later: Optional[list] = None  # wake-ups held until the pass's programs have all advanced
        self.passes = 0

    # --- callers ----------------------------------------------------------------------------------
    def submit(self, program: Program) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} scheduler is closed")
            self._incoming.append(_Entry(program, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"{self.name}-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def run(self, program: Program):
        if self.inline is not None and self._take_inline():
            try:
                return self._drive(program)
            finally:
                self._model.release()
        return self.submit(program).result()

    def _take_inline(self) -> bool:
        """The model for a program run in the caller's thread: only while the loop holds nothing, nothing
        waits, and `inline()` allows it."""
        with self._cond:
            if self._incoming or self._holding or self._closed or not self.inline():
                return False
            return self._model.acquire(blocking=False)

    def _drive(self, program: Program):
        """Run a program here, its steps checked, chunked and counted as the loop's (the model taken)."""
        try:
            step = next(program)
            while True:
                self.runner.check(step)
                pieces = [step]
                if step.chunk and len(step.ids) > self.max_batch_tokens:
                    b = self.max_batch_tokens
                    pieces = [replace(step, ids=step.ids[i: i + b], chunk=False) for i in range(0, len(step.ids), b)]
                for piece in pieces:
                    t0 = time.perf_counter()
                    logits = self.runner.forward_batch([piece])[0]
                    t1 = time.perf_counter()
                    self._observed(1, len(piece.ids), t1 - t0, [0.0])
                    if self.trace is not None:
                        n = [len(piece.ids)]
                        self._traced(([], n) if step.chunk else (n, []), t0, t1, t1, inline=True)
                step = program.send(logits)
        except StopIteration as done:
            return done.value

    def later(self, fn: Callable, *args) -> None:
        """Run fn(*args) once every program of the pass in progress has run on to its next step (see the
        module docstring), or at once when called outside a pass or from another thread."""
        if self._later is not None and threading.current_thread() is self._thread:
            self._later.append((fn, args))
        else:
            fn(*args)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30.0)

    # --- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        active: list = []
        while True:
            with self._cond:
                self._holding = len(active)
                while not self._incoming and not active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                self._gather(len(active))
                new = list(self._incoming)
                self._incoming.clear()
                self._holding = len(active) + len(new)
            for e in new:
                if e.future.set_running_or_notify_cancel():
                    self._advance(e, None, first=True)
                    if e.step is not None:
                        active.append(e)
            active = [e for e in active if not self._dropped(e)]
            if active:
                with self._model:
                    self._pass(active)
                active = [e for e in active if e.step is not None]
        for e in active + list(self._incoming):
            e.program.close()
            if not e.future.done():
                e.future.set_exception(RuntimeError(f"the {self.name} scheduler closed"))

    def _gather(self, waiting: int) -> None:
        """(Under the lock.) Wait briefly for the sessions still away (see the module docstring)."""
        if self.expected is None or self._pass_s <= 0:
            return
        deadline = time.perf_counter() + min(GATHER_MAX_S, GATHER_FRACTION * self._pass_s)
        while len(self._incoming) + waiting < self.expected() and not self._closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    @staticmethod
    def _dropped(e: _Entry) -> bool:
        if e.future.cancelled():
            e.program.close()
            e.step = None
            return True
        return False

    def _advance(self, e: _Entry, logits, first: bool = False) -> None:
        """Run a program on to its next step (checked: a step that cannot run fails its program)."""
        try:
            step = next(e.program) if first else e.program.send(logits)
            self.runner.check(step)
            if step.chunk and not step.last:
                raise ValueError("a chunked step must ask for the last position's logits only")
        except StopIteration as done:
            e.step = None
            self.later(e.future.set_result, done.value)
            return
        except BaseException as exc:  # noqa: BLE001 - this program fails, the others go on
            e.step = None
            e.program.close()
            self.later(e.future.set_exception, exc)
            return
        e.step, e.done, e.since = step, 0, time.perf_counter()

    def _select(self, active: list) -> list:
        """[(entry, step to run)] for the next pass: whole steps first, then chunks, under the budget."""
        budget = self.max_batch_tokens
        out = []
        for e in active:  # oldest first (entries keep their submission order)
            s = e.step
            if s.chunk:
                continue
            if len(s.ids) <= budget or not out:
                out.append((e, s))
                budget -= len(s.ids)
        for e in active:
            s = e.step
            if not s.chunk or (budget <= 0 and out):
                continue
            take = min(len(s.ids) - e.done, max(budget, 1))
            piece = s if take == len(s.ids) else replace(s, ids=s.ids[e.done: e.done + take], chunk=False)
            out.append((e, piece))
            budget -= take
        return out

    def _observed(self, sequences: int, tokens: int, seconds: float, waits: list) -> None:
        """Count a pass: the recent pass time (the gathering wait) and the observer."""
        self.passes += 1
        self._pass_s = seconds if not self._pass_s else 0.9 * self._pass_s + 0.1 * seconds
        if self.observer is not None:
            try:
                self.observer(sequences, tokens, seconds, waits)
            except Exception:  # noqa: BLE001 - counting must never stop the model
                log.exception("%s: the pass observer failed", self.name)

    def _traced(self, shape: tuple, t0: float, t1: float, t2: float, inline: bool = False) -> None:
        """`trace` a pass: the model's name, its start (wall clock), the tokens of its whole steps and of its
        chunks (pieces of prefills), the forward's milliseconds and the bookkeeping's after it (each program
        run on to its next step, the wake-ups; a pass run inline: 0, its program runs on in the caller's thread)."""
        rec = {"model": self.name, "t": round(time.time() - (time.perf_counter() - t0), 4), "steps": shape[0],
               "chunks": shape[1], "forward_ms": round((t1 - t0) * 1e3, 3), "after_ms": round((t2 - t1) * 1e3, 3)}
        if inline:
            rec["inline"] = True
        try:
            self.trace(rec)
        except Exception:  # noqa: BLE001 - a diagnostic must never stop the model
            log.exception("%s: the pass trace failed", self.name)

    def _pass(self, active: list) -> None:
        chosen = self._select(active)
        shape = None if self.trace is None else ([len(p.ids) for e, p in chosen if not e.step.chunk],
                                                 [len(p.ids) for e, p in chosen if e.step.chunk])
        t0 = time.perf_counter()
        waits = [t0 - e.since for e, _ in chosen]
        try:
            results = self.runner.forward_batch([s for _, s in chosen])
        except BaseException as exc:  # noqa: BLE001 - checked steps should not fail; if they do, these do
            log.exception("%s: a batched forward pass failed", self.name)
            for e, _ in chosen:
                e.step = None
                e.program.close()
                e.future.set_exception(exc)
            return
        t1 = time.perf_counter()
        self._observed(len(chosen), sum(len(s.ids) for _, s in chosen), t1 - t0, waits)
        self._later = []
        try:
            for (e, piece), logits in zip(chosen, results):
                if e.step.chunk:
                    e.done += len(piece.ids)
                    if e.done < len(e.step.ids):
                        continue  # more chunks to go; it keeps its place in the queue
                self._advance(e, logits)
        finally:
            held, self._later = self._later, None
            for fn, args in held:
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - one wake-up's failure must not stop the model
                    log.exception("%s: a wake-up after a pass failed", self.name)
        if shape is not None:
            self._traced(shape, t0, t1, time.perf_counter())
