"""Continuous batching is lossless and isolates sessions.

In process (`Engine.generate_batch`, float64 tiny models so that batched matrix products, which round
differently in the last bits from one sequence alone, cannot flip a choice): every session's output,
greedy and seeded sampled, equals what it gives alone, whatever else shares its passes. Through the
services (a verifier and a drafter as processes, float64 via --dtype): eight concurrent sessions of
mixed algorithms give the outputs they give one by one; a session cancelled mid-batch leaves the others
intact; the KV budget refuses a session with a message naming the limit and admits it once room is
given back; a prompt longer than the per-pass token budget is prefilled while other sessions run. No
timing thresholds: speed lives in the benchmark (`crossdraft bench --concurrency`)."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_lossless_greedy import PROMPTS, make_engine
from test_services import Servers, drafter_stub, save_model, verifier_stub

from crossdraft import wire
from crossdraft.protocol import TOKENS, Proposal
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import verifier_pb2
from drafter_service.client import run_session

T1 = SamplingParams(temperature=1.0, seed=13)
MAX_NEW = 24


@pytest.mark.parametrize("pair,algorithm", [("bpe/bpe", "same"), ("bpe/spm", "tli"), ("bpe/spm", "slem"),
                                            ("bpe/spm", "auto"), ("bpe/spm", "none"), ("bpe/spm", "slrs")])
def test_a_batch_gives_each_session_what_it_gives_alone(trained_models, pair, algorithm):
    engine = make_engine(trained_models, pair)
    prompts = PROMPTS[:8]
    params = [SamplingParams()] * 4 + [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    if algorithm == "slrs":  # (slrs under sampling only)
        params = [SamplingParams(temperature=1.0, seed=s) for s in range(8)]
    algo = "tli" if algorithm == "auto" else algorithm  # auto measures timings: compare its arms' outputs
    alone = [engine.generate(p, MAX_NEW, sp, algo) for p, sp in zip(prompts, params)]
    batched = engine.generate_batch(prompts, MAX_NEW, params, algo, concurrency=8)
    for a, b, p in zip(alone, batched, prompts):
        assert b.ids == a.ids, (pair, algorithm, p)
        assert b.algorithm == a.algorithm
    if algorithm == "auto":  # auto's arms switch per round by timing; greedy, every arm gives the target's text
        greedy = [SamplingParams()] * 8
        ref = [engine.generate(p, MAX_NEW, sp, "none") for p, sp in zip(prompts, greedy)]
        got = engine.generate_batch(prompts, MAX_NEW, greedy, "auto", concurrency=8)
        assert [g.ids for g in got] == [r.ids for r in ref]


def test_batched_sessions_share_passes(trained_models):
    """The point of it: eight sessions at once take far fewer target passes than their rounds."""
    from crossdraft.load import CostModel
    from crossdraft.scheduler import Scheduler

    engine = make_engine(trained_models, "bpe/spm")
    seen = []
    orig = Scheduler.__init__

    def spy(self, runner, max_batch_tokens=512, name="model", observer=None, expected=None):
        def obs(sequences, tokens, seconds, waits, inner=observer):
            seen.append((name, sequences))
            if inner is not None:
                inner(sequences, tokens, seconds, waits)
        orig(self, runner, max_batch_tokens, name, obs, expected)

    Scheduler.__init__ = spy
    try:
        # a fixed draft length: the load cap leaves it as asked (under this load it would cut drafting to
        # nothing, and the drafter's passes would have no sessions to share)
        res = engine.generate_batch(PROMPTS[:8], MAX_NEW, SamplingParams(), "slem", draft_tokens=3, concurrency=8)
    finally:
        Scheduler.__init__ = orig
    target = [s for n, s in seen if n == "target"]
    assert sum(target) == sum(r.rounds for r in res) + 8  # every round and every prefill, once
    assert len(target) < sum(target)  # passes carried several sessions (how many depends on the threads' timing)
    assert any(s > 1 for n, s in seen if n == "drafter")
    assert CostModel  # (the engine fits the load model from the same observer)


# --- through the services ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batched_services(trained_models, tmp_path_factory):
    """A float64 verifier (with a per-pass budget of 24 tokens, so prefills are chunked) and a float64
    drafter with another tokenizer, as processes; and a second verifier with a KV budget of 61 positions."""
    root = tmp_path_factory.mktemp("batching")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    servers = Servers(root)
    f64 = ("--dtype", "float64")
    try:
        pass_log = root / "verifier-passes.jsonl"
        addr = {"verifier": servers.start("verifier", "verifier", target,
                                          extra=f64 + ("--max-batch-tokens", "24", "--pass-log", str(pass_log))),
                "drafter": servers.start("drafter", "drafter", spm, extra=f64),
                "small": servers.start("small", "verifier", target,
                                       extra=f64 + ("--max-model-len", "64", "--kv-wait-seconds", "1",
                                                    "--kv-budget-mb", "0.06"))}
        servers.wait_serving(addr)
        yield dict(addr, dirs={"target": target, "spm": spm}, servers=servers, pass_log=pass_log)
    finally:
        servers.stop_all()


MIXED = [("slem", SamplingParams()), ("tli", SamplingParams()), ("tli", T1), ("slem", T1),
         ("none", SamplingParams()), ("auto", SamplingParams()), ("slrs", T1), ("tli", SamplingParams(seed=3))]


def test_concurrent_sessions_of_mixed_algorithms_give_their_outputs_one_by_one(batched_services):
    s = batched_services
    jobs = [(PROMPTS[i], algo, params) for i, (algo, params) in enumerate(MIXED)]

    def run(job):
        prompt, algo, params = job
        return run_session(s["drafter"], s["verifier"], prompt, MAX_NEW, params, algo, timeout=120)[0]

    one_by_one = [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == one_by_one
    info = verifier_stub(s["verifier"]).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=10).cache
    assert info.passes > 0 and info.reserved_bytes == 0 and info.max_batch_tokens == 24


def test_a_session_cancelled_mid_batch_leaves_the_others_intact(batched_services):
    s = batched_services
    jobs = [(PROMPTS[i], "slem", SamplingParams()) for i in range(4)]
    want = [run_session(s["drafter"], s["verifier"], p, MAX_NEW, sp, a, timeout=120)[0] for p, a, sp in jobs]
    doomed = wire.session_request(s["verifier"], PROMPTS[5], 200, SamplingParams(), "tli", session_id="doomed")
    call = drafter_stub(s["drafter"]).RunSession(doomed, timeout=120)
    got_one = threading.Event()

    def cancel_after_first_delta():
        for _ in call:
            got_one.set()
            call.cancel()
            return

    t = threading.Thread(target=cancel_after_first_delta)
    t.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda j: run_session(s["drafter"], s["verifier"], j[0], MAX_NEW, j[2], j[1],
                                                  timeout=120)[0], jobs))
    t.join(60)
    assert got_one.is_set() and call.code() == grpc.StatusCode.CANCELLED
    assert got == want


def test_the_kv_budget_refuses_clearly_and_recovers(batched_services):
    """A budget of 0.06 MiB on a model whose positions take 1 KiB (float64) holds 61 positions: one
    session of 40 fits, a second waits --kv-wait-seconds and is refused RESOURCE_EXHAUSTED naming the
    limit; once the first's stream ends (the session parked: verifier_service/server.py), the second is
    admitted, and the parked one gives way to it. A session larger than the whole budget is
    refused at once, saying so."""
    from test_services import VerifyStream

    small = batched_services["small"]

    def usage():
        return verifier_stub(small).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=10).cache

    def stream(sid, prompt, n):
        return VerifyStream(small, wire.SessionStart(sid, prompt, [], SamplingParams(), n, "none"))

    first = stream("kv-a", [5, 6, 7, 8], 36)
    try:
        first.send(Proposal(seq=4, kind=TOKENS))  # (open: admitted and prefilled)
        u = usage()
        per_token = u.reserved_bytes // 40
        assert u.reserved_bytes == 40 * per_token and 40 * per_token <= u.budget_bytes < 80 * per_token
        second = stream("kv-b", [9, 10, 11, 12], 36)
        with pytest.raises(grpc.RpcError) as e:
            second.send(Proposal(seq=4, kind=TOKENS))
        second.close()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache budget full" in e.value.details() and "--kv-budget-mb" in e.value.details()
        assert usage().refused_sessions >= 1
    finally:
        first.close()
    deadline = time.monotonic() + 30
    while usage().parked_sessions < 1 and time.monotonic() < deadline:  # (the verifier ends its side just after)
        time.sleep(0.05)
    # the first ended unfinished: parked, holding its room until a session needs it, as this one does
    assert usage().reserved_bytes == 40 * per_token
    again = stream("kv-b", [9, 10, 11, 12], 36)
    try:
        assert len(again.send(Proposal(seq=4, kind=TOKENS)).ids) == 1
        assert usage().parked_sessions == 0 and usage().reserved_bytes == 40 * per_token
    finally:
        again.close()
    whole = stream("kv-c", [5] * 30, 34)  # 64 positions: more than the 61 of the whole budget
    with pytest.raises(grpc.RpcError) as e:
        whole.send(Proposal(seq=30, kind=TOKENS))
    whole.close()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than the whole budget" in e.value.details()


def test_a_prompt_longer_than_the_pass_budget_is_prefilled_beside_running_sessions(batched_services, trained_models):
    """The verifier takes 24 tokens a pass; a 150-token prompt's prefill runs in chunks while two other
    sessions go on; every output is what it is alone."""
    s = batched_services
    long_prompt = ("def f(x):\n    return x + 1\n\n" * 12)[:400]
    jobs = [(long_prompt, "slem"), (PROMPTS[0], "tli"), (PROMPTS[1], "slem")]
    want = [run_session(s["drafter"], s["verifier"], p, MAX_NEW, SamplingParams(), a, timeout=120)[0]
            for p, a in jobs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda j: run_session(s["drafter"], s["verifier"], j[0], MAX_NEW, SamplingParams(),
                                                  j[1], timeout=120)[0], jobs))
    assert got == want
    from crossdraft.vocab import Vocab

    assert len(Vocab.load(str(s["dirs"]["target"])).encode_prompt(long_prompt)) > 2 * 24
    # the verifier's --pass-log: every pass within the budget, and prefill chunks beside sessions' rounds
    passes = [json.loads(line) for line in s["pass_log"].read_text().splitlines()]
    assert passes and all(sum(p["steps"]) + sum(p["chunks"]) <= 24 or len(p["steps"]) + len(p["chunks"]) == 1
                          for p in passes)
    assert any(p["steps"] and p["chunks"] for p in passes)
    assert all(p["forward_ms"] > 0 and p["after_ms"] >= 0 and p["model"] == "verifier" for p in passes)


def test_the_pass_log_stops_at_its_size_and_refuses_a_path_it_cannot_write(tmp_path):
    from crossdraft.batched import PassLog
    from crossdraft.errors import InvalidArgument

    rec = {"model": "verifier", "t": 1.0, "steps": [1, 3], "chunks": [], "forward_ms": 5.0, "after_ms": 0.2}
    line = len(json.dumps(rec, separators=(",", ":"))) + 1
    log = PassLog(str(tmp_path / "p.jsonl"), max_bytes=3 * line + 5)
    for _ in range(10):
        log(rec)
    log.close()
    assert [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [rec] * 3
    with pytest.raises(InvalidArgument, match="--pass-log: cannot write"):
        PassLog(str(tmp_path / "no-such-dir" / "p.jsonl"))
