"""The gateway over real gRPC and a real redis-server: redis, a verifier, two drafters and the gateway,
each a separate process on loopback, plus the embedded `serve all` as one more process.

Outputs through client -> gateway -> drafter -> verifier must be identical to the in-process engine's
on the same saved tiny models (greedy and sampled); every session is in Redis under
`crossdraft:session:{id}*` with its event stream; a refused request gets its status code and writes
nothing to Redis."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import grpc
import needs
import pytest

from crossdraft import wire
from crossdraft.bench import config_order
from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_services import ROOT, Servers, free_port, save_model

PROMPT = "class Parser:\n    def get_value(self"
N = 40


class Procs(Servers):
    """Servers, plus processes started from a whole `crossdraft serve ROLE ...` command line."""

    def start_cmd(self, name: str, args: list) -> str:
        port = free_port()
        log = open(self.log_dir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "crossdraft.cli", "serve", *args, "--port", str(port), "--grace", "2"]
        self.procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack(trained_models, tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("gateway")
    dirs = {"target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "same": save_model(trained_models["bpe_small"], "bpe", root / "drafter-same"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm")}
    procs = Procs(root)
    try:
        addr = {"verifier": procs.start("verifier", "verifier", dirs["target"]),
                "same": procs.start("same", "drafter", dirs["same"]),
                "spm": procs.start("spm", "drafter", dirs["spm"]),
                "all": procs.start_cmd("all", ["all", "--target", str(dirs["target"]), "--drafter", str(dirs["spm"]),
                                               "--threads", "1"])}
        addr["gateway"] = procs.start_cmd("gateway", [
            "gateway", "--redis", redis_server, "--drafters", f"{addr['spm']},{addr['same']}",
            "--verifiers", addr["verifier"], "--max-prompt-bytes", "2000"])
        procs.wait_serving(addr)
        yield dict(addr, dirs=dirs, procs=procs, redis=redis_server)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def engines(stack):
    d = stack["dirs"]
    return {"same": Engine.load(str(d["target"]), str(d["same"]), device="cpu"),
            "spm": Engine.load(str(d["target"]), str(d["spm"]), device="cpu")}


@pytest.fixture(scope="module")
def rdb(stack):
    import redis

    r = redis.Redis.from_url(stack["redis"])
    yield r
    r.close()


def stub(address):
    return gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(address))


def spec(prompt=PROMPT, n=N, algorithm=common_pb2.ALGORITHM_SLEM, drafter="drafter-spm", **params):
    return gateway_pb2.GenerationSpec(prompt=prompt, max_new_tokens=n, algorithm=algorithm, drafter=drafter,
                                      params=common_pb2.SamplingParams(**params))


def keys(rdb) -> set:
    return set(rdb.keys("crossdraft:*"))


CASES = [("spm", "slem", SamplingParams()), ("spm", "tli", SamplingParams()), ("same", "same", SamplingParams()),
         ("spm", "none", SamplingParams()),
         ("spm", "tli", SamplingParams(temperature=1.0, seed=7)),
         ("spm", "slem", SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)),
         ("same", "same", SamplingParams(temperature=1.0, seed=11)),
         ("spm", "slrs", SamplingParams(temperature=1.0, seed=13)), ("spm", "slrs", SamplingParams())]


@pytest.mark.parametrize("drafter,algorithm,params", CASES,
                         ids=[f"{a}-{d}-T{p.temperature}" for d, a, p in CASES])
def test_identical_to_in_process(stack, engines, drafter, algorithm, params):
    ref = engines[drafter].generate(PROMPT, N, params, algorithm)
    with Client(stack["gateway"], timeout=60) as c:
        out = c.generate(PROMPT, N, params.temperature, params.seed, algorithm, None, params.top_k, params.top_p,
                         drafter=f"drafter-{drafter}")
    assert out["ids"] == ref.ids and out["text"] == ref.text
    assert out["algorithm"] == ref.algorithm and out["finish_reason"] == ref.finish_reason
    assert (out["rounds"], out["draft_tokens"], out["accepted_tokens"], out["drafted"], out["new_tokens"]) == \
           (ref.rounds, ref.draft_tokens, ref.accepted_tokens, ref.drafted, ref.new_tokens)
    # slrs's work counters (slrs_fallbacks, slrs_rows) stay on the drafter: not on the wire yet
    assert set(out) - {"ids", "session_id"} == set(ref.as_json()) - {"slrs_fallbacks", "slrs_rows"}


def test_target_alone_runs_on_the_verifier_directly(stack, engines):
    """`none` has nothing to draft: the gateway runs it on a Verify stream of its own, target steps in
    flight (protocol.STEPS_IN_FLIGHT), no drafter placed or counted; the same output and end as in process,
    its why "asked for" (not the failover's "no drafter could be reached")."""
    ref = engines["spm"].generate(PROMPT, N, SamplingParams(temperature=1.0, seed=5), "none")
    with Client(stack["gateway"], timeout=60) as c:
        out = c.generate(PROMPT, N, 1.0, 5, "none", drafter="drafter-spm")
        s = c.get_session(out["session_id"], include_output=False)
    assert out["ids"] == ref.ids and out["text"] == ref.text and out["why"] == "asked for"
    assert (out["algorithm"], out["rounds"], out["new_tokens"], out["draft_tokens"]) == ("none", N, N, 0)
    assert s["drafter_address"] == "" and s["verifier_address"] == stack["verifier"]


def test_health_and_reflection(stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack["gateway"]) as ch:
        for s in ("", "crossdraft.v1.GatewayService"):
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
        reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert "crossdraft.v1.GatewayService" in {s.name for s in reply.list_services_response.service}


def test_session_in_redis_and_get_session(stack, engines, rdb):
    sid = "redis-check-1"
    ref = engines["spm"].generate(PROMPT, N, SamplingParams(), "slem")
    r = stub(stack["gateway"]).GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec(), session_id=sid), timeout=60)
    assert r.session_id == sid and r.text == ref.text and list(r.ids) == ref.ids
    base = f"crossdraft:session:{{{sid}}}".encode()
    assert keys(rdb) >= {base, base + b":ids", base + b":text", base + b":events"}
    h = rdb.hgetall(base)
    assert h[b"status"] == b"done" and h[b"finish_reason"].decode() == ref.finish_reason
    assert int(h[b"rounds"]) == ref.rounds and int(h[b"accepted_tokens"]) == ref.accepted_tokens
    assert json.loads(h[b"request"])["prompt"] == PROMPT
    blob = rdb.get(base + b":ids")
    assert list(struct.unpack(f"<{len(blob) // 4}i", blob)) == ref.ids
    assert rdb.get(base + b":text").decode("utf-8", errors="replace") == ref.text
    entries = rdb.xrange(base + b":events")
    ids, text = [], b""
    for _, f in entries:
        b = f.get(b"ids", b"")
        ids += struct.unpack(f"<{len(b) // 4}i", b)
        text += f.get(b"text", b"")
    assert ids == ref.ids and text.decode("utf-8", errors="replace") == ref.text
    assert entries[-1][1].get(b"final") == b"1" and rdb.pttl(base) > 0

    s = stub(stack["gateway"]).GetSession(gateway_pb2.GetSessionRequest(session_id=sid, include_output=True),
                                          timeout=10).session
    assert s.status == gateway_pb2.SESSION_STATUS_FINISHED and s.text == ref.text and list(s.ids) == ref.ids
    assert s.new_tokens == ref.new_tokens and s.end.finish_reason == wire_reason(ref.finish_reason)
    assert s.spec.prompt == PROMPT and s.drafter_address == stack["spm"] and s.verifier_address == stack["verifier"]
    assert s.end.text_bytes == len(ref.text.encode()) == s.text_bytes

    # the same id again attaches to the finished session: same text, nothing new in Redis
    before = keys(rdb)
    again = stub(stack["gateway"]).GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec(), session_id=sid),
                                                 timeout=30)
    assert again.text == ref.text and keys(rdb) == before and len(rdb.xrange(base + b":events")) == len(entries)
    # re-attach from a byte offset
    k = len(ref.text.encode()) // 2
    while k and (ref.text.encode()[k] & 0xC0) == 0x80:
        k -= 1
    with Client(stack["gateway"], timeout=30) as c:
        assert "".join(c.attach(sid, k)) == ref.text.encode()[k:].decode()


