"""Prometheus metrics of the verifier and drafter services (`--metrics-port`, crossdraft/serving/metrics.py).

A verifier and a drafter run as separate processes (test_services' helpers), each with its metrics
endpoint on a free port; one generation through the drafter must move the counters of both by
exactly the generation's statistics (rounds, draft and accepted tokens, accepted by position,
generated tokens), every latency histogram by one observation per round, and the sessions counters
by one. A bad request is counted under its status code. Without processes: two roles share one
registry without clashing, and draft positions are capped."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_services import GREEDY, PROMPTS, Servers, VerifyStream, drafter_stub, free_port, save_model

from crossdraft import wire
from crossdraft.protocol import TOKENS, Proposal
from crossdraft.serving.metrics import MAX_POSITION, ServiceMetrics, position_label
from crossdraft.v1 import drafter_pb2
from drafter_service.client import run_session


@pytest.fixture(scope="module")
def metered(trained_models, tmp_path_factory):
    """{"verifier", "drafter": gRPC addresses, "verifier_metrics", "drafter_metrics": /metrics URLs}."""
    root = tmp_path_factory.mktemp("metrics")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    servers = Servers(root)
    try:
        out = {}
        for name, role, model in (("verifier", "verifier", target), ("drafter", "drafter", spm)):
            mport = free_port()
            out[name] = servers.start(name, role, model, extra=("--metrics-port", str(mport)))
            out[f"{name}_metrics"] = f"http://127.0.0.1:{mport}/metrics"
        servers.wait_serving({"verifier": out["verifier"], "drafter": out["drafter"]})
        yield out
    finally:
        servers.stop_all()


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels without role): value} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            if not s.name.startswith("crossdraft_"):
                continue
            labels.pop("role", None)
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_until(url: str, before: dict, name: str, want: float, timeout: float = 5.0) -> dict:
    """The verifier ends its side of the stream just after the drafter has the last verdict: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if delta(before, m, name) >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_metrics_match_one_generation(metered):
    vb, db = scrape(metered["verifier_metrics"]), scrape(metered["drafter_metrics"])
    ids, _text, st = run_session(metered["drafter"], metered["verifier"], PROMPTS[0], 24, GREEDY, "slem", timeout=60)
    da = scrape(metered["drafter_metrics"])
    va = scrape_until(metered["verifier_metrics"], vb, "crossdraft_sessions_finished_total", 1)
    rounds = st["rounds"]
    assert rounds > 0 and st["new_tokens"] == len(ids) == 24
    for before, after in ((vb, va), (db, da)):
        assert delta(before, after, "crossdraft_sessions_started_total") == 1
        assert delta(before, after, "crossdraft_sessions_finished_total") == 1
        assert value(after, "crossdraft_sessions_active") == 0
        assert delta(before, after, "crossdraft_rounds_total") == rounds
        assert delta(before, after, "crossdraft_draft_tokens_total") == st["draft_tokens"]
        assert delta(before, after, "crossdraft_accepted_tokens_total") == st["accepted_tokens"]
        assert delta(before, after, "crossdraft_generated_tokens_total") == len(ids)
        by_pos = st["accepted_by_position"]
        for i in range(1, MAX_POSITION + 1):
            want = sum(by_pos[i - 1:]) if i == MAX_POSITION else (by_pos[i - 1] if i <= len(by_pos) else 0)
            got = delta(before, after, "crossdraft_accepted_tokens_by_position_total", position=position_label(i))
            assert got == want, (i, by_pos)
        assert value(after, "crossdraft_last_session_tokens_per_second") > 0
    for name in ("crossdraft_round_draft_seconds_count", "crossdraft_round_network_seconds_count",
                 "crossdraft_round_seconds_count"):
        assert delta(db, da, name) == rounds, name
    assert delta(vb, va, "crossdraft_round_verify_seconds_count") == rounds
    # the histograms' sums are the session's own timings
    assert delta(db, da, "crossdraft_round_draft_seconds_sum") == pytest.approx(st["profile"]["draft_s"], rel=1e-6)
    assert delta(vb, va, "crossdraft_round_verify_seconds_sum") == pytest.approx(st["profile"]["verify_s"], rel=1e-6)
    assert delta(db, da, "crossdraft_round_network_seconds_sum") == pytest.approx(st["profile"]["network_s"],
                                                                                   rel=1e-6, abs=1e-6)
    assert delta(db, da, "crossdraft_round_seconds_bucket", le="+Inf") == rounds
    # the scheduler's passes: the verifier's prefill and one per round; the drafter's drafting steps
    assert delta(vb, va, "crossdraft_batch_sequences_count") == rounds + 1
    assert delta(vb, va, "crossdraft_batch_sequences_sum") == rounds + 1  # one session: one sequence a pass
    assert delta(vb, va, "crossdraft_queue_wait_seconds_count") == rounds + 1
    assert delta(db, da, "crossdraft_batch_tokens_sum") >= st["drafted"]
    for after in (va, da):  # the session's KV reservation is given back; the budget is reported
        assert value(after, "crossdraft_kv_reserved_bytes") == 0 and value(after, "crossdraft_kv_budget_bytes") > 0


