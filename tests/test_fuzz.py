"""Bad input at the gateway (issue 6), property-based: whatever a client sends, the gateway answers with
a status code and a message (or a result), never crashes or hangs, and a refused request writes nothing
to Redis. Real processes: redis-server, a verifier, a drafter, the gateway; hypothesis draws the
requests. Raw bytes that are not gRPC at all, and gRPC frames whose payload is not a message, leave
the gateway serving."""
from __future__ import annotations

import math
import socket

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossdraft.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from test_faults import Cluster
from test_services import save_model

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def gw(trained_models, tmp_path_factory, redis_server):
    import redis

    root = tmp_path_factory.mktemp("fuzz")
    target = save_model(trained_models["bpe"], "bpe", root / "target")
    spm = save_model(trained_models["spm"], "spm", root / "drafter-spm")
    c = Cluster(root)
    try:
        v = c.start("verifier", ["verifier", "--model", str(target), "--threads", "1"])
        d = c.start("d1", ["drafter", "--model", str(spm), "--threads", "1"])
        c.wait_serving("verifier", "d1")
        c.start("gateway", ["gateway", "--redis", redis_server, "--drafters", d, "--verifiers", v,
                            "--max-prompt-bytes", "4000", "--failover-seconds", "1"])
        c.wait_serving("gateway")
        r = redis.Redis.from_url(redis_server)
        yield c, gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(c.address("gateway"))), r
        r.close()
    finally:
        c.stop_all()


def keys(r) -> set:
    return set(r.keys("crossdraft:*"))


def check_status(e: grpc.RpcError, r, before: set) -> None:
    """A failed call: a status a client can act on, a one-line message, and nothing written if refused."""
    assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED), \
        (e.code(), e.details())
    assert e.details() and "\n" not in e.details() and "Traceback" not in e.details()
    if e.code() in REFUSALS:
        assert keys(r) == before, f"{e.code()} for a request that wrote to Redis"


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf]))
specs = st.builds(
    gateway_pb2.GenerationSpec,
    prompt=st.one_of(st.text(max_size=60), st.sampled_from(["", "def f(", "x" * 5000, "\x00\ufffd\u202e"])),
    max_new_tokens=st.one_of(st.integers(0, 24), st.sampled_from([2**32 - 1, 100_001, 10**6])),
    params=st.builds(common_pb2.SamplingParams, temperature=floats, top_k=st.integers(0, 2**32 - 1),
                     top_p=floats, seed=st.integers(0, 2**64 - 1)),
    algorithm=st.integers(0, 9),  # beyond the enum too: proto3 keeps unknown values
    draft_tokens=st.one_of(st.integers(0, 70), st.just(2**32 - 1)),
    model=st.sampled_from(["", "target", "no-such-model"]),
    drafter=st.sampled_from(["", "drafter-spm", "no-such-drafter", "x" * 300]),
)
session_ids = st.one_of(st.just(""), st.text(max_size=12), st.sampled_from(["ok-id-1", "bad id{}", "a" * 300]))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=specs, session_id=session_ids)
def test_any_request_gets_a_status_and_a_refusal_writes_nothing(gw, spec, session_id):
    _, stub, r = gw
    before = keys(r)
    try:
        out = stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec, session_id=session_id), timeout=30)
    except grpc.RpcError as e:
        check_status(e, r, before)
    else:
        assert out.session_id and out.end.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


metadata = st.lists(st.tuples(st.sampled_from(["authorization", "x-api-key", "user-agent-x", "grpc-x"]),
                               st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)), max_size=3)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=specs, session_id=session_ids, md=metadata)
def test_any_streaming_request_and_metadata_get_a_status(gw, spec, session_id, md):
    """The streaming Generate with the same requests, plus arbitrary metadata (an open gateway ignores
    an `authorization` it does not need): events end with the generation's end, or a status."""
    _, stub, r = gw
    before = keys(r)
    try:
        events = list(stub.Generate(gateway_pb2.GenerateRequest(spec=spec, session_id=session_id), timeout=30,
                                    metadata=md))
    except grpc.RpcError as e:
        check_status(e, r, before)
    else:
        assert events and events[-1].WhichOneof("event") == "end" and events[-1].session_id


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(session_id=session_ids, offset=st.integers(0, 2**32 - 1))
def test_reading_calls_with_any_session_id(gw, session_id, offset):
    _, stub, r = gw
    before = keys(r)
    for call in (lambda: stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=10),
                 lambda: stub.CancelSession(gateway_pb2.CancelSessionRequest(session_id=session_id), timeout=10),
                 lambda: list(stub.AttachSession(gateway_pb2.AttachSessionRequest(session_id=session_id,
                                                                                  offset=offset), timeout=10))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), e.value.details()
        assert e.value.details()
    assert keys(r) == before


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=1, max_size=4096))
def test_raw_bytes_on_the_port_leave_the_gateway_serving(gw, data):
    cluster, stub, _ = gw
    host, port = cluster.address("gateway").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:  # not HTTP/2 at all
        s.sendall(data)
        s.settimeout(2)
        try:
            s.recv(4096)
        except (socket.timeout, ConnectionError):
            pass
    # a well-formed gRPC call whose payload is not a GenerateUnaryRequest
    raw = grpc.insecure_channel(cluster.address("gateway")).unary_unary(
        "/crossdraft.v1.GatewayService/GenerateUnary", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(data, timeout=10)
    assert e.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED and e.value.details()
    cluster.wait_serving("gateway")
