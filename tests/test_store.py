"""The session store's contract, run against MemoryStore and RedisStore (a real redis-server): create,
commit with the expected-length check, replays applied once, one winner among concurrent committers,
events from any offset (blocking too), cancel, TTL on every key, a stopped Redis -> Unavailable."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest

from crossdraft.errors import CrossdraftError, InvalidArgument, NotFound
from crossdraft.store import (COUNTERS, MAX_RESULT_BYTES, AlreadyExists, Conflict, MemoryStore, RedisStore, SessionClosed,
                              Unavailable)
from redis_fixture import start_redis, stop

REQUEST = {"prompt": "Once upon a time", "algorithm": "tli", "max_new_tokens": 64, "draft_tokens": None,
           "sampling": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 2**62 + 7}}


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = RedisStore(request.getfixturevalue("redis_server"))
    yield s
    s.close()


def sid() -> str:
    return "s-" + uuid.uuid4().hex


def make_store(kind: str, request, **kw):
    return MemoryStore(**kw) if kind == "memory" else RedisStore(request.getfixturevalue("redis_server"), **kw)


def raw_redis(url):
    import redis

    return redis.Redis.from_url(url)


# -- create / get --------------------------------------------------------------------------------------
def test_create_and_get(store):
    s = sid()
    t0 = time.time()
    created = store.create(s, REQUEST, owner="key-17")
    got = store.get(s)
    for x in (created, got):
        assert (x.id, x.request, x.owner, x.status, x.length, x.ids, x.text) == (s, REQUEST, "key-17", "queued", 0, [], b"")
        assert x.counters == dict.fromkeys(COUNTERS, 0)
        assert t0 - 1 <= x.created <= time.time() + 1 and x.finished is None and x.finish_reason == x.error == ""
    assert store.get(sid()) is None
    assert store.ping() is True


def test_failed_create_writes_nothing(store, request):
    s = sid()
    store.create(s, REQUEST, owner="a")
    store.commit(s, 0, [5], b"x")
    with pytest.raises(AlreadyExists) as e:
        store.create(s, {"prompt": "other"}, owner="b")
    assert e.value.code == "ALREADY_EXISTS"
    got = store.get(s)
    assert (got.request, got.owner, got.ids, got.text, got.status) == (REQUEST, "a", [5], b"x", "running")
    bad = [(sid(), {"x": object()}, "o"), (sid(), {"x": float("nan")}, "o"), (sid(), ["not", "a", "dict"], "o"),
           ("has space", REQUEST, "o"), ("", REQUEST, "o"), ("a{b}", REQUEST, "o"), ("x" * 201, REQUEST, "o"),
           (sid(), REQUEST, 7)]
    for b_sid, b_req, b_owner in bad:
        with pytest.raises(InvalidArgument):
            store.create(b_sid, b_req, owner=b_owner)
        if b_sid and " " not in b_sid and "{" not in b_sid and len(b_sid) <= 200:
            assert store.get(b_sid) is None
    if isinstance(store, RedisStore):  # no key of the failed creates exists
        r = raw_redis(request.getfixturevalue("redis_server"))
        names = {k.decode() for k in r.scan_iter(match="crossdraft:*")}
        assert not any(b[0] in n for b in bad if b[0] for n in names)


# -- commit --------------------------------------------------------------------------------------------
def test_commit_appends_and_counts(store):
    s = sid()
    store.create(s, REQUEST)
    assert store.commit(s, 0, [1, 2, 3], b"abc", {"rounds": 1, "draft_tokens": 4, "accepted_tokens": 2,
                                                   "drafted": 5}) == 3
    assert store.commit(s, 3, [4], b"d\xc3", {"rounds": 1, "draft_tokens": 3, "drafted": 3}) == 4
    assert store.commit(s, 4, [], b"", {"rounds": 1}) == 4  # a round that commits nothing is allowed
    got = store.get(s)
    assert (got.ids, got.text, got.length, got.status) == ([1, 2, 3, 4], b"abc" + b"d\xc3", 4, "running")
    assert got.counters == {"rounds": 3, "draft_tokens": 7, "accepted_tokens": 2, "drafted": 8}
    assert got.updated >= got.created and got.finished is None
    light = store.get(s, include_output=False)
    assert (light.ids, light.text, light.length, light.counters) == ([], b"", 4, got.counters)
    big = list(range(2**31 - 1000, 2**31))  # the whole int32 range is kept
    assert store.commit(s, 4, big, b"", finished=True, finish_reason="length") == 1004
    got = store.get(s)
    assert got.ids[4:] == big and got.status == "done" and got.finish_reason == "length"
    assert got.finished is not None and got.finished >= got.created


def test_final_commit_records_a_result(store):
    """The final commit may record a JSON result (the gateway's algorithm, why and statistics), read
    back by any reader; only a final commit may, it is part of a replay's identity, and it is bounded."""
    s = sid()
    store.create(s, REQUEST)
    assert store.get(s).result == {}
    with pytest.raises(InvalidArgument):  # not final
        store.commit(s, 0, [1], b"a", result={"algorithm": "slem"})
    with pytest.raises(InvalidArgument):  # too large
        store.commit(s, 0, [1], b"a", finished=True, result={"why": "x" * (MAX_RESULT_BYTES + 1)})
    with pytest.raises(InvalidArgument):  # not JSON
        store.commit(s, 0, [1], b"a", finished=True, result={"x": object()})
    assert store.get(s).length == 0  # refused commits applied nothing
    result = {"algorithm": "slem", "why": "greedy: slem", "stats": {"rounds": 3, "verify_ns": "123456789"}}
    assert store.commit(s, 0, [1], b"a", finished=True, finish_reason="eos", result=result) == 1
    assert store.commit(s, 0, [1], b"a", finished=True, finish_reason="eos", result=result) == 1  # replay
    with pytest.raises(SessionClosed):  # a different result is not a replay of the final commit
        store.commit(s, 0, [1], b"a", finished=True, finish_reason="eos", result=dict(result, why="other"))
    got = store.get(s)
    assert got.result == result and got.status == "done"
    assert store.get(s, include_output=False).result == result


def test_commits_record_a_resume_state(store):
    """Any commit may record a small JSON resume state (the gateway: the drafter's next draft length);
    the last one given is kept, a commit without one keeps it, and it is part of a replay's identity."""
    s = sid()
    store.create(s, REQUEST)
    assert store.get(s).resume == {}
    store.commit(s, 0, [1], b"a", resume={"draft_tokens": 7})
    store.commit(s, 1, [2], b"b")
    assert store.get(s, include_output=False).resume == {"draft_tokens": 7}
    store.commit(s, 2, [3], b"c", resume={"draft_tokens": 6})
    assert store.commit(s, 2, [3], b"c", resume={"draft_tokens": 6}) == 3  # replay
    with pytest.raises(Conflict):
        store.commit(s, 2, [3], b"c", resume={"draft_tokens": 9})  # not the same commit
    with pytest.raises(InvalidArgument):
        store.commit(s, 3, [4], b"d", resume={"x": "y" * 2000})
    assert store.get(s).resume == {"draft_tokens": 6} and store.get(s).length == 3


def test_claim_takes_over_a_stale_session_once(store):
    """claim: only a queued or running session that nobody wrote for stale_s seconds; of two claimers
    at once, one wins; a finished session is never claimed."""
    s = sid()
    store.create(s, REQUEST, owner="gw-1")
    store.commit(s, 0, [1], b"a")
    assert not store.claim(s, "gw-2", stale_s=30.0)  # written just now: its owner is alive
    time.sleep(0.3)
    results = []
    threads = [threading.Thread(target=lambda o=o: results.append((o, store.claim(s, o, stale_s=0.2))))
               for o in ("gw-2", "gw-3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o, ok in results if ok]
    assert len(winners) == 1 and store.get(s).owner == winners[0] and store.get(s).status == "running"
    store.commit(s, 1, [2], b"b", finished=True)
    time.sleep(0.3)
    assert not store.claim(s, "gw-4", stale_s=0.2)
    with pytest.raises(NotFound):
        store.claim(sid(), "gw-4", stale_s=0.0)


def test_expected_length_check(store):
    s = sid()
    store.create(s, REQUEST)
    store.commit(s, 0, [1])
    for expected in (0, 2, 7):
        with pytest.raises(Conflict) as e:
            store.commit(s, expected, [9], b"z", {"rounds": 1})
        assert e.value.code == "ABORTED" and (e.value.expected, e.value.actual) == (expected, 1)
        assert "\n" not in str(e.value)
    got = store.get(s)
    assert (got.ids, got.text, got.counters["rounds"]) == ([1], b"", 0)


def test_replay_of_last_commit_applied_once(store):
    s = sid()
    store.create(s, REQUEST)
    assert store.commit(s, 0, [1, 2], b"ab", {"rounds": 1, "accepted_tokens": 1}) == 2
    for _ in range(3):  # the reply was lost and the caller retries
        assert store.commit(s, 0, [1, 2], b"ab", {"rounds": 1, "accepted_tokens": 1}) == 2
    got = store.get(s)
    assert (got.ids, got.text, got.counters["rounds"], got.counters["accepted_tokens"]) == ([1, 2], b"ab", 1, 1)
    assert len(store.read_events(s, 0)) == 1
    with pytest.raises(Conflict):  # same expected length, different ids: not a replay
        store.commit(s, 0, [1, 3], b"ab", {"rounds": 1, "accepted_tokens": 1})
    assert store.commit(s, 2, [3], b"c") == 3
    with pytest.raises(Conflict):  # a replay of an older commit is a conflict, not silently accepted
        store.commit(s, 0, [1, 2], b"ab", {"rounds": 1, "accepted_tokens": 1})
    assert store.commit(s, 3, [4], b"d", finished=True, finish_reason="eos") == 4
    assert store.commit(s, 3, [4], b"d", finished=True, finish_reason="eos") == 4  # replay after done
    with pytest.raises(SessionClosed):
        store.commit(s, 4, [5], b"e")
    got = store.get(s)
    assert got.ids == [1, 2, 3, 4] and got.text == b"abcd" and len(store.read_events(s, 0)) == 3


def test_concurrent_committers_one_wins(store):
    s = sid()
    store.create(s, REQUEST)
    n_threads, length = 8, 0
    for rnd in range(5):
        barrier = threading.Barrier(n_threads)
        wins, conflicts, other = [], [], []

        def worker(i, expected=length):
            barrier.wait()
            try:
                wins.append((i, store.commit(s, expected, [100 * rnd + i, i], b"t%d" % i, {"rounds": 1})))
            except Conflict:
                conflicts.append(i)
            except Exception as e:  # pragma: no cover - reported below
                other.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not other and len(wins) == 1 and len(conflicts) == n_threads - 1
        winner, new_len = wins[0]
        assert new_len == length + 2
        length = new_len
        assert store.get(s).ids[-2:] == [100 * rnd + winner, winner]
    got = store.get(s)
    assert got.length == 10 and got.counters["rounds"] == 5 and len(store.read_events(s, 0)) == 5


def test_bad_commit_arguments_apply_nothing(store):
    s = sid()
    store.create(s, REQUEST)
    for args, kw in [((-1, [1]), {}), ((0, [-1]), {}), ((0, [2**31]), {}), ((0, [1.0]), {}), ((0, [True]), {}),
                     ((0, [1]), {"counters": {"bogus": 1}}), ((0, [1]), {"counters": {"rounds": -1}}),
                     ((0, [1]), {"text": 5})]:
        with pytest.raises(InvalidArgument):
            store.commit(s, *args, **kw)
    got = store.get(s)
    assert got.length == 0 and got.status == "queued" and store.read_events(s, 0) == []
    with pytest.raises(NotFound):
        store.commit(sid(), 0, [1])


# -- events --------------------------------------------------------------------------------------------
def test_events_from_any_offset_in_order(store):
    s = sid()
    store.create(s, REQUEST)
    store.commit(s, 0, [1, 2], b"ab")
    store.commit(s, 2, [3], b"c")
    store.commit(s, 3, [4, 5, 6], b"def", finished=True, finish_reason="eos")
    evs = store.read_events(s, 0)
    assert [(e.start, e.offset, list(e.ids), e.text, e.final, e.finish_reason) for e in evs] == [
        (0, 2, [1, 2], b"ab", False, ""), (2, 3, [3], b"c", False, ""), (3, 6, [4, 5, 6], b"def", True, "eos")]
    assert [e.offset for e in store.read_events(s, 1)] == [2, 3, 6]  # an event the client holds part of
    assert [e.offset for e in store.read_events(s, 2)] == [3, 6]
    assert [e.offset for e in store.read_events(s, 4)] == [6]
    last = store.read_events(s, 6, block_ms=5000)  # a finished session answers at once with its final event
    assert len(last) == 1 and last[0].final
    assert store.read_events(s, 7) == []
    # everything after any offset reassembles the committed output
    for k in range(7):
        ids = [t for e in store.read_events(s, k) for t in e.ids[max(0, k - e.start):]]
        assert ids == [1, 2, 3, 4, 5, 6][k:]
    with pytest.raises(NotFound):
        store.read_events(sid(), 0)
    for bad in ((-1, 0), (0, -5), (1.5, 0), (0, None)):
        with pytest.raises(InvalidArgument):
            store.read_events(s, *bad)


def test_blocking_read_wakes_on_commit(store):
    s = sid()
    store.create(s, REQUEST)
    store.commit(s, 0, [7], b"x")
    t0 = time.monotonic()
    assert store.read_events(s, 1, block_ms=300) == []  # nothing new: waits about block_ms
    assert 0.25 <= time.monotonic() - t0 < 3
    got = {}

    def reader(after=1):
        t = time.monotonic()
        got["events"] = store.read_events(s, after, block_ms=10_000)
        got["s"] = time.monotonic() - t

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.3)
    store.commit(s, 1, [8, 9], b"yz")
    th.join(15)
    assert [(e.offset, list(e.ids), e.text) for e in got["events"]] == [(3, [8, 9], b"yz")]
    assert 0.2 <= got["s"] < 5  # woken by the commit, not by the timeout

    th = threading.Thread(target=reader, args=(3,))  # a cancel wakes a reader too
    got.clear()
    th.start()
    time.sleep(0.2)
    store.cancel(s)
    th.join(15)
    assert [(e.offset, e.final, e.finish_reason) for e in got["events"]] == [(3, True, "cancelled")]


# -- status, cancel, delete, TTL -----------------------------------------------------------------------
def test_cancel(store):
    s = sid()
    store.create(s, REQUEST)
    store.set_status(s, "running")
    store.commit(s, 0, [1], b"a")
    assert store.cancelled(s) is False
    assert store.cancel(s) is True
    assert store.cancelled(s) is True and store.cancel(s) is False
    got = store.get(s)
    assert got.status == "cancelled" and got.finish_reason == "cancelled" and got.finished is not None
    ev = store.read_events(s, 1)
    assert [(e.offset, e.ids, e.final, e.finish_reason) for e in ev] == [(1, (), True, "cancelled")]
    with pytest.raises(SessionClosed) as e:
        store.commit(s, 1, [2], b"b")
    assert e.value.code == "FAILED_PRECONDITION" and e.value.status == "cancelled"
    with pytest.raises(SessionClosed):
        store.set_status(s, "running")
    assert store.set_status(s, "cancelled") == "cancelled"  # idempotent
    assert store.get(s).ids == [1]
    done = sid()
    store.create(done, REQUEST)
    store.commit(done, 0, [1], finished=True, finish_reason="eos")
    assert store.cancel(done) is False and store.get(done).status == "done"
    with pytest.raises(NotFound):
        store.cancel(sid())
    with pytest.raises(NotFound):
        store.cancelled(sid())


def test_set_status_failed_and_invalid(store):
    s = sid()
    store.create(s, REQUEST)
    with pytest.raises(InvalidArgument):
        store.set_status(s, "paused")
    assert store.set_status(s, "running") == "running"
    assert store.set_status(s, "queued") == "queued"  # handed back to the queue
    assert store.set_status(s, "failed", error="verifier lost") == "failed"
    got = store.get(s)
    assert (got.status, got.error, got.finish_reason) == ("failed", "verifier lost", "error")
    assert [(e.final, e.finish_reason) for e in store.read_events(s, 0)] == [(True, "error")]
    with pytest.raises(NotFound):
        store.set_status(sid(), "running")


def test_delete(store, request):
    s = sid()
    store.create(s, REQUEST)
    store.commit(s, 0, [1], b"a")
    assert store.delete(s) is True and store.get(s) is None and store.delete(s) is False
    if isinstance(store, RedisStore):
        r = raw_redis(request.getfixturevalue("redis_server"))
        assert list(r.scan_iter(match=f"*{s}*")) == []


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_ttl_expires_and_writes_refresh_it(kind, request):
    st = make_store(kind, request, ttl_s=1.0)
    s = sid()
    st.create(s, REQUEST)
    time.sleep(0.5)
    st.commit(s, 0, [1], b"a")  # refreshes the TTL of every key
    time.sleep(0.6)  # past the first TTL, within the refreshed one
    assert st.get(s).ids == [1]  # reads do not refresh it
    time.sleep(0.5)
    assert st.get(s) is None
    with pytest.raises(NotFound):
        st.commit(s, 1, [2])
    st.create(s, REQUEST)  # an expired id may be created again
    st.close()


def test_redis_every_key_under_prefix_with_ttl(redis_server):
    st = RedisStore(redis_server, ttl_s=3600)
    r = raw_redis(redis_server)
    s = sid()
    st.create(s, REQUEST, owner="k")
    st.commit(s, 0, [1, 2], b"ab", {"rounds": 1})
    st.cancel(s)
    keys = sorted(k.decode() for k in r.scan_iter(match=f"*{s}*"))
    assert keys == sorted(f"crossdraft:session:{{{s}}}{x}" for x in ("", ":ids", ":text", ":events"))
    assert [r.type(k) for k in keys] == [b"hash", b"stream", b"string", b"string"]
    for k in keys:
        assert 0 < r.pttl(k) <= 3600_000, k
    for k in r.scan_iter():  # nothing any test wrote is outside the prefix or without a TTL
        assert k.startswith(b"crossdraft:") and r.pttl(k) > 0, k
    assert r.strlen(f"crossdraft:session:{{{s}}}:ids") == 8  # ids: int32 each
    custom = RedisStore(redis_server, prefix="cd-test:")
    custom.create(s, REQUEST)
    assert r.exists(f"cd-test:session:{{{s}}}") and custom.delete(s)


@pytest.mark.parametrize("suffix", [":events", ":text"])
def test_redis_commit_is_all_or_nothing(redis_server, suffix):
    st = RedisStore(redis_server)
    r = raw_redis(redis_server)
    s = sid()
    st.create(s, REQUEST)
    st.commit(s, 0, [1], b"a", {"rounds": 1})
    bad_key = f"crossdraft:session:{{{s}}}{suffix}"
    saved = r.dump(bad_key)
    r.delete(bad_key)
    r.rpush(bad_key, "not what the store wrote")  # a key of the wrong type: the commit cannot apply
    for write in (lambda: st.commit(s, 1, [2], b"b", {"rounds": 1}), lambda: st.cancel(s)):
        with pytest.raises(CrossdraftError) as e:
            write()
        assert "corrupted" in str(e.value) and "\n" not in str(e.value)
        assert not isinstance(e.value, (Conflict, Unavailable))
    r.delete(bad_key)
    r.restore(bad_key, 0, saved)
    got = st.get(s)  # nothing of the failed writes was applied
    assert (got.ids, got.text, got.counters["rounds"], got.status) == ([1], b"a", 1, "running")
    assert [e.offset for e in st.read_events(s, 0)] == [1]
    assert st.commit(s, 1, [2], b"b") == 2


def test_redis_down_is_unavailable():
    with start_redis() as (url, proc):
        st = RedisStore(url, connect_timeout_s=1.0, socket_timeout_s=2.0)
        s = sid()
        st.create(s, REQUEST)
        assert st.ping()
        stop(proc)
        calls = [lambda: st.ping(), lambda: st.get(s), lambda: st.create(sid(), REQUEST),
                 lambda: st.commit(s, 0, [1], b"a"), lambda: st.cancel(s), lambda: st.read_events(s, 0, 100),
                 lambda: st.delete(s)]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as e:
                call()
            assert e.value.code == "UNAVAILABLE" and "\n" not in str(e.value) and "redis at 127.0.0.1:" in str(e.value)
            assert time.monotonic() - t0 < 10
    with pytest.raises(Unavailable):  # never reachable at all
        RedisStore(url, connect_timeout_s=1.0).ping()


def test_core_imports_without_redis():
    code = ("import sys; sys.modules['redis'] = None\n"
            "import crossdraft.engine, crossdraft.store as st\n"
            "m = st.MemoryStore(); m.create('a', {}); assert m.commit('a', 0, [1]) == 1\n"
            "try:\n    st.RedisStore('redis://127.0.0.1:1')\nexcept st.FailedPrecondition as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stderr[-2000:]