def test_another_replica_reports_the_same_end(stack, engines, rdb):
    """The final statistics live in Redis with the final commit: a second gateway replica on the same
    Redis, which did not run the session, reports the same resolved algorithm, why and statistics."""
    sid = "replica-end-1"
    r = stub(stack["gateway"]).GenerateUnary(
        gateway_pb2.GenerateUnaryRequest(spec=spec(algorithm=common_pb2.ALGORITHM_AUTO), session_id=sid), timeout=60)
    # auto measures (crossdraft/auto.py): tli or slem for this pair, and why says what it measured
    assert r.end.algorithm in (common_pb2.ALGORITHM_TLI, common_pb2.ALGORITHM_SLEM)
    assert "tok/s" in r.end.why and r.end.stats.verify_ns > 0
    result = json.loads(rdb.hget(f"crossdraft:session:{{{sid}}}".encode(), "result"))
    assert result["algorithm"] == wire.algorithm_from_proto(r.end.algorithm) and result["why"] == r.end.why
    other = stack["procs"].start_cmd("gateway-2", [
        "gateway", "--redis", stack["redis"], "--drafters", stack["spm"], "--verifiers", stack["verifier"]])
    stack["procs"].wait_serving({"gateway-2": other})
    s = stub(other).GetSession(gateway_pb2.GetSessionRequest(session_id=sid), timeout=10).session
    assert s.end.algorithm == r.end.algorithm and s.end.why == r.end.why and s.end.stats == r.end.stats
    assert s.stats == r.end.stats
    ended = [m for m in stub(other).AttachSession(gateway_pb2.AttachSessionRequest(session_id=sid), timeout=10)
             if m.WhichOneof("event") == "end"]
    assert len(ended) == 1 and ended[0].end == r.end


