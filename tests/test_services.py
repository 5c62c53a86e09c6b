"""The drafter and verifier services over real gRPC, each a separate process on loopback.

Tiny trained Llama models (conftest's `trained_models`) are saved to a temporary directory and served
by `python -m crossdraft.cli serve ...`: one verifier (byte-level BPE target), one drafter with the
target's tokenizer and one with a SentencePiece-style tokenizer. Outputs through drafter -> verifier
must be identical to the in-process engine's on the same saved models, greedy and sampled; bad
requests get the right status code; the verifier's Verify stream answers a stale proposal with an
empty verdict and keeps interleaved sessions apart (KV cache rebuilt after a miss)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import helpers
import needs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossdraft import wire
from crossdraft.engine import Engine
from crossdraft.local_cluster import free_port  # the test modules take it from here
from crossdraft.protocol import TEXT, TOKENS, Proposal
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from crossdraft.vocab import Vocab
from crossdraft.wire import session_request
from drafter_service.client import run_session, stream_session

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120
PROMPTS = ["class Parser:\n    def get_value(self", "# return the first value\nresult = "]
GREEDY = SamplingParams()
SAMPLING = {"T=1": SamplingParams(temperature=1.0, seed=7),
            "top-k/top-p": SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)}


class Servers:
    """Service processes started together, waited for together, stopped with SIGTERM (then killed)."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, {}

    def start(self, name: str, role: str, model: Path, extra=()) -> str:
        port = free_port()
        log = open(self.log_dir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "crossdraft.cli", "serve", role, "--model", str(model), "--port", str(port),
               "--threads", "1", "--grace", "2", *extra]
        self.procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        return f"127.0.0.1:{port}"

    def log_of(self, name: str) -> str:
        """The end of a process's log, for a failure's message (`full_log` to check what it says)."""
        return self.full_log(name)[-3000:]

    def full_log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def wait_serving(self, addresses: dict) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, address in addresses.items():
            with grpc.insecure_channel(address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    proc = self.procs[name][0]
                    if proc.poll() is not None:
                        pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log_of(name)}")
                    try:
                        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                                health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(f"{name} not SERVING after {START_TIMEOUT_S} s:\n{self.log_of(name)}")
                    time.sleep(0.2)

    def stop(self, name: str, timeout: float = 15) -> int:
        proc, log = self.procs.pop(name)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def save_model(model, tok_name: str, d: Path) -> Path:
    model.save_pretrained(d)
    helpers.TOKENIZERS[tok_name]().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def services(trained_models, tmp_path_factory):
    """{"dirs": {target, same, spm}, "verifier", "same", "spm", "ahead-same", "ahead-spm": addresses (the last
    two: drafters with --draft-ahead, without alternatives: a round with them sends nothing ahead), "servers":
    Servers}."""
    root = tmp_path_factory.mktemp("services")
    dirs = {"target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "same": save_model(trained_models["bpe_small"], "bpe", root / "drafter-same"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm")}
    servers = Servers(root)
    ahead_metrics, same_metrics = free_port(), free_port()
    try:
        addr = {"verifier": servers.start("verifier", "verifier", dirs["target"]),
                "same": servers.start("same", "drafter", dirs["same"], ["--metrics-port", str(same_metrics)]),
                "spm": servers.start("spm", "drafter", dirs["spm"]),
                "ahead-same": servers.start("ahead-same", "drafter", dirs["same"],
                                            ["--draft-ahead", "--draft-alternatives", "0", "--metrics-port",
                                             str(ahead_metrics)]),
                "ahead-spm": servers.start("ahead-spm", "drafter", dirs["spm"],
                                           ["--draft-ahead", "--draft-alternatives", "0"])}
        servers.wait_serving(addr)
        yield dict(addr, dirs=dirs, servers=servers, ahead_metrics=f"http://127.0.0.1:{ahead_metrics}/metrics",
                   same_metrics=f"http://127.0.0.1:{same_metrics}/metrics")
    finally:
        servers.stop_all()


@pytest.fixture(scope="module")
def engines(services):
    """The in-process engine on the same saved models (float32, as the services load them)."""
    d = services["dirs"]
    same = Engine.load(str(d["target"]), str(d["same"]), device="cpu")
    spm = Engine.load(str(d["target"]), str(d["spm"]), device="cpu")
    without = {k: Engine.load(str(d["target"]), str(d[k]), device="cpu", alternatives=0) for k in ("same", "spm")}
    return {"same": same, "spm": spm, "ahead-same": without["same"], "ahead-spm": without["spm"]}


