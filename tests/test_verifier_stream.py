"""verifier_service/stream.py: a Verify stream's rounds run back to back in the model's scheduler while
proposals wait, in order, bounded, and a stream's end (finished, an error) stops them. A real scheduler
over a tiny model; the rounds are stand-ins that each run one forward step of their own cache."""
from __future__ import annotations

import threading
import types

import pytest

from crossdraft.errors import Aborted
from crossdraft.runner import LlamaRunner, Step
from crossdraft.scheduler import Scheduler
from helpers import tiny_llama
from verifier_service.stream import StreamRounds

V = 64


@pytest.fixture(scope="module")
def runner():
    return LlamaRunner(tiny_llama(V, seed=3, kv_heads=2), 256)


class Rounds:
    """A stand-in for TargetSessions: `round` runs one step of the session's cache and returns what it
    was given; `gate` holds the first round (in the scheduler's thread) until the test opens it."""

    def __init__(self, runner, finish_at=None, fail_at=None):
        self.scheduler = Scheduler(runner, name="test")
        self.submitted = 0
        self.model = types.SimpleNamespace(submit=self._submit, later=self.scheduler.later)
        self.cache = runner.new_cache()
        self.gate = threading.Event()
        self.finish_at, self.fail_at = finish_at, fail_at
        self.ran: list = []

    def _submit(self, program):
        self.submitted += 1
        return self.scheduler.submit(program)

    def stale_verdict(self, sid, proposal, mine):  # (as TargetSessions': negative proposals are stale)
        return types.SimpleNamespace(proposal=proposal, finished=False) if proposal < 0 else None

    def round(self, sid, proposal, mine):
        self.gate.wait(10)
        if proposal < 0:
            return types.SimpleNamespace(proposal=proposal, finished=False)  # stale: no pass
        if proposal == self.fail_at:
            raise Aborted(f"session {sid!r} was taken over by a newer Verify stream")
        yield Step(self.cache, [proposal % V], last=True)
        self.ran.append(proposal)
        return types.SimpleNamespace(proposal=proposal, finished=proposal == self.finish_at)


def test_proposals_that_wait_run_back_to_back_in_one_program_in_order(runner):
    """Three proposals queued while the first round is held: one program runs all three (no round trip
    through the stream's threads between them), their verdicts come out in order, and a later proposal,
    put when none waits, starts a new program."""
    s = Rounds(runner)
    q = StreamRounds(s, "sid", None, limit=8)
    stop = threading.Event()
    for p in (1, 2, 3):
        assert q.put(p, stop)
    s.gate.set()
    assert [q.get().proposal for _ in range(3)] == [1, 2, 3]
    assert s.submitted == 1
    q._idle.wait(10)
    assert q.put(4, stop) and q.get().proposal == 4
    assert s.submitted == 2 and s.cache.length == 4
    q.end()
    assert q.get() is None
    s.scheduler.close()


def test_a_finished_verdict_ends_the_rounds(runner):
    """Proposals queued after the round that finishes the session are not run (the cache must not grow
    past it), and later ones are refused."""
    s = Rounds(runner, finish_at=2)
    q = StreamRounds(s, "sid", None, limit=8)
    stop = threading.Event()
    for p in (1, 2, 3, 4):
        q.put(p, stop)
    s.gate.set()
    assert [q.get().proposal for _ in range(2)] == [1, 2]
    q.close()
    assert s.ran == [1, 2] and not q.put(5, stop)
    s.scheduler.close()


def test_an_error_in_a_round_ends_the_stream_with_it(runner):
    s = Rounds(runner, fail_at=2)
    q = StreamRounds(s, "sid", None, limit=8)
    stop = threading.Event()
    for p in (1, 2, 3):
        q.put(p, stop)
    s.gate.set()
    assert q.get().proposal == 1
    with pytest.raises(Aborted, match="taken over"):
        q.get()
    q.close()
    assert s.ran == [1] and not q.put(4, stop)
    s.scheduler.close()


def test_at_most_limit_proposals_wait_unsent_and_stop_frees_the_reader(runner):
    """With `limit` proposals taken and no verdict read, the reader waits for room (its drafter stalls
    its own stream); setting `stop` lets it go without queuing; reading a verdict makes room."""
    s = Rounds(runner)
    s.gate.set()
    q = StreamRounds(s, "sid", None, limit=2)
    stop = threading.Event()
    assert q.put(1, stop) and q.put(2, stop)
    result = []
    t = threading.Thread(target=lambda: result.append(q.put(3, stop)))
    t.start()
    t.join(0.5)
    assert t.is_alive()  # no room: waiting
    stop.set()
    t.join(5)
    assert result == [False]
    assert q.get().proposal == 1  # room for one more
    assert q.put(3, threading.Event())
    assert [q.get().proposal, q.get().proposal] == [2, 3]
    s.scheduler.close()


def test_a_stale_proposal_of_an_idle_stream_is_answered_at_once_and_one_behind_a_round_in_order(runner):
    """A stale proposal put while none of its stream's rounds is in the scheduler gets its empty verdict
    from `put` itself, while another stream's round holds the model (before, it waited for that pass: the
    gateway's first steps wait for this verdict, so under load each new session lost a pass). One put
    behind a round of its own stream goes through the program, after that round's verdict."""
    s = Rounds(runner)
    other = StreamRounds(s, "other", None, limit=8)
    stop = threading.Event()
    assert other.put(1, stop)  # its round holds the scheduler's thread at the gate
    q = StreamRounds(s, "sid", None, limit=8)
    assert q.put(-1, stop)
    assert q._out.get(timeout=5)[0].proposal == -1  # answered while the model is busy
    q._room.release()
    assert s.submitted == 1  # no program for it
    assert q.put(2, stop) and q.put(-2, stop)  # 2's program is queued behind the held round
    s.gate.set()
    assert other.get().proposal == 1
    assert [q.get().proposal, q.get().proposal] == [2, -2]
    assert s.submitted == 2 and s.ran == [1, 2]
    s.scheduler.close()
