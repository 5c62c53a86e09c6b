"""What a drafter service keeps of the verifiers it is asked to dial (drafter_service/targets.py) and which
ones it may dial at all (drafter_service/allowed.py, --allowed-verifiers).

Real gRPC on loopback: verifier services run in this process (VerifierServicer on tiny trained models,
one of them behind several ports so that it has several addresses), a drafter service too. One stand-in:
`GatedVerifier` is a real verifier whose GetTokenizer waits on a gate, as a verifier on a slow link
would, and counts its calls.

- The caches are bounded (channels, target tokenizers, template drafters), least recently used out; an
  evicted channel stays open while a session's Verify stream uses it, and closes when that stream ends.
- A tokenizer fetch does not hold the cache lock: while one verifier's GetTokenizer hangs, sessions
  against another verifier start and finish; sessions that need the hanging tokenizer share one fetch.
- A drafter with --allowed-verifiers answers any other address PERMISSION_DENIED without connecting.
"""
from __future__ import annotations

import queue
import socket
import threading
import time

import grpc
import pytest
from test_services import save_model

from crossdraft import wire
from crossdraft.errors import PermissionDenied
from crossdraft.local_cluster import free_port
from crossdraft.protocol import TOKENS, Proposal
from crossdraft.sampling import SamplingParams
from crossdraft.serving.service import Service
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from crossdraft.vocab import Vocab
from drafter_service.allowed import AllowedVerifiers
from drafter_service.client import run_session
from drafter_service.server import SERVICE_NAME as DRAFTER_SERVICE
from drafter_service.server import DrafterServicer
from drafter_service.targets import Targets
from verifier_service.server import SERVICE_NAME as VERIFIER_SERVICE
from verifier_service.server import VerifierServicer

PROMPT = "class Parser:\n    def get_value(self"
WAIT_S = 60  # the longest a step may take before the test calls it a hang


