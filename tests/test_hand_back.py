"""Handing back: a drafter whose sessions' drafting the verifier's load cuts to nothing ends its calls
with `handed_back`, and the gateway steps those sessions on the verifier itself, which takes each up from
the state the drafter's stream left parked (no second prefill); later the session goes back to its
drafter (docs/serving.md). Real processes over real gRPC and a real redis-server; the drafter is the real
one, made to believe its verifier is busy (tests/busy_drafter.py), because real load cannot be made
reproducibly here. Its sessions therefore go back and forth between the drafter and the gateway, every
few tokens, which is the test: the output stays the target alone's."""
from __future__ import annotations

import pytest

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from test_faults import Cluster
from test_metrics import scrape, value
from test_services import ROOT, free_port, save_model

PROMPT = "class Parser:\n    def get_value(self"
N = 96
BUSY = (str(ROOT / "tests" / "busy_drafter.py"),)


@pytest.fixture(scope="module")
def cluster(trained_models, tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("handback")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    c = Cluster(root)
    try:
        c.metrics = {n: free_port() for n in ("verifier", "busy", "gateway", "keeping")}
        v = c.start("verifier", ["verifier", "--model", str(target), "--threads", "1",
                                 "--metrics-port", str(c.metrics["verifier"])])
        d = c.start("busy", ["--model", str(spm), "--threads", "1"], prefix=BUSY)
        c.wait_serving("verifier", "busy")
        c.start("gateway", ["gateway", "--redis", redis_server, "--drafters", d, "--verifiers", v,
                            "--metrics-port", str(c.metrics["gateway"])])
        c.start("keeping", ["gateway", "--redis", redis_server, "--drafters", d, "--verifiers", v, "--no-hand-back",
                            "--metrics-port", str(c.metrics["keeping"])])
        c.wait_serving("gateway", "keeping")
        c.dirs = {"target": target, "spm": spm}
        yield c
    finally:
        c.stop_all()


def metric(cluster, name: str, family: str) -> float:
    return value(scrape(f"http://127.0.0.1:{cluster.metrics[name]}/metrics"), family)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=5)],
                         ids=["greedy", "sampled"])
def test_sessions_handed_back_and_forth_give_the_target_alone_s_output(cluster, params):
    engine = Engine.load(str(cluster.dirs["target"]), str(cluster.dirs["spm"]), device="cpu")
    ref = engine.generate(PROMPT, N, params, "none")
    assert ref.new_tokens > 40
    before = {k: metric(cluster, *k) for k in (("gateway", "crossdraft_handed_back_total"),
                                              ("verifier", "crossdraft_batch_sequences_count"))}
    with Client(cluster.address("gateway"), timeout=120) as c:
        out = c.generate(PROMPT, N, params.temperature, params.seed, "slem")
        stored = c.get_session(out["session_id"])
    assert out["ids"] == ref.ids and out["text"] == ref.text
    assert stored["ids"] == ref.ids and stored["status"] == "finished"
    handed = metric(cluster, "gateway", "crossdraft_handed_back_total") - before[("gateway", "crossdraft_handed_back_total")]
    assert handed >= 1 and "handed back by drafter" in cluster.log("gateway")
    # every hand-over took the parked session up: one prefill (the drafter's first stream) and then one
    # pass per committed token, however often the session changed hands
    passes = metric(cluster, "verifier", "crossdraft_batch_sequences_count") - before[("verifier", "crossdraft_batch_sequences_count")]
    assert passes == 1 + len(ref.ids)


def test_a_gateway_with_no_hand_back_keeps_its_sessions_on_their_drafter(cluster):
    """`--no-hand-back`: the same busy drafter is not allowed to hand back (`may_hand_back` unset), so it
    relays every one of the target's steps itself; the output is the same."""
    engine = Engine.load(str(cluster.dirs["target"]), str(cluster.dirs["spm"]), device="cpu")
    ref = engine.generate(PROMPT, N, SamplingParams(), "none")
    with Client(cluster.address("keeping"), timeout=120) as c:
        out = c.generate(PROMPT, N, 0.0, 0, "slem")
    assert out["ids"] == ref.ids
    assert metric(cluster, "keeping", "crossdraft_handed_back_total") == 0
    assert "handed back by drafter" not in cluster.log("keeping")
    assert out["rounds"] == len(ref.ids)  # every token a round of the drafter's: the target's own steps