def verifier_stub(address):
    return verifier_pb2_grpc.VerifierServiceStub(grpc.insecure_channel(address))


def drafter_stub(address):
    return drafter_pb2_grpc.DrafterServiceStub(grpc.insecure_channel(address))


def assert_same_as_in_process(services, engines, drafter, prompt, n, params, algorithm, draft_tokens=None):
    ref = engines[drafter].generate(prompt, n, params, algorithm, draft_tokens)
    ids, text, stats = run_session(services[drafter], services["verifier"], prompt, n, params, algorithm,
                                   draft_tokens, timeout=60)
    assert ids == ref.ids and text == ref.text
    assert stats["finish_reason"] == ref.finish_reason
    if algorithm == "auto" or draft_tokens is None:
        # each side measures on its own (auto's arms, and the load cap on an adaptive draft length
        # follow measured pass costs): the same output, not necessarily the same rounds
        return ref
    assert stats["algorithm"] == ref.algorithm
    # the same loop on the same numbers: the rounds themselves are identical too
    assert (stats["rounds"], stats["draft_tokens"], stats["accepted_tokens"], stats["drafted"],
            stats["accepted_by_position"], stats["new_tokens"]) == \
           (ref.rounds, ref.draft_tokens, ref.accepted_tokens, ref.drafted, ref.accepted_by_position, ref.new_tokens)
    return ref


# --- health, info, tokenizer, reflection ---------------------------------------------------------

def test_health_serving(services):
    for name in ("verifier", "same", "spm"):
        with grpc.insecure_channel(services[name]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            service = "crossdraft.v1.VerifierService" if name == "verifier" else "crossdraft.v1.DrafterService"
            for s in ("", service):
                assert stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING


def test_get_info(services):
    d = services["dirs"]
    info = verifier_stub(services["verifier"]).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5)
    tv = Vocab.load(str(d["target"]))
    assert info.model_id == "target" and info.tokenizer_fingerprint == tv.fingerprint()
    assert info.vocab_size == len(tv) and info.max_context == 256 and list(info.eos_ids) == sorted(tv.eos_ids)
    assert set(info.algorithms) == {common_pb2.ALGORITHM_SAME, common_pb2.ALGORITHM_TLI, common_pb2.ALGORITHM_SLEM,
                                    common_pb2.ALGORITHM_SLRS, common_pb2.ALGORITHM_NONE}
    assert info.device == "cpu" and info.dtype == "float32" and info.max_sessions == 16
    for name, tok in (("same", "target"), ("spm", "spm")):
        di = drafter_stub(services[name]).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5)
        assert di.tokenizer_fingerprint == Vocab.load(str(d[tok])).fingerprint()
        assert di.max_context == 256 and di.active_sessions == 0
        assert set(di.algorithms) == {common_pb2.ALGORITHM_SAME, common_pb2.ALGORITHM_TLI, common_pb2.ALGORITHM_SLEM,
                                      common_pb2.ALGORITHM_SLRS}
    assert drafter_stub(services["same"]).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest()).model_id == "drafter-same"


def test_get_tokenizer(services, tmp_path):
    files = {}
    for chunk in verifier_stub(services["verifier"]).GetTokenizer(verifier_pb2.GetTokenizerRequest(), timeout=10):
        buf = files.setdefault(chunk.file_name, bytearray())
        assert chunk.offset == len(buf)
        buf += chunk.data
        assert chunk.size >= len(buf)
    assert "tokenizer.json" in files
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert Vocab.load(str(tmp_path)).fingerprint() == Vocab.load(str(services["dirs"]["target"])).fingerprint()


def test_reflection_lists_the_services(services):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(services["verifier"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5))
        names = {s.name for s in resp.list_services_response.service}
    assert {"crossdraft.v1.VerifierService", "grpc.health.v1.Health"} <= names


# --- identical outputs -------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,drafter", [("same", "same"), ("tli", "spm"), ("slem", "spm"), ("none", "spm"),
                                               ("auto", "same"), ("auto", "spm")])
