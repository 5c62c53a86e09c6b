"""Pool membership (gateway/membership.py) reaching routing (gateway/pool.py).

- `kubernetes`: the real `kubernetes` client against the EndpointSlice stand-in (tests/k8s_standin.py: real
  HTTP, a real chunked watch stream). A pod added, turning not ready, terminating, deleted, and the watch
  expiring (410 Gone after a compaction) or being ended by the server: each reaches the pool's routing
  (polled with a generous timeout: this checks that it arrives, not how fast).
- `dns`: an injected resolver; the name's addresses come and go, a failed lookup keeps the last answer.
- `static` and `sources_for`: how a --drafters / --verifiers flag becomes sources under each mode.
- Routing per member: least loaded per member (this gateway's in-flight count, or the member's own report
  when higher); rendezvous hashing over the ready members moves only the sessions a new member wins.
"""
from __future__ import annotations

import time

import pytest

from gateway.membership import DnsSource, KubernetesSource, Member, StaticSource, sources_for
from gateway.pool import Pool
from k8s_standin import EndpointSliceAPI

TIMEOUT_S = 20.0  # generous: a loaded machine; the events arrive within a second when it is quiet


def eventually(check, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.02)


READY = {"ready": True, "serving": True, "terminating": False}
NOT_READY = {"ready": False, "serving": False, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


@pytest.fixture
def standin():
    api = EndpointSliceAPI("ml")
    yield api
    api.close()


def k8s_pool(standin, service="demo-drafter-a", port="grpc", **kw) -> Pool:
    src = KubernetesSource(service, port, "ml", standin.api(), **kw)
    pool = Pool("drafter", [src], health_s=0)  # no prober: the source's word alone
    pool.start()
    return pool


def test_kubernetes_events_reach_routing(standin):
    standin.put("a-1", "demo-drafter-a", [("10.0.0.1", READY), ("10.0.0.2", READY)], port=50052)
    standin.put("other", "demo-verifier", [("10.0.9.9", READY)], port=50051)  # another Service: not ours
    pool = k8s_pool(standin)
    try:
        eventually(lambda: sorted(pool.routable()) == ["10.0.0.1:50052", "10.0.0.2:50052"], "the listed pods")
        standin.put("a-2", "demo-drafter-a", [("10.0.0.3", {})], port=50052)  # conditions unset: ready
        eventually(lambda: "10.0.0.3:50052" in pool.routable(), "an added pod")
        standin.put("a-1", "demo-drafter-a", [("10.0.0.1", NOT_READY), ("10.0.0.2", READY)], port=50052)
        eventually(lambda: sorted(pool.routable()) == ["10.0.0.2:50052", "10.0.0.3:50052"], "a pod not ready")
        assert "10.0.0.1:50052" in pool.members()  # still a member: its running sessions go on
        standin.put("a-1", "demo-drafter-a", [("10.0.0.1", READY), ("10.0.0.2", TERMINATING)], port=50052)
        eventually(lambda: sorted(pool.routable()) == ["10.0.0.1:50052", "10.0.0.3:50052"], "a pod terminating")
        assert pool.members()["10.0.0.2:50052"].terminating
        standin.delete("a-2")
        eventually(lambda: "10.0.0.3:50052" not in pool.members(), "a deleted slice")
        assert pool.pick_least_loaded() == "10.0.0.1:50052"  # the one routable member
    finally:
        pool.close()


def test_kubernetes_watch_expiry_and_end_are_followed_by_a_new_list(standin):
    """The server ends the watch (as at its timeout or a restart): the source watches on. The history is
    compacted and the watch ended: the next watch gets 410 Gone, the source lists again, and a slice
    deleted in the gap (whose DELETED event no watch delivered) leaves the table."""
    standin.put("a-1", "demo-drafter-a", [("10.0.0.1", READY)], port=50052)
    standin.put("a-2", "demo-drafter-a", [("10.0.0.2", READY)], port=50052)
    pool = k8s_pool(standin)
    src = pool.sources[0]
    try:
        eventually(lambda: len(pool.routable()) == 2, "the listed pods")
        eventually(lambda: standin.count("watch") >= 1, "a watch")
        standin.end_watches()
        standin.put("a-3", "demo-drafter-a", [("10.0.0.3", READY)], port=50052)
        eventually(lambda: "10.0.0.3:50052" in pool.routable(), "a pod added after the watch ended")
        lists = src.lists
        with standin.cond:  # the gap: a deletion no watch will deliver, then compaction
            standin.slices.pop("a-1")
            standin.version += 1
        standin.compact()
        standin.end_watches()
        eventually(lambda: src.lists > lists, "a new list after 410 Gone")
        eventually(lambda: sorted(pool.routable()) == ["10.0.0.2:50052", "10.0.0.3:50052"], "the re-listed table")
        standin.put("a-4", "demo-drafter-a", [("10.0.0.4", READY)], port=50052)
        eventually(lambda: "10.0.0.4:50052" in pool.routable(), "events after the re-list")
    finally:
        pool.close()


def test_kubernetes_port_by_number_and_an_unreachable_api_recovers(standin):
    """A port given by number; a source started while the API refuses connections lists once it answers."""
    from kubernetes import client

    dead = client.DiscoveryV1Api(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    src = KubernetesSource("demo-drafter-a", "50052", "ml", dead)
    src.start()
    time.sleep(0.3)
    assert src.members() == {} and not src.synced.is_set()
    src.api = standin.api()  # the API comes back
    standin.put("a-1", "demo-drafter-a", [("10.0.0.1", READY)], port=50052)
    eventually(lambda: list(src.members()) == ["10.0.0.1:50052"], "members once the API answers")
    src.close()


def test_dns_source_follows_the_name():
    answers = {"drafters.ml.svc": ["10.0.0.1:50052", "10.0.0.2:50052"]}
    calls = []

    def resolve(host, port):
        calls.append(host)
        got = answers[host]
        if isinstance(got, Exception):
            raise got
        return got

    src = DnsSource("drafters.ml.svc", 50052, refresh_s=0.05, resolve=resolve)
    pool = Pool("drafter", [src], health_s=0)
    pool.start()
    try:
        assert sorted(pool.routable()) == ["10.0.0.1:50052", "10.0.0.2:50052"]  # resolved at once
        answers["drafters.ml.svc"] = ["10.0.0.2:50052", "10.0.0.3:50052"]
        eventually(lambda: sorted(pool.routable()) == ["10.0.0.2:50052", "10.0.0.3:50052"], "the new answer")
        answers["drafters.ml.svc"] = OSError("SERVFAIL")
        n = len(calls)
        eventually(lambda: len(calls) > n + 2, "lookups go on")
        assert sorted(pool.routable()) == ["10.0.0.2:50052", "10.0.0.3:50052"]  # a failed lookup keeps the last answer
        answers["drafters.ml.svc"] = []
        eventually(lambda: sorted(pool.routable()) == [], "an empty answer empties the pool")
    finally:
        pool.close()


def test_sources_for_each_mode():
    static = sources_for("static", ["d.ml.svc:1", "10.0.0.1:2"], "--drafters")
    assert [type(s) for s in static] == [StaticSource] and sorted(static[0].members()) == ["10.0.0.1:2", "d.ml.svc:1"]
    dns = sources_for("dns", ["10.0.0.1:2", "localhost:3", "d.ml.svc:1"], "--drafters",
                      resolve=lambda h, p: [f"10.1.0.{i}:{p}" for i in (1, 2)])
    assert [type(s) for s in dns] == [StaticSource, DnsSource]
    assert sorted(dns[0].members()) == ["10.0.0.1:2", "localhost:3"]
    assert sorted(dns[1].members()) == ["10.1.0.1:1", "10.1.0.2:1"]
    k8s = sources_for("kubernetes", ["demo-drafter-a:grpc"], "--drafters", namespace="ml", api=object())
    assert [(type(s), s.service, s.port, s.namespace) for s in k8s] == [(KubernetesSource, "demo-drafter-a", "grpc", "ml")]
    from crossdraft.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--discovery"):
        sources_for("consul", ["a:1"], "--drafters")


class _Fixed(StaticSource):
    def __init__(self, members):
        self._members = {m.address: m for m in members}
        self.what = "fixed"


def test_least_loaded_per_member_and_the_members_own_report():
    pool = Pool("drafter", [_Fixed([Member("10.0.0.1:1"), Member("10.0.0.2:1"), Member("10.0.0.3:1", ready=False)])],
                health_s=0)
    picks = [pool.pick_least_loaded() for _ in range(4)]
    assert sorted(picks) == ["10.0.0.1:1", "10.0.0.1:1", "10.0.0.2:1", "10.0.0.2:1"]  # never the one not ready
    pool.release("10.0.0.2:1")
    pool._state["10.0.0.2:1"].load = 5  # its own GetInfo: 5 sessions open (other gateways' too)
    assert pool.pick_least_loaded() == "10.0.0.1:1"
    pool.suspect("10.0.0.1:1")  # a call on it failed
    assert pool.routable() == ["10.0.0.2:1"]


def test_rendezvous_moves_only_the_sessions_a_new_member_wins():
    three = [Member(f"10.0.0.{i}:1") for i in (1, 2, 3)]
    before = Pool("verifier", [_Fixed(three)], health_s=0)
    after = Pool("verifier", [_Fixed(three + [Member("10.0.0.4:1")])], health_s=0)
    sids = [f"s{i}" for i in range(400)]
    moved = [s for s in sids if before.pick_by_affinity(s) != after.pick_by_affinity(s)]
    assert all(after.pick_by_affinity(s) == "10.0.0.4:1" for s in moved)
    assert 0.15 < len(moved) / len(sids) < 0.35  # about a quarter
    draining = Pool("verifier", [_Fixed(three[:2] + [Member("10.0.0.3:1", ready=False, terminating=True)])],
                    health_s=0)
    for s in sids:  # a verifier leaving moves only its own sessions
        if before.pick_by_affinity(s) != "10.0.0.3:1":
            assert draining.pick_by_affinity(s) == before.pick_by_affinity(s)
