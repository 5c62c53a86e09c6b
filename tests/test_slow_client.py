"""A streaming client that stops reading (gateway/server.py, `_paced` and `_SlowClient`), through public
gRPC API only.

A real gateway servicer in this process, over real gRPC on loopback, with its sessions in a real
MemoryStore: a finished session of a few hundred kilobytes is attached to by clients whose receive window
is 1 KiB, so that gRPC holds the gateway's send as soon as they stop reading. (The end-to-end case, a
client of a gateway process cut while another client is served, is in tests/test_faults.py.)

- A client that reads again after the cut gets what was on its way, then RESOURCE_EXHAUSTED with a
  message that tells it how to re-attach.
- A client that never reads again has its call cancelled `SLOW_CLIENT_GRACE_S` later, which frees the
  handler's thread: with two worker threads and two such clients, the server answers a third call.
- The services use no private gRPC internals (the cut used `context._rpc_event.call.cancel` before).
"""
from __future__ import annotations

import ast
import logging
import time
from pathlib import Path

import grpc
import pytest

import gateway.server as gateway_server
from crossdraft.serving.service import Service
from crossdraft.store import MemoryStore
from crossdraft.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.pool import Pool

ROOT = Path(__file__).resolve().parents[1]
SLOW_S = 0.5
DELTAS, CHUNK = 200, b"0123456789abcdef" * 128  # 2 KiB a delta: the 1 KiB window fills at once
WAIT_S = 60


@pytest.fixture
def gateway(monkeypatch):
    monkeypatch.setattr(gateway_server, "SLOW_CLIENT_GRACE_S", 1.0)
    store = MemoryStore(ttl_s=3600)
    unused = ["127.0.0.1:9"]  # no session runs here: the sessions are finished ones in the store
    servicer = gateway_server.GatewayServicer(store, Pool("drafter", unused), Pool("verifier", unused),
                                              slow_client_s=SLOW_S)
    svc = Service(gateway_server.SERVICE_NAME, gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer,
                  "127.0.0.1", 0, max_workers=2, grace_s=0)
    svc.start(handle_signals=False)
    svc.set_serving()
    try:
        yield store, svc.address
    finally:
        svc.server.stop(0)
        store.close()


def finished_session(store, sid: str) -> bytes:
    store.create(sid, {"prompt": "p", "max_new_tokens": 2 * DELTAS, "algorithm": "none"})
    for i in range(DELTAS):
        last = i == DELTAS - 1
        store.commit(sid, 2 * i, [1, 2], CHUNK, finished=last, finish_reason="length" if last else "")
    return CHUNK * DELTAS


def attach(address: str, sid: str):
    """An AttachSession stream from a client whose window is 1 KiB; its first message read."""
    ch = grpc.insecure_channel(address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
    stream = gateway_pb2_grpc.GatewayServiceStub(ch).AttachSession(
        gateway_pb2.AttachSessionRequest(session_id=sid), timeout=WAIT_S)
    first = next(stream)
    return ch, stream, first.delta.text.encode()


def wait_for_log(caplog, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while sum(text in r.getMessage() for r in caplog.records) < count:
        assert time.monotonic() < deadline, f"no log line {text!r} within {WAIT_S} s"
        time.sleep(0.05)


def read_rest(stream, got: bytes) -> tuple:
    """(bytes received, the RpcError the stream ended with)."""
    with pytest.raises(grpc.RpcError) as e:
        for msg in stream:
            got += msg.delta.text.encode()
    return got, e.value


def test_a_client_that_reads_again_gets_resource_exhausted_with_a_message(gateway, caplog):
    store, address = gateway
    text = finished_session(store, "slow-1")
    caplog.set_level(logging.WARNING, logger="crossdraft.gateway")
    ch, stream, got = attach(address, "slow-1")
    wait_for_log(caplog, "session slow-1: the client took no message for 0.5 s; its stream is cut")
    got, err = read_rest(stream, got)  # it reads again, within the grace
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "re-attach" in err.details() and "slow-1" in err.details() and "\n" not in err.details()
    assert 0 < len(got) < len(text) and text.startswith(got)  # what was on its way, then the cut
    ch.close()


def test_a_client_that_never_reads_again_is_cancelled_and_frees_the_thread(gateway, caplog):
    store, address = gateway
    finished_session(store, "slow-2")
    finished_session(store, "slow-3")
    caplog.set_level(logging.WARNING, logger="crossdraft.gateway")
    held = [attach(address, sid) for sid in ("slow-2", "slow-3")]  # both of the server's two threads
    wait_for_log(caplog, "the client took nothing for 1 s more; its call is cancelled", count=2)
    with grpc.insecure_channel(address) as ch:  # a third call: a thread is free again
        s = gateway_pb2_grpc.GatewayServiceStub(ch).GetSession(
            gateway_pb2.GetSessionRequest(session_id="slow-2"), timeout=WAIT_S).session
    assert s.session_id == "slow-2" and s.new_tokens == 2 * DELTAS
    for ch, stream, got in held:
        _, err = read_rest(stream, got)
        assert err.code() == grpc.StatusCode.CANCELLED, err
        ch.close()


PRIVATE = ("_rpc_event", "_cython", "cygrpc")  # what the cut used; grpc._* modules below


def test_no_private_grpc_internals():
    """The services reach into no private part of grpcio (names of its modules and of its objects'
    attributes that start with an underscore), so a grpcio upgrade cannot break them silently."""
    found = []
    for pkg in ("crossdraft", "gateway", "drafter_service", "verifier_service"):
        for path in (ROOT / pkg).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:
                continue  # the generated stubs
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Attribute):
                    names = [node.attr]
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.startswith("grpc._") or n.split(".")[-1] in PRIVATE for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
