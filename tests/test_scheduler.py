"""crossdraft.scheduler: programs (generators of forward steps) run alone (`drive`) or batched
(`Scheduler`) give the same results; the scheduler puts whatever waits into one pass, chunks a long
prefill under the token budget so running sequences go on meanwhile, and one program's failure or
cancellation never touches the others. Counts of passes and sequences, never timings."""
from __future__ import annotations

import threading

import pytest
import torch

from crossdraft.runner import LlamaRunner, Step
from crossdraft.scheduler import Scheduler, drive
from helpers import tiny_llama

V = 211


@pytest.fixture(scope="module")
def runner():
    return LlamaRunner(tiny_llama(V, seed=3, kv_heads=2), 256)


def greedy(runner, prompt: list, n: int):
    """Program: prefill `prompt`, then n greedy tokens one step at a time; returns the tokens."""
    cache = runner.new_cache()
    logits = yield Step(cache, prompt, last=True, chunk=True)
    out = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        logits = yield Step(cache, [t])
    return out


class Passes:
    """The scheduler's observer: (sequences, tokens) of every pass."""

    def __init__(self):
        self.seen = []
        self.lock = threading.Lock()

    def __call__(self, sequences, tokens, seconds, waits):
        assert len(waits) == sequences and seconds >= 0
        with self.lock:
            self.seen.append((sequences, tokens))


def prompts(k: int, n: int = 12) -> list:
    g = torch.Generator().manual_seed(k)
    return [torch.randint(1, V, (n + i,), generator=g).tolist() for i in range(k)]


def test_batched_programs_give_what_each_gives_alone(runner):
    """Eight programs submitted together: fewer passes than steps (they share passes), and each result
    is what the program gives alone (float64: batching changes no greedy choice)."""
    ps = prompts(8)
    alone = [drive(runner, greedy(runner, p, 10)) for p in ps]
    passes = Passes()
    sched = Scheduler(runner, max_batch_tokens=512, observer=passes)
    try:
        futures = [sched.submit(greedy(runner, p, 10)) for p in ps]
        got = [f.result(timeout=120) for f in futures]
    finally:
        sched.close()
    assert got == alone
    steps = sum(1 + 10 for _ in ps)
    assert sum(s for s, _ in passes.seen) == steps  # every step ran exactly once
    assert len(passes.seen) < steps and max(s for s, _ in passes.seen) > 1


def test_a_long_prefill_is_chunked_and_the_running_sequences_go_on(runner):
    """A 200-token prompt arriving while another sequence decodes, under a budget of 32 tokens a pass:
    no pass takes more than 32 tokens, the prompt's prefill spans several passes, and the running
    sequence takes a step in each of them instead of waiting for the prefill to end."""
    passes, traced = Passes(), []
    sched = Scheduler(runner, max_batch_tokens=32, observer=passes, trace=traced.append)
    started = threading.Event()

    def running():
        out = yield from greedy(runner, prompts(1)[0], 1)
        started.set()
        return out + (yield from greedy(runner, prompts(2)[1][:8], 20))

    try:
        a = sched.submit(running())
        assert started.wait(60)
        long_prompt = torch.randint(1, V, (200,), generator=torch.Generator().manual_seed(9)).tolist()
        b = sched.submit(greedy(runner, long_prompt, 2))
        a.result(timeout=120), b.result(timeout=120)
        assert b.result() == drive(runner, greedy(runner, long_prompt, 2))
    finally:
        sched.close()
    assert max(t for _, t in passes.seen) <= 32
    shared = [p for p in passes.seen if p[0] == 2]
    assert len(shared) >= 5  # the prefill's chunks ran beside the other sequence's steps
    # the trace (--pass-log): every pass, its whole steps and its prefill chunks apart, in order
    assert [(len(r["steps"]) + len(r["chunks"]), sum(r["steps"]) + sum(r["chunks"])) for r in traced] == passes.seen
    assert sum(sum(r["chunks"]) for r in traced) == len(prompts(1)[0]) + 200 + 8
    assert len([r for r in traced if r["steps"] == [1] and r["chunks"]]) >= 5
    assert all(r["forward_ms"] >= 0 and r["after_ms"] >= 0 and "inline" not in r for r in traced)
    assert [r["t"] for r in traced] == sorted(r["t"] for r in traced)


def test_one_program_fails_alone(runner):
    """A step past the context, and an exception in a program's own code, fail that program only; a
    cancelled program is dropped; the others finish with their own results."""
    def too_long():
        yield Step(runner.new_cache(), list(range(1, 300)))  # 299 > 256 positions

    def broken():
        yield Step(runner.new_cache(), [5, 6, 7], last=True)
        raise RuntimeError("a bug in this program")

    ps = prompts(3)
    sched = Scheduler(runner, max_batch_tokens=512)
    try:
        futs = [sched.submit(greedy(runner, p, 6)) for p in ps]
        bad = [sched.submit(too_long()), sched.submit(broken())]
        with sched._cond:  # (the loop cannot take it before it is cancelled: a session gone before its turn)
            cancelled = sched.submit(greedy(runner, ps[0], 50))
            assert cancelled.cancel()
        with pytest.raises(ValueError, match="context full"):
            bad[0].result(timeout=60)
        with pytest.raises(RuntimeError, match="a bug"):
            bad[1].result(timeout=60)
        assert [f.result(timeout=60) for f in futs] == [drive(runner, greedy(runner, p, 6)) for p in ps]
        assert cancelled.cancelled()
    finally:
        sched.close()