def test_greedy_identical_to_in_process(services, engines, algorithm, drafter):
    for prompt in PROMPTS:
        ref = assert_same_as_in_process(services, engines, drafter, prompt, 32, GREEDY, algorithm)
        if algorithm != "none":
            assert ref.accepted_tokens > 0
    assert_same_as_in_process(services, engines, drafter, PROMPTS[0], 24, GREEDY, algorithm, draft_tokens=3)


def test_alternatives_go_over_the_wire(services, engines):
    """`--draft-alternatives` (the default, 2): at a fixed draft length the same rounds as in process, the
    rounds that took an alternative among them, counted by the drafter as in process."""
    from test_metrics import scrape, value  # (test_metrics imports this module)
    before = value(scrape(services["same_metrics"]), "crossdraft_alternative_rounds_total")
    taken = 0
    for prompt in PROMPTS + ["x = 1", "import os\n\n\nclass Cache:\n    def __init__(self):\n        self."]:
        for k in (1, 3):
            taken += assert_same_as_in_process(services, engines, "same", prompt, 32, GREEDY, "same", k).alternatives
    assert taken > 0
    assert value(scrape(services["same_metrics"]), "crossdraft_alternative_rounds_total") - before == taken


@pytest.mark.parametrize("algorithm,drafter", [("same", "ahead-same"), ("tli", "ahead-spm"), ("slem", "ahead-spm")])
def test_drafting_ahead_changes_nothing_but_time(services, engines, algorithm, drafter):
    """`serve drafter --draft-ahead` (crossdraft/rounds.py): the same output as in process, and at a fixed
    draft length the same rounds, round for round; with same and tli some proposals were sent ahead of the
    verdict before them (with same, some on a guess that held and some answered stale by the verifier)."""
    for prompt in PROMPTS:
        assert_same_as_in_process(services, engines, drafter, prompt, 32, GREEDY, algorithm)
        assert_same_as_in_process(services, engines, drafter, prompt, 32, GREEDY, algorithm, draft_tokens=3)
    log, deadline = services["servers"].log_dir / f"{drafter}.log", time.monotonic() + 10
    while True:  # (a session's closing line comes just after its last delta)
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if f": {algorithm}, " in ln]
        if len(lines) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ahead = [[int(w) for w in re.findall(r"(\d+) (?:of \d+ tokens drafted ahead|rounds sent ahead|of them stale)", ln)]
             for ln in lines]
    used, sent, stale = (sum(a[i] for a in ahead) for i in range(3))
    assert len(ahead) == 4, lines
    if algorithm == "same":
        assert used > 0 and sent > stale > 0, lines
        from test_metrics import scrape, value  # (test_metrics imports this module)
        m = scrape(services["ahead_metrics"])  # the drafter's metrics count the same
        assert (value(m, "crossdraft_drafted_ahead_tokens_total"),
                value(m, "crossdraft_sent_ahead_rounds_total", outcome="held"),
                value(m, "crossdraft_sent_ahead_rounds_total", outcome="stale")) == (used, sent - stale, stale)
    elif algorithm == "tli":  # (this pair's guesses rarely hold in so few tokens: tests/test_draft_ahead.py)
        assert sent > 0, lines
    else:  # slem's guessed text has no known target length: it is drafted ahead, never sent
        assert sent == 0, lines


@pytest.mark.parametrize("params", SAMPLING, ids=list(SAMPLING))
@pytest.mark.parametrize("algorithm", ["tli", "slem"])
def test_sampled_identical_to_in_process(services, engines, algorithm, params):
    for prompt in PROMPTS:
        assert_same_as_in_process(services, engines, "spm", prompt, 32, SAMPLING[params], algorithm)


def test_sampled_same_identical_to_in_process(services, engines):
    assert_same_as_in_process(services, engines, "same", PROMPTS[1], 32, SAMPLING["T=1"], "same")


def test_stream_deltas_and_stats(services):
    req = session_request(services["verifier"], PROMPTS[0], 20, GREEDY, "slem")
    msgs = list(stream_session(services["spm"], req, timeout=30))
    assert msgs[-1].finished and not any(m.finished for m in msgs[:-1])
    assert msgs[0].why == "asked for" and all(m.algorithm == common_pb2.ALGORITHM_SLEM for m in msgs)
    offsets = [m.token_offset for m in msgs]
    assert offsets == sorted(offsets) and offsets[0] == 0 and all(m.ids for m in msgs)
    st = msgs[-1].stats
    assert st.new_tokens == 20 and st.rounds >= len(msgs) and st.verify_ns > 0 and st.draft_ns > 0 and st.total_ns > 0


