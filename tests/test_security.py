"""Security (issue 6): TLS and mutual TLS on every hop, API keys at the gateway (stored hashed, a session
belongs to its key), per-key limits, Redis with a password and an ACL user limited to `crossdraft:*` (and
TLS to Redis), and no prompts, outputs or keys in the services' logs.

Everything is real: certificates made here with the `openssl` command line (a CA, a certificate for
127.0.0.1 signed by it, and a rogue CA with its own certificate), a verifier, a drafter and a gateway as
separate processes on loopback speaking mutual TLS to each other, redis-server processes configured
with requirepass, an ACL user and TLS. Processes are stopped by their pid."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import needs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_fixture import _in_ci, redis_server_binary
from redis_fixture import stop as stop_redis
from test_gateway import Procs
from test_services import ROOT, START_TIMEOUT_S, free_port, save_model

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from crossdraft.sampling import SamplingParams
from crossdraft.serving.channels import TLS, is_loopback
from crossdraft.serving.service import Service
from crossdraft.store import MemoryStore, RedisStore
from crossdraft.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.auth import ApiKeys, KeyLimits, hash_key, load_keys

PROMPT = "class Parser:\n    def get_value(self"
SECRET_PROMPT = "# MARKER-zqxj-7731 do not log\nclass Parser:\n    def get_value(self"
N = 32
KEYS = {"alice": "alice-key-Xy7pQ2", "bob": "bob-key-Lm4nR8", "dave": "dave-key-Df9sT1", "erin": "erin-key-Eq3uV5"}
RPM = 40



@pytest.fixture(autouse=True, scope="module")
def _openssl_present():
    """The certificates come from the openssl command line: missing, these tests fail under CI (which
    installs it, .ci/run) and skip elsewhere."""
    if shutil.which("openssl") is None:
        msg = "the openssl command line is needed (Debian: apt-get install openssl)"
        if _in_ci():
            pytest.fail(msg + "; CI must install it (.ci/run does)", pytrace=False)
        pytest.skip(msg)


# --- certificates -----------------------------------------------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def make_cert(d: Path, name: str, ca: str) -> None:
    """name.pem/name.key for 127.0.0.1 and localhost, signed by ca, good as server and client certificate."""
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    for name in ("verifier", "drafter", "gateway", "client"):
        make_cert(d, name, "ca")
    make_cert(d, "rogue", "rogue-ca")
    return {name: {"cert": str(d / f"{name}.pem"), "key": str(d / f"{name}.key")}
            for name in ("verifier", "drafter", "gateway", "client", "rogue")} | \
        {"ca": str(d / "ca.pem"), "rogue_ca": str(d / "rogue-ca.pem"), "dir": d}


def tls_flags(certs, name: str, ca_flag: str = "--tls-ca") -> list:
    return ["--tls-cert", certs[name]["cert"], "--tls-key", certs[name]["key"], ca_flag, certs["ca"]]


def creds(certs, name: str = "client", ca: str = "ca"):
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=read(certs[ca]))
    return grpc.ssl_channel_credentials(root_certificates=read(certs[ca]), private_key=read(certs[name]["key"]),
                                        certificate_chain=read(certs[name]["cert"]))


def health(address: str, credentials=None, timeout: float = 3.0) -> int:
    ch = grpc.secure_channel(address, credentials) if credentials is not None else grpc.insecure_channel(address)
    with ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def wait_serving_tls(procs: Procs, addresses: dict, certs) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for name, address in addresses.items():
        while True:
            proc = procs.procs[name][0]
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{procs.log_of(name)}")
            try:
                if health(address, creds(certs), timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not SERVING after {START_TIMEOUT_S} s:\n{procs.log_of(name)}")
            time.sleep(0.2)


# --- Redis with a password, an ACL user and TLS ----------------------------------------------------------

ACL_USER, ACL_PASSWORD, ADMIN_PASSWORD = "crossdraft", "acl-pw-Hq82", "admin-pw-Zz19"
# The tightest rule that works with the store and the gateway: its own keys only; reads, writes, key
# expiry, transactions, streams (blocking XREAD) and scripts (the store's Lua through EVALSHA; a script
# touches only the keys it is given, which the ACL checks too); no pub/sub, no admin, none of the
# dangerous commands (KEYS, FLUSHALL, CONFIG, DEBUG, ...).
ACL_RULE = (f"user {ACL_USER} on >{ACL_PASSWORD} ~crossdraft:* resetchannels -@all +@connection +@transaction "
            "+@read +@write +@keyspace +@stream +@scripting +@blocking -@dangerous")


def _redis_up(port: int, tls_ctx=None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if tls_ctx is not None:
                s = tls_ctx.wrap_socket(s, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextlib.contextmanager
def start_secure_redis(certs=None):
    """redis-server on loopback: the default user off (`requirepass`-style: nothing without a password),
    an admin user, the ACL user; with `certs`, TLS only (no plaintext port). Yields (port, process)."""
    binary = redis_server_binary()  # fails under CI, skips elsewhere, when missing
    with tempfile.TemporaryDirectory(prefix="crossdraft-redis-acl-") as tmp:
        acl = Path(tmp) / "users.acl"
        acl.write_text(f"user default off\nuser admin on >{ADMIN_PASSWORD} ~* &* +@all\n{ACL_RULE}\n")
        port = free_port()
        cmd = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp,
               "--aclfile", str(acl), "--logfile", str(Path(tmp) / "redis.log")]
        ctx = None
        if certs is not None:
            import ssl

            cmd += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", certs["verifier"]["cert"],
                    "--tls-key-file", certs["verifier"]["key"], "--tls-ca-cert-file", certs["ca"],
                    "--tls-auth-clients", "no"]
            ctx = ssl.create_default_context(cafile=certs["ca"])
        else:
            cmd += ["--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline and not _redis_up(port, ctx):
                time.sleep(0.05)
            if proc.poll() is not None or not _redis_up(port, ctx):
                log = Path(tmp) / "redis.log"
                pytest.fail(f"secure redis-server did not start: {log.read_text()[-800:] if log.exists() else ''}")
            yield port, proc
        finally:
            stop_redis(proc)


@pytest.fixture(scope="module")
def acl_redis():
    with start_secure_redis() as (port, _):
        yield port


# --- the TLS stack ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(trained_models, tmp_path_factory, certs, acl_redis):
    """verifier, drafter and gateway with mutual TLS; the gateway with API keys and per-key limits, its
    sessions in the ACL-restricted redis as user `crossdraft` (password from $CROSSDRAFT_REDIS_PASSWORD)."""
    root = tmp_path_factory.mktemp("secure")
    dirs = {"target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm")}
    keys_file = root / "api-keys"
    keys_file.write_text("# name:sha256\n" + "".join(f"{n}:{hash_key(k)}\n" for n, k in KEYS.items()))
    procs = Procs(root)
    old = os.environ.get("CROSSDRAFT_REDIS_PASSWORD")
    os.environ["CROSSDRAFT_REDIS_PASSWORD"] = ACL_PASSWORD  # inherited by the gateway process only
    try:
        addr = {"verifier": procs.start("verifier", "verifier", dirs["target"], tls_flags(certs, "verifier"))}
        addr["drafter"] = procs.start("drafter", "drafter", dirs["spm"], tls_flags(certs, "drafter"))
        redis_url = f"redis://{ACL_USER}@127.0.0.1:{acl_redis}/0"
        addr["gateway"] = procs.start_cmd("gateway", [
            "gateway", "--redis", redis_url, "--drafters", addr["drafter"], "--verifiers", addr["verifier"],
            *tls_flags(certs, "gateway"), "--api-keys", str(keys_file), "--key-requests-per-minute", str(RPM),
            "--key-max-sessions", "2"])
        wait_serving_tls(procs, addr, certs)
        yield dict(addr, dirs=dirs, procs=procs, root=root, keys_file=keys_file, redis_port=acl_redis)
    finally:
        if old is None:
            os.environ.pop("CROSSDRAFT_REDIS_PASSWORD", None)
        else:
            os.environ["CROSSDRAFT_REDIS_PASSWORD"] = old
        procs.stop_all()


@pytest.fixture(scope="module")
def engine(stack):
    return Engine.load(str(stack["dirs"]["target"]), str(stack["dirs"]["spm"]), device="cpu")


@pytest.fixture(scope="module")
def admin(stack):
    import redis

    r = redis.Redis(host="127.0.0.1", port=stack["redis_port"], username="admin", password=ADMIN_PASSWORD)
    yield r
    r.close()


def client(stack, certs, key="alice", **kw) -> Client:
    return Client(stack["gateway"], timeout=60, api_key=KEYS.get(key, key), tls_ca=certs["ca"], **kw)


def gw_stub(stack, certs):
    return gateway_pb2_grpc.GatewayServiceStub(grpc.secure_channel(stack["gateway"], creds(certs, None)))


def auth(key):
    return (("authorization", f"Bearer {KEYS.get(key, key)}"),)


def spec(prompt=PROMPT, n=N):
    return gateway_pb2.GenerationSpec(prompt=prompt, max_new_tokens=n, algorithm=common_pb2.ALGORITHM_SLEM)


def session_keys(admin) -> set:
    return set(admin.scan_iter("crossdraft:session:*"))


# --- TLS ----------------------------------------------------------------------------------------------

def test_generation_over_mutual_tls_identical_to_in_process(stack, certs, engine):
    ref = engine.generate(PROMPT, N, SamplingParams(), "slem")
    with client(stack, certs) as c:
        out = c.generate(PROMPT, N, algorithm="slem")
    assert out["ids"] == ref.ids and out["text"] == ref.text
    for name in ("verifier", "drafter", "gateway"):
        log = (stack["root"] / f"{name}.log").read_text(errors="replace")
        assert "TLS" in log and "plaintext" not in log, name
    assert "client certificates required (mutual TLS)" in (stack["root"] / "verifier.log").read_text()
    assert "client certificates required (mutual TLS)" in (stack["root"] / "drafter.log").read_text()


def test_plaintext_and_wrong_certificates_are_refused(stack, certs):
    for name in ("verifier", "drafter", "gateway"):
        with pytest.raises(grpc.RpcError) as e:  # plaintext to a TLS port
            health(stack[name])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as e:  # a server certificate the client's CA did not sign
            health(stack[name], creds(certs, "client", ca="rogue_ca"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    for name in ("verifier", "drafter"):  # mutual TLS: no client certificate, or one of another CA
        for bad in (creds(certs, None), creds(certs, "rogue")):
            with pytest.raises(grpc.RpcError) as e:
                health(stack[name], bad)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health(stack[name], creds(certs)) == health_pb2.HealthCheckResponse.SERVING
    # the gateway asks no client certificate (clients are identified by API key)
    assert health(stack["gateway"], creds(certs, None)) == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_health_over_mutual_tls(stack, certs):
    binary = needs.grpcurl()  # missing: fails under CI, skips elsewhere
    c = certs["client"]
    out = subprocess.run([binary, "-cacert", certs["ca"], "-cert", c["cert"], "-key", c["key"],
                          stack["verifier"], "grpc.health.v1.Health/Check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "SERVING", out.stderr
    out = subprocess.run([binary, "-cacert", certs["ca"], stack["verifier"], "grpc.health.v1.Health/Check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0  # no client certificate: the handshake fails


def test_loopback_rule():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]:50051", "localhost", "localhost:80", "127.0.0.1:5",
                 "ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///localhost:50051", "unix:/tmp/s.sock", "ipv6:[::1]:5"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5:50051", "verifier.default.svc:50051", "example.com", "[::]:1",
                 "ipv4:127.0.0.1:1,10.0.0.1:2", "dns:///verifier:50051", "dns://8.8.8.8/localhost.evil.com:1"):
        assert not is_loopback(host), host
    noop = lambda servicer, server: None  # noqa: E731
    with pytest.raises(InvalidArgument, match="--insecure"):
        Service("crossdraft.v1.X", noop, None, "0.0.0.0", 0)
    svc = Service("crossdraft.v1.X", noop, None, "0.0.0.0", 0, tls=TLS(insecure=True))  # explicitly asked
    assert svc.port > 0
    svc.server.stop(0)
    with pytest.raises(InvalidArgument, match="together"):
        TLS(cert="x").check()
    ch = TLS().channel("127.0.0.1:1")  # loopback: allowed
    ch.close()
    from crossdraft.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="--insecure"):
        TLS().channel("10.1.2.3:50051")


def _cli(*args, env=None, timeout=60, input=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "crossdraft.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout, input=input)


def test_cli_refuses_plaintext_off_loopback_without_insecure():
    out = _cli("serve", "gateway", "--host", "0.0.0.0", "--port", "0", "--drafters", "127.0.0.1:1",
               "--verifiers", "127.0.0.1:2")
    assert out.returncode == 2 and "--insecure" in out.stderr, out.stderr
    out = _cli("serve", "gateway", "--port", "0", "--drafters", "10.9.8.7:1", "--verifiers", "127.0.0.1:2")
    assert out.returncode == 2 and "--tls-ca" in out.stderr and "--insecure" in out.stderr, out.stderr
    out = _cli("serve", "gateway", "--port", "0", "--drafters", "127.0.0.1:1", "--verifiers", "127.0.0.1:2",
               "--key-max-sessions", "3")
    assert out.returncode == 2 and "--api-keys" in out.stderr, out.stderr


def test_cli_insecure_off_loopback_starts_with_a_warning(tmp_path):
    port = free_port()
    log = open(tmp_path / "gw.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "crossdraft.cli", "serve", "gateway", "--host", "0.0.0.0",
                             "--port", str(port), "--drafters", "127.0.0.1:1", "--verifiers", "127.0.0.1:2",
                             "--insecure"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(grpc.RpcError):
                if health(f"127.0.0.1:{port}", timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gw.log").read_text()
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, 15)
        proc.wait(30)
        log.close()
    text = (tmp_path / "gw.log").read_text()
    assert "plaintext gRPC (no TLS), allowed by --insecure" in text
    assert "no --api-keys: the gateway is open" in text


# --- API keys -----------------------------------------------------------------------------------------

def test_hash_key_cli_and_keys_file(tmp_path):
    out = _cli("hash-key", "--name", "ops", input="s3cret-key\n")
    assert out.returncode == 0 and out.stdout.strip() == f"ops:{hash_key('s3cret-key')}"
    out = _cli("hash-key", "--new")
    new_key = out.stderr.strip()
    assert out.returncode == 0 and out.stdout.strip().endswith(":" + hash_key(new_key)) and len(new_key) >= 40
    f = tmp_path / "keys"
    f.write_text(f"# comment\n\nops:{hash_key('a')}\n{hash_key('b')}\n")
    assert load_keys(str(f)) == {hash_key("a"): "ops", hash_key("b"): f"key-{hash_key('b')[:8]}"}
    f.write_text("ops:not-a-hash\n")
    with pytest.raises(InvalidArgument, match="SHA256HEX"):
        load_keys(str(f))
    keys = ApiKeys({hash_key("a"): "ops"})
    assert keys.caller([("authorization", "Bearer a")]) == "ops"
    for md in ([], [("authorization", "Bearer b")], [("authorization", "a")], [("authorization", "Basic a")]):
        with pytest.raises(Unauthenticated):
            keys.caller(md)


def test_missing_or_wrong_key_is_unauthenticated(stack, certs, admin):
    before = session_keys(admin)
    stub = gw_stub(stack, certs)
    for md in (None, auth("not-a-key"), (("authorization", "Basic abc"),)):
        with pytest.raises(grpc.RpcError) as e:
            stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec()), timeout=30, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()
        for call, req in ((stub.GetSession, gateway_pb2.GetSessionRequest(session_id="x")),
                          (stub.CancelSession, gateway_pb2.CancelSessionRequest(session_id="x"))):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=30, metadata=md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert session_keys(admin) == before  # nothing written


def test_a_session_belongs_to_its_key(stack, certs, admin, engine):
    sid = "owned-by-alice-1"
    ref = engine.generate(PROMPT, N, SamplingParams(), "slem")
    with client(stack, certs, "alice") as c:
        out = c.generate(PROMPT, N, algorithm="slem", session_id=sid)
        assert out["ids"] == ref.ids and c.get_session(sid)["text"] == ref.text
    stored = json.loads(admin.hget(f"crossdraft:session:{{{sid}}}", "request"))
    assert stored["key_name"] == "alice"
    raw = b"".join(v for v in admin.hgetall(f"crossdraft:session:{{{sid}}}").values())
    assert KEYS["alice"].encode() not in raw and hash_key(KEYS["alice"]).encode() not in raw  # the name only
    stub = gw_stub(stack, certs)
    calls = [lambda: stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), timeout=30, metadata=auth("bob")),
             lambda: list(stub.AttachSession(gateway_pb2.AttachSessionRequest(session_id=sid), timeout=30,
                                             metadata=auth("bob"))),
             lambda: stub.CancelSession(gateway_pb2.CancelSessionRequest(session_id=sid), timeout=30,
                                        metadata=auth("bob")),
             lambda: list(stub.Generate(gateway_pb2.GenerateRequest(spec=spec(), session_id=sid), timeout=30,
                                        metadata=auth("bob"))),
             lambda: stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec(), session_id=sid), timeout=30,
                                        metadata=auth("bob"))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and sid in e.value.details()
    # the same answer as for a session that does not exist at all
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(gateway_pb2.GetSessionRequest(session_id="no-such-session"), timeout=30, metadata=auth("bob"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with client(stack, certs, "alice") as c:  # the owner still sees it, untouched
        s = c.get_session(sid)
        assert s["status"] == "finished" and s["text"] == ref.text and "".join(c.attach(sid)) == ref.text


def test_cli_generate_with_api_key_and_tls(stack, certs, engine):
    ref = engine.generate(PROMPT, N, SamplingParams(), "slem")
    args = ["generate", PROMPT, "--gateway", stack["gateway"], "--max-new-tokens", str(N), "--algorithm", "slem",
            "--json", "--tls-ca", certs["ca"]]
    out = _cli(*args, env={"CROSSDRAFT_API_KEY": KEYS["bob"]})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == ref.text
    out = _cli(*args, "--api-key", "wrong")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr
    with Client(stack["gateway"], timeout=30, reconnect_s=0, api_key=KEYS["bob"]) as c:  # plaintext to TLS
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, 4)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# --- per-key limits -----------------------------------------------------------------------------------

def test_requests_per_minute_per_key(stack, certs, admin):
    stub = gw_stub(stack, certs)
    minute = int(time.time() // 60)
    if time.time() % 60 > 50:  # keep the whole test inside one minute window
        time.sleep(61 - time.time() % 60)
    used = int(admin.get(f"crossdraft:ratelimit:{{dave}}:{int(time.time() // 60)}") or 0)
    codes = []
    for _ in range(RPM - used):
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSession(gateway_pb2.GetSessionRequest(session_id="nope"), timeout=30, metadata=auth("dave"))
        codes.append(e.value.code())
    assert set(codes) == {grpc.StatusCode.NOT_FOUND}
    before = session_keys(admin)
    with pytest.raises(grpc.RpcError) as e:
        stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec()), timeout=30, metadata=auth("dave"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests this minute" in e.value.details()
    assert session_keys(admin) == before  # nothing of a session written for the refused request
    counters = list(admin.scan_iter("crossdraft:ratelimit:{dave}:*"))
    assert counters and all(0 < admin.ttl(k) <= 120 for k in counters) and minute <= max(
        int(k.rsplit(b":", 1)[1]) for k in counters)
    # another key is not affected
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(gateway_pb2.GetSessionRequest(session_id="nope"), timeout=30, metadata=auth("bob"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_sessions_per_key_through_the_gateway(stack, certs, admin):
    """erin has two running sessions (made directly in the store, as another replica would): a third is
    RESOURCE_EXHAUSTED and writes nothing; once one ends, the next is served."""
    store = RedisStore(f"redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{stack['redis_port']}/0")
    held = ["erin-running-1", "erin-running-2"]
    for sid in held:
        store.create(sid, {"prompt": "x", "key_name": "erin"})
        store.set_status(sid, "running")
        admin.zadd("crossdraft:keysessions:{erin}", {sid: time.time()})
    stub = gw_stub(stack, certs)
    before = session_keys(admin)
    with pytest.raises(grpc.RpcError) as e:
        stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec(), session_id="erin-3"), timeout=30,
                           metadata=auth("erin"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2 sessions" in e.value.details()
    assert session_keys(admin) == before
    store.set_status(held[0], "done", finish_reason="length")
    r = stub.GenerateUnary(gateway_pb2.GenerateUnaryRequest(spec=spec(), session_id="erin-3"), timeout=60,
                           metadata=auth("erin"))
    assert r.session_id == "erin-3" and r.text
    store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_key_limits_unit(kind, acl_redis):
    now = [1000.0 * 60]
    store = MemoryStore() if kind == "memory" else \
        RedisStore(f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{acl_redis}/0", prefix="crossdraft:unit:")
    lim = KeyLimits.for_store(store, requests_per_minute=3, max_sessions=1)
    lim.clock = lambda: now[0]
    name = f"k{time.monotonic_ns()}"
    for _ in range(3):
        lim.request(name)
    with pytest.raises(ResourceExhausted):
        lim.request(name)
    lim.request("other" + name)
    now[0] += 60  # the next minute
    lim.request(name)
    lim.acquire(name, "s1")
    store.create("s1", {"prompt": "p"})
    with pytest.raises(ResourceExhausted):
        lim.acquire(name, "s2")
    lim.release(name, "s2")  # releasing a slot never taken changes nothing
    with pytest.raises(ResourceExhausted):
        lim.acquire(name, "s2")
    store.set_status("s1", "failed", error="x", finish_reason="error")
    lim.acquire(name, "s2")  # s1 ended: its slot is free
    store.close()


# --- Redis: password, ACL user, TLS ----------------------------------------------------------------------

CONTRACT = ["test_create_and_get", "test_commit_appends_and_counts", "test_final_commit_records_a_result",
            "test_expected_length_check", "test_replay_of_last_commit_applied_once",
            "test_events_from_any_offset_in_order", "test_blocking_read_wakes_on_commit", "test_cancel",
            "test_set_status_failed_and_invalid"]


@pytest.mark.parametrize("name", CONTRACT)
def test_store_contract_as_acl_user(name, acl_redis):
    import test_store

    store = RedisStore(f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{acl_redis}/0")
    try:
        getattr(test_store, name)(store)
    finally:
        store.close()


def test_acl_user_is_confined_to_the_prefix(acl_redis):
    import redis

    r = redis.Redis(host="127.0.0.1", port=acl_redis, username=ACL_USER, password=ACL_PASSWORD)
    r.set("crossdraft:probe", "1")
    for call in (lambda: r.set("other:key", "1"), lambda: r.get("session:x"), lambda: r.keys("*"),
                 lambda: r.flushall(), lambda: r.config_get("*"), lambda: r.publish("crossdraft:c", "1"),
                 lambda: r.shutdown()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    with pytest.raises(redis.exceptions.NoPermissionError):  # a script touching a key outside the prefix
        r.eval("return redis.call('SET', KEYS[1], '1')", 1, "other:key")
    r.delete("crossdraft:probe")
    r.close()
    anon = redis.Redis(host="127.0.0.1", port=acl_redis)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anon.ping()
    anon.close()
    bad = redis.Redis(host="127.0.0.1", port=acl_redis, username=ACL_USER, password="wrong")
    with pytest.raises(redis.exceptions.AuthenticationError):
        bad.ping()
    bad.close()


def test_gateway_sessions_in_acl_redis_stay_under_the_prefix(stack, certs, admin):
    with client(stack, certs, "bob") as c:
        out = c.generate(PROMPT, 8, algorithm="slem", session_id="acl-check-1")
    assert out["new_tokens"] > 0
    keys = {k.decode() for k in admin.scan_iter("*")}
    assert "crossdraft:session:{acl-check-1}" in keys
    assert keys and all(k.startswith("crossdraft:") for k in keys), sorted(keys)
    # the password came from $CROSSDRAFT_REDIS_PASSWORD: not on the command line, not in the log
    assert ACL_PASSWORD not in (stack["root"] / "gateway.log").read_text()


def test_store_contract_over_tls_to_redis(certs):
    import test_store

    with start_secure_redis(certs) as (port, _):
        url = f"rediss://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={certs['ca']}"
        store = RedisStore(url)
        try:
            assert store.ping()
            for name in ("test_create_and_get", "test_commit_appends_and_counts", "test_cancel"):
                getattr(test_store, name)(store)
        finally:
            store.close()
        import redis

        plain = redis.Redis(host="127.0.0.1", port=port, username=ACL_USER, password=ACL_PASSWORD,
                            socket_timeout=3)
        with pytest.raises(redis.exceptions.ConnectionError):  # plaintext to the TLS port
            plain.ping()
        plain.close()


# --- logs ---------------------------------------------------------------------------------------------

def test_no_prompt_output_or_key_in_the_logs(stack, certs):
    with client(stack, certs, "alice") as c:
        out = c.generate(SECRET_PROMPT, N, algorithm="slem", session_id="log-check-1")
        with pytest.raises(grpc.RpcError):  # a refused request's message must not echo the key either
            Client(stack["gateway"], timeout=30, api_key="WRONGKEY-zz99", tls_ca=certs["ca"]).get_session("x")
    assert len(out["text"]) >= 10
    secrets = ["MARKER-zqxj-7731", out["text"], *KEYS.values(), "WRONGKEY-zz99", ACL_PASSWORD,
               *(hash_key(k) for k in KEYS.values())]
    for name in ("verifier", "drafter", "gateway"):
        log = (stack["root"] / f"{name}.log").read_text(errors="replace")
        for s in secrets:
            assert s not in log, f"{name}'s log contains {s[:20]!r}"


def test_container_healthcheck_speaks_mutual_tls(stack, certs):
    """docker/healthcheck.py (the image's HEALTHCHECK and the chart's exec probes under TLS) reads the TLS
    flags of the service's command line and checks it over mutual TLS."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    hc = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(hc)
    port = int(stack["verifier"].rsplit(":", 1)[1])
    cmdline = ["crossdraft", "serve", "verifier", "--port", str(port), *tls_flags(certs, "verifier"),
               "--tls-server-name", "localhost"]
    tls = hc.tls_of(cmdline)
    assert tls == {"cert": certs["verifier"]["cert"], "key": certs["verifier"]["key"], "ca": certs["ca"],
                   "server_name": "localhost"}
    assert hc.check(port, tls=tls)[0] is True
    assert hc.check(port)[0] is False  # plaintext to the TLS port
    assert hc.tls_of(["crossdraft", "serve", "verifier", "--port", "1"]) is None


