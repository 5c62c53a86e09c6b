"""Load (issue 6): 16 concurrent clients against the four processes on loopback (a real redis-server, a
verifier, two drafters, a gateway), plus one slow client that reads its stream only at the end.

Zero errors; every greedy output identical to the in-process engine's output for its prompt; the slow
client neither stalls the others nor loses anything; each service's memory (VmRSS) flat after warm-up.
The figures are printed (run with -s to see them).

CI runs the short form: 16 clients x 3 generations. The full form is one command away:
    CROSSDRAFT_SOAK_SECONDS=600 .venv/bin/python -m pytest -q -s tests/test_soak.py
"""
from __future__ import annotations

import os
import threading
import time

import grpc
import pytest

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from test_faults import Cluster
from test_services import save_model

SOAK_S = float(os.environ.get("CROSSDRAFT_SOAK_SECONDS", "0"))  # 0: the short form
CLIENTS = 16
ROUNDS_SHORT = 3
PROMPTS = ["class Parser:\n    def get_value(self", "def parse(self, value", "# return the first value\nresult = ",
           "import os\n\ndef main("]
N = 48
RSS_GROWTH_LIMIT_MB = 64  # after warm-up: caches are bounded, so growth beyond noise means a leak
PLATEAU_MB = 12  # the long form: growth over the second half of the run
SAMPLE_S = 5.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def soak(trained_models, tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("soak")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    c = Cluster(root)
    try:
        v = c.start("verifier", ["verifier", "--model", str(target), "--threads", "1", "--max-sessions", "32"])
        d1 = c.start("d1", ["drafter", "--model", str(spm), "--threads", "1", "--max-sessions", "32"])
        d2 = c.start("d2", ["drafter", "--model", str(spm), "--threads", "1", "--max-sessions", "32"])
        c.wait_serving("verifier", "d1", "d2")
        c.start("gateway", ["gateway", "--redis", redis_server, "--drafters", f"{d1},{d2}", "--verifiers", v])
        c.wait_serving("gateway")
        c.engine = Engine.load(str(target), str(spm), device="cpu")
        yield c
    finally:
        c.stop_all()


def run_clients(cluster, refs, stop_at: float, rounds: int) -> tuple:
    """(generations, errors, mismatches) of CLIENTS threads, each generating until stop_at (or `rounds`)."""
    lock = threading.Lock()
    counts = {"ok": 0, "errors": [], "mismatch": []}

    def client(i: int) -> None:
        with Client(cluster.address("gateway"), timeout=120) as c:
            k = 0
            while (k < rounds) if not stop_at else (time.monotonic() < stop_at):
                prompt = PROMPTS[(i + k) % len(PROMPTS)]
                algorithm = "slem" if (i + k) % 2 else "auto"
                try:
                    out = c.generate(prompt, N, algorithm=algorithm)
                except Exception as e:  # noqa: BLE001 - counted
                    with lock:
                        counts["errors"].append(f"{type(e).__name__}: {e}")
                else:
                    with lock:
                        if out["text"] == refs[prompt]:
                            counts["ok"] += 1
                        else:
                            counts["mismatch"].append(prompt)
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(600.0, SOAK_S + 300))
    return counts["ok"], counts["errors"], counts["mismatch"]


def test_soak_concurrent_clients(soak):
    refs = {p: soak.engine.generate(p, N, SamplingParams(), "slem").text for p in PROMPTS}
    # auto resolves to slem for this greedy pair, so one reference per prompt serves both
    names = ("verifier", "d1", "d2", "gateway")
    ok, errors, mismatch = run_clients(soak, refs, 0.0, 1)  # warm-up: every process at its working set
    assert not errors and not mismatch
    before = {n: rss_mb(soak.pid(n)) for n in names}

    # a slow client: opens its stream, reads one message, then nothing until the others are done
    from crossdraft.v1 import gateway_pb2, gateway_pb2_grpc

    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(soak.address("gateway")))
    slow = stub.Generate(gateway_pb2.GenerateRequest(spec=gateway_pb2.GenerationSpec(
        prompt=PROMPTS[0], max_new_tokens=N, algorithm=4)), timeout=900)  # ALGORITHM_SLEM
    first = next(slow)

    t0 = time.monotonic()
    series, done = [], threading.Event()

    def sample():  # VmRSS of each process every few seconds: flat means a plateau, not just a small rise
        while not done.wait(SAMPLE_S):
            series.append((time.monotonic() - t0, {n: rss_mb(soak.pid(n)) for n in names}))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ok, errors, mismatch = run_clients(soak, refs, t0 + SOAK_S if SOAK_S else 0.0, ROUNDS_SHORT)
    seconds = time.monotonic() - t0
    done.set()
    sampler.join()
    after = {n: rss_mb(soak.pid(n)) for n in names}
    series.append((seconds, after))

    text = [first.delta.text] if first.WhichOneof("event") == "delta" else []
    for msg in slow:  # now read it all: nothing was lost while it waited
        if msg.WhichOneof("event") == "delta":
            text.append(msg.delta.text)
    print(f"\nsoak: {CLIENTS} clients, {ok} generations of {N} tokens in {seconds:.1f} s, {len(errors)} errors, "
          f"{len(mismatch)} mismatches; VmRSS MB after warm-up -> at the end: "
          + ", ".join(f"{n} {before[n]:.0f} -> {after[n]:.0f}" for n in names))
    shown = series[:: max(1, len(series) // 8)]
    for t, rss in shown + ([series[-1]] if shown[-1] is not series[-1] else []):
        print(f"  VmRSS MB at {t:5.0f} s: " + ", ".join(f"{n} {rss[n]:.0f}" for n in names))
    assert not errors, errors[:3]
    assert not mismatch
    assert ok >= CLIENTS * (ROUNDS_SHORT if not SOAK_S else 1)
    assert "".join(text) == refs[PROMPTS[0]]
    for n in names:
        assert after[n] - before[n] < RSS_GROWTH_LIMIT_MB, f"{n}: {before[n]:.0f} -> {after[n]:.0f} MB"
    if SOAK_S >= 60:  # the long form: the second half must be a plateau
        half = next(rss for t, rss in series if t >= seconds / 2)
        for n in names:
            assert after[n] - half[n] < PLATEAU_MB, f"{n}: {half[n]:.0f} MB at half time -> {after[n]:.0f} MB"