# --- errors ------------------------------------------------------------------------------------

def run_raw(services, drafter, **fields):
    req = drafter_pb2.RunSessionRequest(**{"verifier_address": services["verifier"], "max_new_tokens": 16, **fields})
    with pytest.raises(grpc.RpcError) as e:
        list(drafter_stub(services[drafter]).RunSession(req, timeout=30))
    msg = e.value.details()
    assert msg and "\n" not in msg
    return e.value.code(), msg


@pytest.mark.parametrize("case,drafter,fields,code,words", [
    ("empty prompt", "spm", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("unknown algorithm", "spm", dict(prompt="x = 1", algorithm=99), grpc.StatusCode.INVALID_ARGUMENT, "algorithm"),
    ("same, different tokenizers", "spm", dict(prompt="x = 1", algorithm=common_pb2.ALGORITHM_SAME),
     grpc.StatusCode.FAILED_PRECONDITION, "tokenizer"),
    ("max_new_tokens too large", "spm", dict(prompt="x = 1", max_new_tokens=100_000),
     grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("max_new_tokens 0", "same", dict(prompt="x = 1", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("bad temperature", "same", dict(prompt="x = 1", params=common_pb2.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("bad session id", "same", dict(prompt="x = 1", session_id="a b"), grpc.StatusCode.INVALID_ARGUMENT, "session id"),
    ("draft tokens", "same", dict(prompt="x = 1", draft_tokens=65), grpc.StatusCode.INVALID_ARGUMENT, "draft tokens"),
    ("prompt id out of range", "same", dict(prompt_ids=[10**6]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
])
def test_bad_requests(services, case, drafter, fields, code, words):
    got, msg = run_raw(services, drafter, **fields)
    assert got == code, msg
    assert words in msg.lower()


def test_unreachable_verifier_is_unavailable(services):
    req = drafter_pb2.RunSessionRequest(verifier_address=f"127.0.0.1:{free_port()}", prompt="x = 1", max_new_tokens=4)
    with pytest.raises(grpc.RpcError) as e:
        list(drafter_stub(services["same"]).RunSession(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "verifier" in e.value.details()


# --- the Verify stream, driven directly --------------------------------------------------------

class VerifyStream:
    """A Verify stream driven request by request."""

    def __init__(self, address, start: wire.SessionStart):
        import queue

        self.q = queue.SimpleQueue()
        self.q.put(verifier_pb2.VerifyRequest(start=wire.start_to_proto(start)))

        def requests():
            while (m := self.q.get()) is not None:
                yield m

        self.call = verifier_stub(address).Verify(requests(), timeout=30)

    def send(self, proposal: Proposal):
        self.q.put(verifier_pb2.VerifyRequest(proposal=wire.proposal_to_proto(proposal)))
        return wire.verdict_from_proto(next(self.call).verdict)

    def close(self):
        self.q.put(None)
        self.call.cancel()

    def end(self) -> list:
        """Half-close, and read the stream to its end (the verifier has closed its side by then)."""
        self.q.put(None)
        return list(self.call)


def test_stale_proposal_gets_an_empty_verdict(services):
    tv = Vocab.load(str(services["dirs"]["target"]))
    prompt_ids = tv.encode_prompt(PROMPTS[0])
    n = len(prompt_ids)
    s = VerifyStream(services["verifier"], wire.SessionStart("stale-1", prompt_ids, [], GREEDY, 8, "same"))
    try:
        v = s.send(Proposal(seq=n + 3, kind=TOKENS, target_ids=[1, 2]))
        assert (v.seq, v.ids, v.text, v.candidates, v.accepted, v.finished) == (n, [], b"", 0, 0, False)
        v = s.send(Proposal(seq=n, kind=TOKENS))  # the target alone: one token
        assert v.seq == n and len(v.ids) == 1
        v2 = s.send(Proposal(seq=n, kind=TEXT, text=b"abc"))  # drafted before that token: stale now
        assert (v2.seq, v2.ids, v2.candidates) == (n + 1, [], 0)
        v3 = s.send(Proposal(seq=n + 1, kind=TOKENS))
        assert v3.seq == n + 1 and len(v3.ids) == 1
        last = v3.ids[0]  # drafted ahead (Proposal.after): stale unless the last committed id is the one guessed
        v4 = s.send(Proposal(seq=n + 2, kind=TOKENS, target_ids=[1], after=(last + 1) % len(tv)))
        assert (v4.seq, v4.ids, v4.candidates) == (n + 2, [], 0)
        v5 = s.send(Proposal(seq=n + 2, kind=TOKENS, target_ids=[1], after=last))
        assert v5.seq == n + 2 and v5.candidates == 1 and len(v5.ids) >= 1
    finally:
        s.close()


def test_a_stream_that_ends_unfinished_leaves_its_session_parked_for_the_next(services, engines):
    """A Verify stream that ends before its session finished leaves the session's state parked in the
    verifier: the next stream of it, from the committed ids, takes it up with no prefill (no forward pass
    before its first round) and goes on as the target alone. A stream whose ids do not continue what the
    verifier has (one committed id changed) opens the session anew, with a prefill pass: the negative
    control, which also shows that the first case's missing pass is the prefill."""
    tv = engines["same"].target_vocab
    ref = engines["same"].generate(PROMPTS[1], 12, GREEDY, "none").ids
    prompt_ids, stub = tv.encode_prompt(PROMPTS[1]), verifier_stub(services["verifier"])
    passes = lambda: stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5).cache.passes  # noqa: E731

    def steps(stream, got: list, n: int) -> list:
        for _ in range(n):
            got = got + stream.send(Proposal(seq=len(prompt_ids) + len(got), kind=TOKENS)).ids
        return got

    s = VerifyStream(services["verifier"], wire.SessionStart("park-1", prompt_ids, [], GREEDY, 12, "same"))
    got = steps(s, [], 5)
    assert s.end() == []
    before = passes()
    s = VerifyStream(services["verifier"], wire.SessionStart("park-1", prompt_ids, got[:4], GREEDY, 12, "same"))
    got = steps(s, got[:4], 1)
    assert passes() - before == 1  # the round's own pass: no prefill
    got = steps(s, got, 12 - len(got))
    s.close()
    assert got == ref

    s = VerifyStream(services["verifier"], wire.SessionStart("park-2", prompt_ids, [], GREEDY, 12, "same"))
    got = steps(s, [], 5)
    assert s.end() == []
    before = passes()
    other = [(got[0] + 1) % len(tv)] + got[1:4]
    s = VerifyStream(services["verifier"], wire.SessionStart("park-2", prompt_ids, other, GREEDY, 12, "same"))
    steps(s, other, 1)
    s.close()
    assert passes() - before == 2  # a prefill, then the round


def test_verify_stream_errors(services):
    stub = verifier_stub(services["verifier"])
    prop = verifier_pb2.VerifyRequest(proposal=verifier_pb2.Proposal(seq=1, kind=verifier_pb2.PROPOSAL_KIND_TOKENS))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Verify(iter([prop]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start" in e.value.details()
    start = verifier_pb2.VerifyRequest(start=verifier_pb2.VerifyStart(
        session_id="e1", prompt_ids=[1, 2], max_new_tokens=4, algorithm=common_pb2.ALGORITHM_SAME))
    bad = verifier_pb2.VerifyRequest(proposal=verifier_pb2.Proposal(seq=2, kind=verifier_pb2.PROPOSAL_KIND_TOKENS,
                                                                    target_ids=[1] * 65))
    # a malformed proposal is ignored, not fatal: the round is the target's own step
    (out,) = list(stub.Verify(iter([start, bad]), timeout=10))
    assert out.verdict.candidates == 0 and len(out.verdict.ids) == 1


def test_hostile_proposals_over_grpc_change_nothing(services, engines):
    """A drafter that sends garbage on a real Verify stream (ids out of range, too many candidates,
    NaN, negative and unnormalised q, oversized text, wrong seq, a q that does not match its ids)
    among honest-looking ones: every round is answered, the session completes, and what it commits is
    exactly the target alone's output (greedy and sampled)."""
    import math

    tv = engines["same"].target_vocab
    n_vocab = len(tv)
    for params in (GREEDY, SamplingParams(temperature=1.0, seed=9)):
        ref = engines["same"].generate(PROMPTS[0], 24, params, "none").ids
        prompt_ids = tv.encode_prompt(PROMPTS[0])
        s = VerifyStream(services["verifier"], wire.SessionStart(f"hostile-{params.temperature}", prompt_ids, [],
                                                                params, 24, "same"))
        got, seq, i = [], len(prompt_ids), 0
        try:
            while len(got) < 24:
                P = verifier_pb2.Proposal
                kind = verifier_pb2.PROPOSAL_KIND_TOKENS
                garbage = [
                    P(seq=seq, kind=kind, target_ids=[n_vocab + 5]),
                    P(seq=seq, kind=kind, target_ids=[1] * 65),
                    P(seq=seq, kind=kind, target_ids=[1], q_rows=[verifier_pb2.SparseDistribution(ids=[1], probs=[math.nan])]),
                    P(seq=seq, kind=kind, target_ids=[1], q_rows=[verifier_pb2.SparseDistribution(ids=[1, 2], probs=[-0.5, 1.5])]),
                    P(seq=seq, kind=kind, target_ids=[1], q_rows=[verifier_pb2.SparseDistribution(ids=[1], probs=[0.3])]),
                    P(seq=seq, kind=verifier_pb2.PROPOSAL_KIND_TEXT, text=b"x" * (1 << 20)),
                    P(seq=seq + 7, kind=kind, target_ids=[1, 2, 3]),
                    P(seq=seq, kind=kind, target_ids=[2], q_rows=[verifier_pb2.SparseDistribution(ids=[3], probs=[1.0])]),
                ]
                s.q.put(verifier_pb2.VerifyRequest(proposal=garbage[i % len(garbage)]))
                v = wire.verdict_from_proto(next(s.call).verdict)
                got += v.ids
                seq += len(v.ids)
                i += 1
                if v.finished:
                    break
        finally:
            s.close()
        assert got == ref[:len(got)] and len(got) == len(ref)


def test_interleaved_sessions_rebuild_the_kv_cache(services, engines):
    """Two sessions on one verifier, rounds alternating (each session keeps its own KV cache while it is
    open, nothing is rebuilt: tests/test_metrics.py counts it): each output is still the target alone's."""
    tv = engines["same"].target_vocab
    refs = [engines["same"].generate(p, 12, GREEDY, "none").ids for p in PROMPTS]
    streams = [VerifyStream(services["verifier"], wire.SessionStart(f"mix-{i}", tv.encode_prompt(p), [], GREEDY, 12, "none"))
               for i, p in enumerate(PROMPTS)]
    try:
        seqs = [len(tv.encode_prompt(p)) for p in PROMPTS]
        got = [[], []]
        done = [False, False]
        while not all(done):
            for i, s in enumerate(streams):
                if done[i]:
                    continue
                v = s.send(Proposal(seq=seqs[i], kind=TOKENS))
                got[i] += v.ids
                seqs[i] += len(v.ids)
                done[i] = v.finished
        assert got == refs
    finally:
        for s in streams:
            s.close()


def test_sigterm_stops_gracefully(services):
    """Last in this module: a drafter given SIGTERM exits 0."""
    assert services["servers"].stop("same") == 0


# --- the zoo -----------------------------------------------------------------------------------

def test_zoo_slem_greedy_identical(tmp_path):
    import json

    ZOO = needs.zoo("target-bpe8k", "drafter-spm4k")  # noqa: N806 - missing: fails under CI, skips elsewhere
    servers = Servers(tmp_path)
    try:
        addr = {"verifier": servers.start("verifier", "verifier", ZOO / "target-bpe8k"),
                "drafter": servers.start("drafter", "drafter", ZOO / "drafter-spm4k")}
        engine = Engine.load(str(ZOO / "target-bpe8k"), str(ZOO / "drafter-spm4k"), device="cpu")
        servers.wait_serving(addr)
        prompts = []
        with open(ZOO / "dev-prompts.jsonl") as f:
            for line in f:
                text = json.loads(line)["text"]
                if len(text) >= 300:
                    prompts.append(text[:400])
                if len(prompts) == 2:
                    break
        for prompt in prompts:
            ref = engine.generate(prompt, 48, GREEDY, "slem")
            ids, text, stats = run_session(addr["drafter"], addr["verifier"], prompt, 48, GREEDY, "slem", timeout=60)
            assert ids == ref.ids and text == ref.text and stats["algorithm"] == "slem"
            assert stats["accepted_tokens"] > 0
    finally:
        servers.stop_all()