class GatedVerifier(VerifierServicer):
    """A real verifier whose GetTokenizer first waits for `gate` (a slow link) and counts its calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.tokenizer_calls = 0
        self._count = threading.Lock()

    def GetTokenizer(self, request, context):
        with self._count:
            self.tokenizer_calls += 1
        self.gate.wait(WAIT_S)
        yield from super().GetTokenizer(request, context)


def serve(name, add, servicer, n=1) -> list:
    """`n` in-process servers of one servicer (n addresses of one verifier), started and SERVING."""
    out = []
    for _ in range(n):
        svc = Service(name, add, servicer, "127.0.0.1", 0, max_workers=16, grace_s=0)
        svc.start(handle_signals=False)
        svc.set_serving()
        out.append(svc)
    return out


@pytest.fixture(scope="module")
def cluster(trained_models, tmp_path_factory):
    """Verifiers "bpe" (GatedVerifier, three addresses) and "spm" (another tokenizer), and a drafter
    (the bpe tokenizer) allowed to dial them and nothing else."""
    root = tmp_path_factory.mktemp("targets")
    dirs = {"bpe": save_model(trained_models["bpe"], "bpe", root / "target-bpe"),
            "spm": save_model(trained_models["spm"], "spm", root / "target-spm"),
            "drafter": save_model(trained_models["bpe_small"], "bpe", root / "drafter")}
    add_v = verifier_pb2_grpc.add_VerifierServiceServicer_to_server
    vb, vs = GatedVerifier(str(dirs["bpe"])), VerifierServicer(str(dirs["spm"]))
    vb.load("cpu")
    vs.load("cpu")
    servers = serve(VERIFIER_SERVICE, add_v, vb, 3) + serve(VERIFIER_SERVICE, add_v, vs)
    bpe, spm = [s.address for s in servers[:3]], servers[3].address
    drafter = DrafterServicer(str(dirs["drafter"]), allowed=AllowedVerifiers([*bpe, spm]))
    drafter.load("cpu")
    servers += serve(DRAFTER_SERVICE, drafter_pb2_grpc.add_DrafterServiceServicer_to_server, drafter)
    try:
        yield dict(bpe=bpe, spm=spm, drafter=servers[-1].address, gated=vb, drafter_servicer=drafter,
                   fp={"bpe": vb.fingerprint, "spm": vs.fingerprint}, dirs=dirs)
    finally:
        vb.gate.set()
        for s in servers:
            s.server.stop(0)


def open_verify(stub, vocab: Vocab, sid: str):
    """A Verify stream on `stub` -> (requests queue, call, committed length)."""
    ids = vocab.encode_prompt(PROMPT)
    q: queue.SimpleQueue = queue.SimpleQueue()
    q.put(verifier_pb2.VerifyRequest(start=wire.start_to_proto(
        wire.SessionStart(sid, ids, [], SamplingParams(), 16, "none"))))
    call = stub.Verify(iter(q.get, None), timeout=WAIT_S)
    return q, call, len(ids)


def one_round(q, call, seq: int) -> int:
    q.put(verifier_pb2.VerifyRequest(proposal=wire.proposal_to_proto(Proposal(seq=seq, kind=TOKENS))))
    verdict = wire.verdict_from_proto(next(call).verdict)
    assert verdict.seq == seq and len(verdict.ids) == 1
    return seq + 1


def closed(channel) -> bool:
    try:
        verifier_pb2_grpc.VerifierServiceStub(channel).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5)
        return False
    except ValueError:  # "Cannot invoke RPC on closed channel!"
        return True


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.05)


def test_caches_are_bounded_and_an_evicted_channel_closes_after_its_last_call(cluster):
    built = []
    t = Targets(lambda tv, mode: built.append((tv.fingerprint(), mode)) or object(), max_channels=2, max_vocabs=1,
                max_drafters=1)
    a, b, c = cluster["bpe"]
    stub, vocab, fp = t.target(a)
    assert fp == cluster["fp"]["bpe"] and t.cached() == {"channels": [a], "vocabs": [fp], "drafters": []}
    channel_a = t._channels[a].channel
    q, call, seq = open_verify(stub, vocab, "evict-1")
    seq = one_round(q, call, seq)
    assert t.target(b)[1] is vocab and t.target(c)[1] is vocab  # the same tokenizer: no second fetch
    assert t.cached()["channels"] == [b, c]  # a is evicted ...
    seq = one_round(q, call, seq)  # ... but its session's stream goes on over it
    assert not closed(channel_a)
    q.put(None)  # the session ends: its stream closes, and with it the evicted channel
    assert list(call) == []
    wait_for(lambda: closed(channel_a), "the evicted channel closes once its last call ended")
    _, spm_vocab, spm_fp = t.target(cluster["spm"])
    assert t.cached()["channels"] == [c, cluster["spm"]] and t.cached()["vocabs"] == [spm_fp]
    assert t.drafter(fp, "slem", vocab) is t.drafter(fp, "slem", vocab)  # built once
    t.drafter(spm_fp, "slem", spm_vocab)
    assert t.cached()["drafters"] == [(spm_fp, "slem")] and built == [(fp, "slem"), (spm_fp, "slem")]
    assert stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5).tokenizer_fingerprint == fp
    assert t.cached()["channels"] == [cluster["spm"], a]  # an evicted address is dialled again on use


def test_a_hanging_tokenizer_fetch_holds_up_only_the_sessions_that_need_it(cluster):
    """While the bpe verifier's GetTokenizer hangs, a session against the spm verifier starts and
    finishes; the three sessions against the bpe verifier fetch its tokenizer once between them, and all
    finish once it arrives. (Before: the fetch held the drafter's one cache lock, so every session start
    waited for the slowest verifier.)"""
    gated = cluster["gated"]
    cluster["drafter_servicer"].targets = Targets(cluster["drafter_servicer"]._make_drafter,
                                                  allowed=AllowedVerifiers([*cluster["bpe"], cluster["spm"]]))
    calls_before = gated.tokenizer_calls
    gated.gate.clear()
    results: dict = {}

    def bpe_session(i):
        results[i] = run_session(cluster["drafter"], cluster["bpe"][i], PROMPT, 12, SamplingParams(), "slem",
                                 timeout=2 * WAIT_S)

    threads = [threading.Thread(target=bpe_session, args=(i,)) for i in range(3)]
    try:
        for th in threads:
            th.start()
        wait_for(lambda: gated.tokenizer_calls > calls_before, "the first bpe session asks for the tokenizer")
        _, _, stats = run_session(cluster["drafter"], cluster["spm"], PROMPT, 12, SamplingParams(), "slem",
                                  timeout=WAIT_S)
        assert stats["new_tokens"] == 12 and not gated.gate.is_set()  # done while the bpe fetch still hangs
    finally:
        gated.gate.set()
        for th in threads:
            th.join(2 * WAIT_S)
    assert len(results) == 3 and len({tuple(r[0]) for r in results.values()}) == 1  # the same output thrice
    assert gated.tokenizer_calls == calls_before + 1  # one fetch for the three sessions


# --- --allowed-verifiers -------------------------------------------------------------------------

def test_allowed_verifiers_entries():
    allowed = AllowedVerifiers.parse("verifier-0.v.ns.svc.cluster.local:50051, *.pool.ns.svc:50051,"
                                     "10.1.2.3:*,[::1]:7000,unix:/run/v.sock")
    for a in ("verifier-0.v.ns.svc.cluster.local:50051", "VERIFIER-0.v.ns.svc.cluster.local.:50051",
              "dns:///verifier-0.v.ns.svc.cluster.local:50051", "p-1.pool.ns.svc:50051", "10.1.2.3:1",
              "[::1]:7000", "unix:/run/v.sock"):
        assert allowed.allows(a), a
    for a in ("verifier-0.v.ns.svc.cluster.local:50052", "evil.example:50051", "p-1.pool.ns.svc.evil:50051",
              "10.1.2.4:50051", "[::1]:7001", "127.0.0.1:7000", "unix:/tmp/other.sock", "ipv4:10.1.2.3:1", ""):
        assert not allowed.allows(a), a
    with pytest.raises(PermissionDenied, match="evil.example:1"):
        allowed.check("evil.example:1")
    assert AllowedVerifiers.parse(None).allows("anything:1") and AllowedVerifiers.parse("*").allows("x:2")
    for bad in ("no-port", "host:http"):
        with pytest.raises(Exception, match="allowed-verifiers"):
            AllowedVerifiers.parse(bad)


def test_a_name_allows_the_addresses_it_resolves_to():
    """A headless Service's name resolves to its pods: naming it allows a gateway that dials pods by IP."""
    port = free_port()
    allowed = AllowedVerifiers.parse(f"localhost:{port}")
    assert allowed.allows(f"127.0.0.1:{port}") and allowed.allows(f"localhost:{port}")
    assert not allowed.allows(f"127.0.0.1:{port + 1}") and not allowed.allows(f"127.0.0.2:{port}")


def test_a_verifier_not_allowed_is_refused_without_a_connection(cluster):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.0)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    req = drafter_pb2.RunSessionRequest(verifier_address=address, prompt=PROMPT, max_new_tokens=4)
    try:
        with grpc.insecure_channel(cluster["drafter"]) as ch, pytest.raises(grpc.RpcError) as e:
            list(drafter_pb2_grpc.DrafterServiceStub(ch).RunSession(req, timeout=WAIT_S))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert address in e.value.details() and "--allowed-verifiers" in e.value.details()
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing dialled it
    finally:
        listener.close()


def test_cli_refuses_a_malformed_allow_list(cluster, capsys):
    from crossdraft.cli import main

    rc = main(["serve", "drafter", "--model", str(cluster["dirs"]["drafter"]), "--port", "0",
               "--allowed-verifiers", "verifier-without-port"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "allowed-verifiers" in err