def test_session_limit_and_gateway_metrics(stack, engines, rdb):
    """A gateway with --max-sessions 1: while its one session runs (its drafter is held with SIGSTOP,
    so the session cannot end), a second request gets RESOURCE_EXHAUSTED and writes nothing; the held
    session then completes with the in-process output. The gateway's /metrics count it all."""
    import signal
    import threading
    import time

    from test_metrics import scrape, value

    mport = free_port()
    gw = stack["procs"].start_cmd("gateway-limit", [
        "gateway", "--redis", stack["redis"], "--drafters", stack["spm"], "--verifiers", stack["verifier"],
        "--max-sessions", "1", "--metrics-port", str(mport)])
    stack["procs"].wait_serving({"gateway-limit": gw})
    url = f"http://127.0.0.1:{mport}/metrics"
    ref = engines["spm"].generate(PROMPT, N, SamplingParams(), "slem")
    drafter = stack["procs"].procs["spm"][0]
    out = {}
    before = keys(rdb)
    os.kill(drafter.pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=lambda: out.update(Client(gw, timeout=60).generate(PROMPT, N, algorithm="slem")))
        t.start()
        deadline = time.monotonic() + 20
        while len(keys(rdb) - before) < 3 and time.monotonic() < deadline:  # the held session exists
            time.sleep(0.05)
        held = keys(rdb)
        assert len(held - before) == 3  # its hash, ids and text (the event stream comes with the first commit)
        with pytest.raises(grpc.RpcError) as e:
            stub(gw).GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec()), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 session" in e.value.details()
        assert keys(rdb) == held  # the refusal wrote nothing
    finally:
        os.kill(drafter.pid, signal.SIGCONT)
    t.join(timeout=60)
    assert out["text"] == ref.text and out["ids"] == ref.ids
    m = scrape(url)
    assert value(m, "crossdraft_sessions_started_total") == 1 and value(m, "crossdraft_sessions_finished_total") == 1
    assert value(m, "crossdraft_sessions_active") == 0
    assert value(m, "crossdraft_generated_tokens_total") == N
    assert value(m, "crossdraft_rounds_total") == ref.rounds
    assert value(m, "crossdraft_accepted_tokens_total") == ref.accepted_tokens
    assert value(m, "crossdraft_time_to_first_token_seconds_count") == 1
    assert value(m, "crossdraft_session_seconds_count") == 1
    assert value(m, "crossdraft_errors_total", code="RESOURCE_EXHAUSTED") == 1


def wire_reason(name):
    from crossdraft import wire

    return wire.finish_reason_to_proto(name)