def test_serve_all_with_tls_api_keys_and_limits_in_memory(trained_models, tmp_path, certs, engine, stack):
    """`serve all` (one process, sessions in memory): TLS and API keys on the gateway's port, its in-process
    hops plaintext on loopback (with the warning); the per-key request limit counted in memory."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alice:{hash_key(KEYS['alice'])}\nbob:{hash_key(KEYS['bob'])}\n")
    procs = Procs(tmp_path)
    try:
        addr = {"all": procs.start_cmd("all", [
            "all", "--target", str(stack["dirs"]["target"]), "--drafter", str(stack["dirs"]["spm"]),
            "--threads", "1", "--tls-cert", certs["gateway"]["cert"], "--tls-key", certs["gateway"]["key"],
            "--api-keys", str(keys_file), "--key-requests-per-minute", "3"])}
        wait_serving_tls(procs, addr, certs)
        ref = engine.generate(PROMPT, N, SamplingParams(), "slem")
        if time.time() % 60 > 40:  # alice's four calls below fall in one minute window
            time.sleep(61 - time.time() % 60)
        with Client(addr["all"], timeout=60, api_key=KEYS["alice"], tls_ca=certs["ca"]) as c:
            out = c.generate(PROMPT, N, algorithm="slem", session_id="all-1")
            assert out["ids"] == ref.ids
            assert c.get_session("all-1")["text"] == ref.text
        with Client(addr["all"], timeout=60, api_key=KEYS["bob"], tls_ca=certs["ca"]) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.get_session("all-1")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with Client(addr["all"], timeout=60, api_key=KEYS["alice"], tls_ca=certs["ca"]) as c:
            assert c.get_session("all-1")["status"] == "finished"  # alice's third request this minute
            with pytest.raises(grpc.RpcError) as e:
                c.get_session("all-1")
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        log = procs.full_log("all")  # (the start-up lines: not in a tail of the log)
        assert "GatewayService: TLS" in log and "plaintext gRPC (no TLS) on loopback" in log
    finally:
        procs.stop_all()
