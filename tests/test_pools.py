"""Drafter pools per member, end to end (issue 14), and the store errors of failover and expiry (issue 17.8).

End to end, with real processes on loopback and a real redis-server: a verifier, three drafters of one
model (one pool) and a gateway with `--discovery kubernetes`, which finds the pods through the real
`kubernetes` client and a kubeconfig pointing at the EndpointSlice stand-in (tests/k8s_standin.py, not an
API server), one slice per pod as the EndpointSlice controller may write them.
- `kill -9` one drafter while several sessions run: its sessions finish on the other two with output
  identical to an undisturbed in-process run; none runs on the verifier alone.
- SIGTERM one drafter (and its endpoint turns terminating, as Kubernetes does) while sessions run: it
  drains (NOT_SERVING, no new sessions, running ones finish or are handed back); no session fails, every
  output identical.
- SIGTERM a verifier that holds every session, as another turns ready: it drains and hands its sessions
  back; the gateway resumes each on the other verifier, every output identical.
- A fourth drafter starts and its slice appears: new sessions reach it, no restart of the gateway.
The clients never re-attach (`reconnect_s=0`), so any error a client would see fails the test.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
import time

import pytest

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.errors import Unavailable
from crossdraft.sampling import SamplingParams
from k8s_standin import EndpointSliceAPI
from test_faults import Cluster
from test_metrics import scrape, value
from test_services import free_port, save_model

PROMPTS = ("class Parser:\n    def get_value(self", "def parse(self, value", "x = [")
N = 200
SESSIONS = 6
READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
NOT_READY = {"ready": False, "serving": False, "terminating": False}


@pytest.fixture(scope="module")
def pools(trained_models, tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("pools")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    api = EndpointSliceAPI("ml")
    c = Cluster(root)
    c.env["KUBECONFIG"] = api.kubeconfig(root / "kubeconfig")
    c.api, c.dirs, c.metrics = api, {"target": target, "spm": spm}, {}
    try:
        c.metrics["verifier"] = free_port()
        v = c.start("verifier", ["verifier", "--model", str(target), "--threads", "1",
                                 "--metrics-port", str(c.metrics["verifier"])])
        for name in ("d1", "d2", "d3"):
            start_drafter(c, name)
        c.wait_serving("verifier", "d1", "d2", "d3")
        api.put("verifier-0", "demo-verifier", [("127.0.0.1", READY)], port=int(v.rsplit(":", 1)[1]))
        for name in ("d1", "d2", "d3"):
            publish(c, name, READY)
        c.start("gateway", ["gateway", "--redis", redis_server, "--discovery", "kubernetes",
                            "--drafters", "demo-drafter:grpc", "--verifiers", "demo-verifier:grpc", "--insecure",
                            "--drafter-timeout", "5", "--session-lease", "5", "--failover-seconds", "60",
                            "--health-seconds", "0.5"])
        c.wait_serving("gateway")
        yield c
    finally:
        c.stop_all()
        api.close()


@pytest.fixture(scope="module")
def refs(pools):
    engine = Engine.load(str(pools.dirs["target"]), str(pools.dirs["spm"]), device="cpu")
    out = {p: engine.generate(p, N, SamplingParams(), "slem") for p in PROMPTS}
    assert all(r.new_tokens > 60 for r in out.values()), "the prompts must give long generations"
    return out


def start_drafter(c, name: str) -> None:
    c.metrics[name] = free_port()
    c.start(name, ["drafter", "--model", str(c.dirs["spm"]), "--threads", "1", "--metrics-port", str(c.metrics[name])])


def publish(c, name: str, conditions: dict) -> None:
    """The pod's EndpointSlice, as the EndpointSlice controller writes it for the pool's Service."""
    c.api.put(f"demo-drafter-{name}", "demo-drafter", [("127.0.0.1", conditions)], port=c.procs[name][2])


def gauge(c, name: str, metric: str = "crossdraft_sessions_active") -> float:
    return value(scrape(f"http://127.0.0.1:{c.metrics[name]}/metrics"), metric)


def run_sessions(c, when_busy=None, victim: str = "") -> list:
    """SESSIONS generations at once through the gateway (greedy slem, the prompts in turn); `when_busy()`
    is called once `victim` holds a session and has had 30 tokens verified (the fault lands mid-generation:
    a drafter sends a round's delta with its next proposal, so its first tokens are not committed yet).
    -> [(prompt, result or the exception, the longest wait between two deltas in seconds)]."""
    results: list = [None] * SESSIONS

    def one(i: int) -> None:
        prompt, gap = PROMPTS[i % len(PROMPTS)], 0.0
        try:
            with Client(c.address("gateway"), timeout=120, reconnect_s=0) as cl:
                text, ids, end, last = [], [], None, time.monotonic()
                # a fixed draft length: the load cap never cuts it, so no session is handed back and each
                # stays on its drafter (these tests are about drafters; handing back: test_hand_back.py)
                for msg in cl.events(prompt, N, algorithm="slem", draft_tokens=4):
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    if msg.WhichOneof("event") == "delta":
                        text.append(msg.delta.text)
                        ids[msg.delta.token_offset:] = list(msg.delta.ids)
                    else:
                        end = msg.end
                assert end is not None and not end.error_message, end
                results[i] = (prompt, {"text": "".join(text), "ids": ids, "algorithm": end.algorithm}, gap)
        except Exception as e:  # noqa: BLE001 - reported by the assertions
            results[i] = (prompt, e, gap)

    rounds = gauge(c, victim, "crossdraft_generated_tokens_total") if victim else 0.0
    threads = [threading.Thread(target=one, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    if when_busy is not None:
        deadline = time.monotonic() + 60
        while gauge(c, victim) < 1 or gauge(c, victim, "crossdraft_generated_tokens_total") < rounds + 30:
            assert time.monotonic() < deadline and any(t.is_alive() for t in threads), f"{victim} got no session"
            time.sleep(0.01)
        when_busy()
    for t in threads:
        t.join(timeout=300)
    return results


def check_all_identical(results: list, refs: dict, what: str = "") -> None:
    from crossdraft.v1 import common_pb2

    for prompt, got, _ in results:
        assert not isinstance(got, BaseException), f"a client saw an error: {got!r}"
        ref = refs[prompt]
        assert got["ids"] == ref.ids and got["text"] == ref.text
        assert got["algorithm"] != common_pb2.ALGORITHM_NONE, "a session ran on the verifier alone"
    if what:  # the figure for docs/pools.md's table (measured on whatever machine runs the test)
        print(f"\n{what}: longest wait between two deltas of a session: {max(g for _, _, g in results):.2f} s")


def test_a_killed_drafter_moves_only_its_sessions_to_the_others(pools, refs):
    victim = pools.address("d1")
    log_before = len(pools.log("gateway"))
    results = run_sessions(pools, lambda: pools.kill("d1"), victim="d1")
    check_all_identical(results, refs, "kill -9 of a drafter")
    log = pools.log("gateway")[log_before:]
    moved = [line for line in log.splitlines() if f": drafter {victim} " in line and "resuming" in line]
    assert moved, log[-3000:]
    assert all("on drafter 127.0.0.1:" in line and f"on drafter {victim}" not in line for line in moved), moved
    assert "the verifier alone" not in log
    pools.restart("d1")


def test_a_drafter_that_gets_sigterm_drains_and_no_session_fails(pools, refs):
    def terminate():
        publish(pools, "d2", TERMINATING)  # Kubernetes marks the endpoint terminating as it sends SIGTERM
        pools.procs["d2"][1].send_signal(signal.SIGTERM)

    time.sleep(1.5)  # the restarted d1 is SERVING again in the gateway's eyes
    results = run_sessions(pools, terminate, victim="d2")
    check_all_identical(results, refs, "SIGTERM of a drafter (--grace 1: handed back after 0.5 s)")
    assert pools.procs["d2"][1].wait(timeout=30) == 0
    assert "draining" in pools.log("d2")
    pools.api.delete("demo-drafter-d2")
    assert "the verifier alone" not in pools.log("gateway")


def test_a_verifier_that_gets_sigterm_drains_and_its_sessions_resume_on_another(pools, refs):
    """A second verifier takes every new session (the first one's endpoint is not ready meanwhile); it gets
    SIGTERM mid-generation as the first turns ready again: it drains (--grace 1: its sessions are handed
    back after 0.5 s), and the gateway resumes each on the first verifier from the committed ids. No
    session fails, every output identical."""
    c = pools
    c.metrics["v2"] = free_port()
    c.start("v2", ["verifier", "--model", str(c.dirs["target"]), "--threads", "1",
                   "--metrics-port", str(c.metrics["v2"])])
    c.wait_serving("v2")
    v1, v2 = c.procs["verifier"][2], c.procs["v2"][2]
    c.api.put("verifier-1", "demo-verifier", [("127.0.0.1", READY)], port=v2)
    c.api.put("verifier-0", "demo-verifier", [("127.0.0.1", NOT_READY)], port=v1)
    time.sleep(1.5)  # the gateway has seen both slices

    def terminate():
        c.api.put("verifier-0", "demo-verifier", [("127.0.0.1", READY)], port=v1)
        c.api.put("verifier-1", "demo-verifier", [("127.0.0.1", TERMINATING)], port=v2)
        c.procs["v2"][1].send_signal(signal.SIGTERM)

    sessions_before = gauge(c, "verifier", "crossdraft_sessions_started_total")
    results = run_sessions(c, terminate, victim="v2")
    check_all_identical(results, refs, "SIGTERM of a verifier (--grace 1: handed back after 0.5 s)")
    assert c.procs["v2"][1].wait(timeout=30) == 0
    assert "handing" in c.log("v2"), c.log("v2")[-2000:]
    assert gauge(c, "verifier", "crossdraft_sessions_started_total") > sessions_before  # resumed there
    c.api.delete("verifier-1")


def test_a_fourth_drafter_gets_new_sessions(pools, refs):
    start_drafter(pools, "d4")
    pools.wait_serving("d4")
    publish(pools, "d4", READY)
    deadline = time.monotonic() + 60
    while not gauge(pools, "d4", "crossdraft_sessions_started_total"):
        assert time.monotonic() < deadline, "no session reached the new drafter"
        check_all_identical(run_sessions(pools), refs)


def test_drain_refuses_new_sessions_and_hands_running_ones_back():
    """serving/drain.py: while draining, a new session is refused UNAVAILABLE; a running one goes on until
    hand_back, then ends with UNAVAILABLE after the message in hand; wait_idle sees it gone."""
    from crossdraft.serving.drain import HAND_BACK, Drain

    d = Drain("drafter")
    d.admit()  # not draining: admitted
    stream = d.hold(iter(range(100)))
    assert [next(stream), next(stream)] == [0, 1] and d.active == 1
    d.begin()
    with pytest.raises(Unavailable, match="draining"):
        d.admit()
    assert next(stream) == 2 and not d.wait_idle(0.05)  # running sessions go on while draining
    d.hand_back()
    with pytest.raises(Unavailable, match=re.escape(HAND_BACK)):
        next(stream)
    assert d.wait_idle(1.0) and d.active == 0


def test_the_gateway_tells_whose_draining_ended_a_call():
    """A verifier's hand-back reaches the gateway through the drafter's RunSession: `draining_role` says
    it was the verifier, so the drafter is not failed over (the end-to-end test above)."""
    from crossdraft.serving.drain import Drain, draining_role

    for role in ("verifier", "drafter"):
        d = Drain(role)
        d.begin()
        with pytest.raises(Unavailable) as refused:
            d.admit()
        d.hand_back()
        stream = d.hold(iter(range(3)))
        next(stream)
        with pytest.raises(Unavailable) as handed:
            next(stream)
        for e in (refused.value, handed.value):
            assert draining_role(str(e)) == role
            assert draining_role(f"drafter 127.0.0.1:1 relayed: UNAVAILABLE: {e}") == role
    assert draining_role("the verifier closed the session's stream before it finished") == ""
    assert draining_role("") == ""


# --- issue 17.8: store errors in the failover and expiry paths are logged and counted ------------------

class _FailingStore:
    """A session store whose every call fails as an unreachable Redis does (Unavailable)."""

    def __getattr__(self, name):
        def fail(*args, **kw):
            raise Unavailable("the session store is unreachable: connection refused")
        return fail


def test_store_errors_in_failover_and_expiry_are_logged_and_counted(caplog):
    from gateway.server import GatewayServicer, _Run
    from gateway.pool import Pool

    g = GatewayServicer(_FailingStore(), Pool("drafter", ["127.0.0.1:1", "127.0.0.1:2"], health_s=0),
                        Pool("verifier", ["127.0.0.1:3"], health_s=0))
    req = {"drafter": "", "model": "", "verifier_address": "127.0.0.1:3"}
    run = _Run(sid="s-1", req=req, started=None, drafter=g.drafters.pick_least_loaded(), give_up=0.0)
    with caplog.at_level(logging.WARNING, logger="crossdraft.gateway"):
        nxt = g._fail_over(run, "UNAVAILABLE: gone")
        g._expire("s-2")
        assert g._is_cancelled("s-3") is False
    assert nxt == "127.0.0.1:2" and run.tried == {"127.0.0.1:1"}  # the other member
    m = g.metrics
    counted = {op: m._f["store_errors"].labels(role="gateway", op=op)._value.get()
               for op in ("touch", "expire", "cancelled")}
    assert counted == {"touch": 1, "expire": 1, "cancelled": 1}
    text = caplog.text
    for sid, op in (("s-1", "touch"), ("s-2", "expire"), ("s-3", "cancelled")):
        assert f"session {sid}: the session store failed at {op}: the session store is unreachable" in text