def test_drive_runs_each_step_as_its_own_pass(runner):
    p = prompts(1)[0]
    cache = runner.new_cache()
    want = runner.forward_batch([Step(cache, p, last=True)])[0]

    def one():
        return (yield Step(runner.new_cache(), p, last=True))

    torch.testing.assert_close(drive(runner, one()), want, rtol=0, atol=0)


def test_gathering_for_sessions_away_never_stalls_and_changes_no_result(runner):
    """`expected` says more sessions will come back than ever do (a session that went away for good):
    the loop's wait for them is bounded, so every step still runs, each program with its own result.
    Three sessions that submit one step at a time (as rounds come back from drafters) finish too."""
    ps = prompts(3)
    alone = [drive(runner, greedy(runner, p, 6)) for p in ps]
    sched = Scheduler(runner, max_batch_tokens=512, expected=lambda: 10)
    try:
        assert [sched.submit(greedy(runner, p, 6)).result(timeout=60) for p in ps] == alone

        def one_step_at_a_time(p):
            cache = runner.new_cache()
            logits = sched.run(_one(cache, p, True))
            out = []
            for _ in range(6):
                out.append(int(logits[-1].argmax()))
                logits = sched.run(_one(cache, [out[-1]], False))
            return out

        got = [None] * 3
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, one_step_at_a_time(ps[i]))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == alone
    finally:
        sched.close()


def _one(cache, ids, prefill):
    return (yield Step(cache, ids, last=True, chunk=prefill))


def test_wake_ups_wait_until_every_program_of_the_pass_has_advanced(runner):
    """`later` from a program in a pass runs after all the pass's programs have run on to their next
    step (and a finished program's future is set then too), in the order asked; from elsewhere at once."""
    events = []
    sched = Scheduler(runner, max_batch_tokens=512)

    def first():
        yield Step(runner.new_cache(), [3, 4, 5], last=True)
        events.append("first advanced")
        sched.later(events.append, "first's wake-up")
        sched.later(events.append, "first's second wake-up")
        yield Step(runner.new_cache(), [6], last=True)

    def second():
        yield Step(runner.new_cache(), [7, 8], last=True)
        events.append("second advanced")
        return "done"

    try:
        with sched._cond:  # both in the loop's first pass
            futs = [sched.submit(first()), sched.submit(second())]
            futs[1].add_done_callback(lambda f: events.append("second's future set"))
        for f in futs:
            f.result(timeout=60)
        assert events == ["first advanced", "second advanced", "first's wake-up", "first's second wake-up",
                          "second's future set"]
        sched.later(events.append, "from the test's thread")
        assert events[-1] == "from the test's thread"
    finally:
        sched.close()


class OneAtATime:
    """A runner wrapper that records which thread ran each pass, and fails if two passes overlap."""

    def __init__(self, runner, slow_s: float = 0.0):
        self.runner, self.slow_s = runner, slow_s
        self.threads, self.busy = [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward_batch(self, steps):
        assert self.busy.acquire(blocking=False), "two passes at once"
        try:
            self.threads.append(threading.current_thread())
            if self.slow_s:
                threading.Event().wait(self.slow_s)
            return self.runner.forward_batch(steps)
        finally:
            self.busy.release()


def test_a_program_alone_runs_inline_in_the_caller_s_thread(runner):
    """`inline`: with the loop idle, `run` drives the program in the caller's thread, chunking a long
    prefill under the budget and counting every pass; the result is what `drive` gives. When `inline()`
    says no, or a program is in the loop, it goes through the loop's thread as before."""
    p = prompts(1, n=40)[0]
    alone = drive(runner, greedy(runner, p, 6))
    allow, passes, traced = [True], Passes(), []
    wrapped = OneAtATime(runner)
    sched = Scheduler(wrapped, max_batch_tokens=16, observer=passes, inline=lambda: allow[0], trace=traced.append)
    try:
        assert sched.run(greedy(runner, p, 6)) == alone
        assert set(wrapped.threads) == {threading.current_thread()}
        assert passes.seen == [(1, 16), (1, 16), (1, 8)] + [(1, 1)] * 6  # 40 prompt tokens in chunks of 16
        assert [(r["steps"], r["chunks"], r["inline"]) for r in traced] == \
            [([], [16], True), ([], [16], True), ([], [8], True)] + [([1], [], True)] * 6
        allow[0], wrapped.threads = False, []
        assert sched.run(greedy(runner, p, 6)) == alone
        assert threading.current_thread() not in wrapped.threads
    finally:
        sched.close()


def test_a_program_run_inline_and_one_in_the_loop_never_share_the_model(runner):
    """Programs submitted while another runs inline wait for the model, never run beside it, and every
    result is what the program gives alone; a program submitted to a busy loop is not run inline."""
    ps = prompts(4, n=10)
    alone = [drive(runner, greedy(runner, p, 8)) for p in ps]
    wrapped = OneAtATime(runner, slow_s=0.002)
    sched = Scheduler(wrapped, max_batch_tokens=512, inline=lambda: True)
    got = [None] * 4
    try:
        def go(i):
            got[i] = sched.run(greedy(runner, ps[i], 8))
        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == alone
        assert sched._thread is not None and sched._thread in wrapped.threads  # (some went through the loop)
    finally:
        sched.close()


def test_a_step_that_cannot_run_fails_the_inline_program_with_its_error(runner):
    sched = Scheduler(runner, inline=lambda: True)

    def too_long():
        yield Step(runner.new_cache(), [1] * (runner.max_length + 1))

    with pytest.raises(ValueError, match="context full"):
        sched.run(too_long())
    assert sched.run(greedy(runner, [1, 2, 3], 2)) == drive(runner, greedy(runner, [1, 2, 3], 2))
    sched.close()