def test_cancel_mid_stream(stack):
    g = stub(stack["gateway"])
    stream = g.Generate(gateway_pb2.GenerateRequest(spec=spec("x", 230, common_pb2.ALGORITHM_NONE), session_id="cancel-1"),
                        timeout=60)
    first = next(stream)
    assert first.WhichOneof("event") == "delta"
    r = g.CancelSession(gateway_pb2.CancelSessionRequest(session_id="cancel-1"), timeout=10)
    assert r.cancelled and r.session.status == gateway_pb2.SESSION_STATUS_FINISHED
    rest = list(stream)
    assert rest[-1].WhichOneof("event") == "end"
    assert rest[-1].end.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    s = g.GetSession(gateway_pb2.GetSessionRequest(session_id="cancel-1"), timeout=10).session
    assert s.end.finish_reason == common_pb2.FINISH_REASON_CANCELLED and s.new_tokens < 230
    assert not g.CancelSession(gateway_pb2.CancelSessionRequest(session_id="cancel-1"), timeout=10).cancelled


BAD = [("empty prompt", spec(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
       ("unknown algorithm", spec(algorithm=99), grpc.StatusCode.INVALID_ARGUMENT),
       ("prompt over the byte limit", spec(prompt="x = 1\n" * 400), grpc.StatusCode.INVALID_ARGUMENT),
       ("prompt over the target's context", spec(prompt="value = items + 1\n" * 100), grpc.StatusCode.INVALID_ARGUMENT),
       ("max_new_tokens 0", spec(n=0), grpc.StatusCode.INVALID_ARGUMENT),
       ("bad sampling", spec(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
       ("same with other tokenizers", spec(algorithm=common_pb2.ALGORITHM_SAME), grpc.StatusCode.FAILED_PRECONDITION),
       ("unknown drafter model", spec(drafter="nope"), grpc.StatusCode.FAILED_PRECONDITION)]


@pytest.mark.parametrize("what,bad,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_writes_nothing(stack, rdb, what, bad, code):
    g = stub(stack["gateway"])
    before = keys(rdb)
    for call in (lambda: list(g.Generate(gateway_pb2.GenerateRequest(spec=bad), timeout=30)),
                 lambda: g.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=bad, session_id="bad-1"), timeout=30)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, e.value.details()
    assert keys(rdb) == before


def test_unknown_session(stack, rdb):
    g = stub(stack["gateway"])
    before = keys(rdb)
    for call in (lambda: g.GetSession(gateway_pb2.GetSessionRequest(session_id="no-such"), timeout=10),
                 lambda: g.CancelSession(gateway_pb2.CancelSessionRequest(session_id="no-such"), timeout=10),
                 lambda: list(g.AttachSession(gateway_pb2.AttachSessionRequest(session_id="no-such"), timeout=10))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        g.GetSession(gateway_pb2.GetSessionRequest(session_id="bad id{}"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert keys(rdb) == before


def test_embedded_serve_all(stack, engines):
    for algorithm, params in (("slem", SamplingParams()), ("tli", SamplingParams(temperature=1.0, seed=5))):
        ref = engines["spm"].generate(PROMPT, N, params, algorithm)
        with Client(stack["all"], timeout=60) as c:
            out = c.generate(PROMPT, N, params.temperature, params.seed, algorithm)
            assert out["ids"] == ref.ids and out["text"] == ref.text and out["algorithm"] == ref.algorithm
            s = c.get_session(out["session_id"])
            assert s["status"] == "finished" and s["text"] == ref.text


def test_cli_generate_gateway(stack, engines, tmp_path):
    prompts = [PROMPT, "# return the first value\nresult = "]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "crossdraft.cli", "generate", "--gateway", stack["all"], "--prompts-file", str(f),
           "--algorithm", "slem", "--max-new-tokens", str(N), "--json"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(lines) == 2
    for out, prompt in zip(lines, prompts):
        ref = engines["spm"].generate(prompt, N, SamplingParams(), "slem")
        assert set(out) == set(ref.as_json()) and out["text"] == ref.text and out["new_tokens"] == ref.new_tokens
    bad = subprocess.run(cmd[:-1] + ["--algorithm", "medusa"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "medusa" in bad.stderr


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bench_distributed_column(stack, tmp_path, temperature):
    """`crossdraft bench --distributed` starts its own redis-server, verifier, drafters and gateway,
    runs each configuration through them right after it runs in process, and reports the ratio and
    whether the outputs are identical (greedy and sampled: same seed, same output); then stops them."""
    d = stack["dirs"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "def parse(self, value")))
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "crossdraft.cli", "bench", "--target", str(d["target"]), "--drafters", str(d["spm"]),
           str(d["same"]), "--algorithms", "same,slem", "--prompts-file", str(f), "--min-chars", "0",
           "--num-prompts", "2", "--max-new-tokens", "12", "--temperature", str(temperature), "--no-hf",
           "--threads", "1", "--distributed", "--json-out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {(r["config"], r["drafter"]): r for r in json.loads(out.read_text())["results"]}
    for algo, drafter in (("slem", "drafter-spm"), ("same", "drafter-same")):
        dist = rows[(f"{algo} distributed", drafter)]
        assert dist["error"] is None and dist["exact_match"] == "2/2"  # identical to in process
        assert dist["new_tokens"] == rows[(algo, drafter)]["new_tokens"] == 24
        assert dist["vs_in_process"] > 0 and "network" in dist["round_ms"]
    assert "against the same configuration in process" in p.stdout


def test_bench_sweep_with_auto_per_prompt_figures_and_summary(stack, tmp_path):
    """In process, `bench --sweep-draft-tokens` with auto: each row carries its per-prompt figures (they
    add up to the row), and scripts/auto_summary.py pools two such runs and puts a bootstrap interval
    around the pooled ratio. The configurations' order turns by one per prompt. The drafter is named as
    a directory next to the target (`--drafters drafter-spm`); a name that is no directory, there or
    as a path, is refused at once with one line and exit code 2."""
    assert config_order(["a", "b", "c"], 0) == ["a", "b", "c"] and config_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    d = stack["dirs"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "def parse(self, value", "x = [")))
    files, env = [], dict(os.environ, PYTHONPATH=str(ROOT))
    for seed in (0, 1):
        out = tmp_path / f"bench-{seed}.json"
        cmd = [sys.executable, "-m", "crossdraft.cli", "bench", "--target", str(d["target"]), "--drafters",
               d["spm"].name, "--algorithms", "slem,auto", "--sweep-draft-tokens", "2,3", "--prompts-file", str(f),
               "--min-chars", "0", "--num-prompts", "3", "--max-new-tokens", "10", "--temperature", "1.0",
               "--seed", str(seed), "--no-hf", "--threads", "1", "--json-out", str(out)]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = json.loads(out.read_text())["results"]
        assert {r["config"] for r in rows} == {"target alone", "slem k=2", "slem k=3", "auto"}
        for r in rows:
            assert len(r["per_prompt"]) == 3 and sum(t for t, _ in r["per_prompt"]) == r["new_tokens"] == 30
            assert sum(s for _, s in r["per_prompt"]) == pytest.approx(r["seconds"], abs=1e-3)
        files.append(str(out))
    bad = subprocess.run(cmd[:cmd.index("--drafters") + 1] + ["drafter-nosuch"] + cmd[cmd.index("--algorithms"):],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "drafter directory not found: drafter-nosuch" in bad.stderr
    s = subprocess.run([sys.executable, str(ROOT / "scripts" / "auto_summary.py"), *files], capture_output=True,
                       text=True, timeout=60)
    assert s.returncode == 0, s.stderr
    line = next(l for l in s.stdout.splitlines() if "drafter-spm" in l)
    assert line.startswith("T=1") and "(s0)" in line and "(s1)" in line
    lo, hi = (float(x) for x in line.split("[", 1)[1].split("]", 1)[0].split(","))
    assert 0 < lo <= hi and float(line.split()[4]) > 0, line


def test_grpcurl_through_reflection(stack):
    binary = needs.grpcurl()  # missing: fails under CI, skips elsewhere
    req = json.dumps({"spec": {"prompt": PROMPT, "maxNewTokens": 8, "algorithm": "ALGORITHM_NONE"}})
    p = subprocess.run([binary, "-plaintext", "-d", req, stack["gateway"], "crossdraft.v1.GatewayService/GenerateUnary"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    end = out["end"]  # grpcurl prints the .proto's field names
    assert end["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS") and out["session_id"], out
    assert end["algorithm"] == "ALGORITHM_NONE" and out["text"]
