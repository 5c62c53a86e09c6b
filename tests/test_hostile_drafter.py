"""A hostile drafter behind the gateway cannot change a session's output (issue 6: the verifier is the
trust boundary), with real processes on loopback and a real redis-server.

The verifier checks every proposal (tests/test_verifier_trust.py, test_services.py), but a drafter also
relays the verifier's verdicts to the gateway. With `--verdict-key-file` on the verifier and the gateway
(a key the drafters never get; crossdraft/seal.py), the gateway commits a delta only under the
verifier's seal. Here a drafter process (tests/hostile_drafter.py) rewrites the text and ids it relays,
strips the seals, or replays an old sealed delta at a new offset:
- alone in the gateway's pool: every session finishes on the verifier alone, output identical to the
  in-process engine, nothing of the forgery in the store;
- beside an honest drafter: the session fails over to the honest one, output identical (greedy, and
  sampled with the same seed);
- the negative control: a gateway without the key commits the forgery (so the test can tell).
"""
from __future__ import annotations

import pytest

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from crossdraft.seal import new_key_file
from hostile_drafter import INJECTED
from test_faults import Cluster
from test_services import ROOT, save_model

PROMPT = "class Parser:\n    def get_value(self"
N = 96
HOSTILE = (str(ROOT / "tests" / "hostile_drafter.py"),)


@pytest.fixture(scope="module")
def cluster(trained_models, tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("hostile")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    key = new_key_file(str(root / "verdict.key"))
    c = Cluster(root)
    try:
        v = c.start("verifier", ["verifier", "--model", str(target), "--threads", "1", "--verdict-key-file", key])
        honest = c.start("honest", ["drafter", "--model", str(spm), "--threads", "1"])
        bad = {m: c.start(m, ["--model", str(spm), "--threads", "1"], prefix=HOSTILE + (m,))
               for m in ("rewrite", "strip", "replay")}
        c.wait_serving("verifier", "honest", *bad)
        gw = ["gateway", "--redis", redis_server, "--verifiers", v, "--drafter-timeout", "5"]
        for m, addr in bad.items():
            c.start(f"gw-{m}-alone", gw + ["--drafters", addr, "--verdict-key-file", key])
        c.start("gw-pair", gw + ["--drafters", f"{bad['rewrite']},{honest}", "--verdict-key-file", key])
        c.start("gw-nokey", gw + ["--drafters", bad["rewrite"]])
        c.wait_serving("gw-rewrite-alone", "gw-strip-alone", "gw-replay-alone", "gw-pair", "gw-nokey")
        c.dirs = {"target": target, "spm": spm}
        c.bad = bad
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def engine(cluster):
    return Engine.load(str(cluster.dirs["target"]), str(cluster.dirs["spm"]), device="cpu")


def generate(cluster, gateway: str, params=SamplingParams(), algorithm="slem"):
    with Client(cluster.address(gateway), timeout=120) as c:
        out = c.generate(PROMPT, N, params.temperature, params.seed, algorithm)
        stored = c.get_session(out["session_id"])
    return out, stored


@pytest.mark.parametrize("mode", ["rewrite", "strip", "replay"])
def test_a_hostile_drafter_alone_changes_nothing(cluster, engine, mode):
    ref = engine.generate(PROMPT, N, SamplingParams(), "slem")
    assert ref.new_tokens > 40
    out, stored = generate(cluster, f"gw-{mode}-alone")
    assert out["ids"] == ref.ids and out["text"] == ref.text
    assert stored["text"] == ref.text and stored["ids"] == ref.ids and stored["status"] == "finished"
    log = cluster.log(f"gw-{mode}-alone")
    assert f"drafter {cluster.bad[mode]} sent a delta at offset" in log and "without the verifier's seal" in log
    assert "on the verifier alone" in log or "resuming at" in log


@pytest.mark.parametrize("params,algorithm", [(SamplingParams(), "slem"),
                                              (SamplingParams(temperature=1.0, seed=3), "tli")],
                         ids=["greedy", "sampled"])
def test_a_hostile_drafter_beside_an_honest_one_changes_nothing(cluster, engine, params, algorithm):
    ref = engine.generate(PROMPT, N, params, algorithm)
    for _ in range(2):  # the pool picks by load: two sessions in turn meet the hostile drafter at least once
        out, _ = generate(cluster, "gw-pair", params, algorithm)
        assert out["ids"] == ref.ids and out["text"] == ref.text
    assert f"drafter {cluster.bad['rewrite']} sent a delta" in cluster.log("gw-pair")


def test_without_the_key_the_forgery_would_land(cluster, engine):
    """The negative control: the same hostile drafter, a gateway without --verdict-key-file."""
    out, _ = generate(cluster, "gw-nokey")
    assert INJECTED.decode() in out["text"]
    assert out["text"] != engine.generate(PROMPT, N, SamplingParams(), "slem").text
    assert "no --verdict-key-file" in cluster.log("gw-nokey")