def test_errors_counted_by_status_code(metered):
    before = scrape(metered["drafter_metrics"])
    req = drafter_pb2.RunSessionRequest(verifier_address=metered["verifier"], max_new_tokens=16)  # empty prompt
    with pytest.raises(grpc.RpcError) as e:
        list(drafter_stub(metered["drafter"]).RunSession(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(metered["drafter_metrics"])
    assert delta(before, after, "crossdraft_errors_total", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "crossdraft_sessions_started_total") == 0


def test_interleaved_sessions_keep_their_caches(metered):
    """Two Verify streams on the verifier, their rounds alternating: each session keeps its own KV
    cache (reserved under the budget while it is open, and parked after: GetInfo and the gauge say so),
    so nothing is ever rebuilt, and each verdict is what the session alone would get."""
    from crossdraft.v1 import verifier_pb2, verifier_pb2_grpc

    info = verifier_pb2_grpc.VerifierServiceStub(grpc.insecure_channel(metered["verifier"])).GetInfo
    before = scrape(metered["verifier_metrics"])
    streams, seqs, outs = [], [], [[], []]
    try:
        for i in range(2):  # open, then one round
            st = VerifyStream(metered["verifier"], wire.SessionStart(f"kv-{i}", [5 + i, 6, 7], [], GREEDY, 8, "none"))
            streams.append(st)
            v = st.send(Proposal(seq=3, kind=TOKENS))
            outs[i] += v.ids
            seqs.append(3 + len(v.ids))
        usage = info(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=10).cache
        assert usage.reserved_bytes > 0 and usage.allocated_bytes > 0 and usage.budget_bytes >= usage.reserved_bytes
        assert value(scrape(metered["verifier_metrics"]), "crossdraft_kv_reserved_bytes") == usage.reserved_bytes
        for _ in range(3):  # alternate
            for i, st in enumerate(streams):
                v = st.send(Proposal(seq=seqs[i], kind=TOKENS))
                outs[i] += v.ids
                seqs[i] += len(v.ids)
    finally:
        for st in streams:
            st.close()
    after = scrape_until(metered["verifier_metrics"], before, "crossdraft_sessions_finished_total", 2)
    assert delta(before, after, "crossdraft_rounds_total") == 8
    assert delta(before, after, "crossdraft_sessions_finished_total") == 2
    # ended unfinished: parked for a next stream of theirs, their room still reserved (serving.md)
    assert value(after, "crossdraft_sessions_active") == 0
    assert value(after, "crossdraft_kv_reserved_bytes") == usage.reserved_bytes
    parked = info(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=10).cache
    assert parked.reserved_bytes == usage.reserved_bytes and parked.parked_sessions >= 2
    for i in range(2):  # each as alone: a fresh stream of the same session, run straight through
        st = VerifyStream(metered["verifier"], wire.SessionStart(f"alone-{i}", [5 + i, 6, 7], [], GREEDY, 8, "none"))
        try:
            seq, alone = 3, []
            for _ in range(4):
                v = st.send(Proposal(seq=seq, kind=TOKENS))
                alone += v.ids
                seq += len(v.ids)
        finally:
            st.close()
        assert alone == outs[i]


def test_roles_share_one_registry_and_positions_are_capped():
    reg = CollectorRegistry()
    v, d = ServiceMetrics("verifier", reg), ServiceMetrics("drafter", reg)  # the embedded mode: no clash
    d.round(candidates=20, accepted=18, new_tokens=19, draft_ns=2_000_000, network_ns=-5, round_ns=3_000_000)
    v.round(candidates=20, accepted=18, new_tokens=19, verify_ns=4_000_000)
    v.error(grpc.StatusCode.NOT_FOUND)
    get = reg.get_sample_value
    assert get("crossdraft_rounds_total", {"role": "drafter"}) == 1 == get("crossdraft_rounds_total", {"role": "verifier"})
    assert get("crossdraft_accepted_tokens_by_position_total", {"role": "drafter", "position": "15"}) == 1
    assert get("crossdraft_accepted_tokens_by_position_total", {"role": "drafter", "position": f"{MAX_POSITION}+"}) == 3
    assert get("crossdraft_round_network_seconds_sum", {"role": "drafter"}) == 0  # clamped
    assert get("crossdraft_round_verify_seconds_count", {"role": "verifier"}) == 1
    assert get("crossdraft_errors_total", {"role": "verifier", "code": "NOT_FOUND"}) == 1
    assert ServiceMetrics("drafter").registry is not reg  # a service on its own gets its own registry
