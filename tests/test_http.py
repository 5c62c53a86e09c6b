"""The gateway's OpenAI-compatible HTTP API (gateway/http.py), over real processes on loopback.

A real redis-server; a verifier (the byte-level BPE target) and a drafter (SentencePiece vocabulary),
each its own process with metrics; a gateway with Redis, API keys and `--http-port`; and `serve all`
with a chat model built on the fly (a ChatML template, <|im_end|> only in its generation_config.json)
and `--http-port`. Clients: the official `openai` package, curl for the raw server-sent events,
urllib for bad requests. Outputs must equal the in-process engine's (what `crossdraft generate`
prints) for the same request; a bad request gets its status and an OpenAI-shaped error, and writes
nothing to Redis; a stop string split across two deltas is caught; a client that goes away cancels
its session, on the verifier too."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import helpers
import pytest
from test_gateway import Procs
from test_services import free_port, save_model

from crossdraft import chat
from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import gateway_pb2, gateway_pb2_grpc

PROMPT = "class Parser:\n    def get_value(self"
N = 40
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
MESSAGES = [{"role": "user", "content": "x = len(items) - 1"}]


@pytest.fixture(scope="module")
def stack(trained_models, tmp_path_factory, redis_server):
    from gateway.auth import hash_key

    root = tmp_path_factory.mktemp("http")
    dirs = {"target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm"),
            "chat": helpers.save_chat_model(root / "chat")}
    (root / "keys").write_text("".join(f"{n}:{hash_key(k)}\n" for n, k in KEYS.items()))
    procs = Procs(root)
    metrics = {"verifier": free_port(), "spm": free_port()}
    http = {"gateway": free_port(), "all": free_port()}
    try:
        addr = {"verifier": procs.start("verifier", "verifier", dirs["target"],
                                        ["--metrics-port", str(metrics["verifier"])]),
                "spm": procs.start("spm", "drafter", dirs["spm"], ["--metrics-port", str(metrics["spm"])]),
                "all": procs.start_cmd("all", ["all", "--target", str(dirs["chat"]), "--drafter", str(dirs["spm"]),
                                               "--threads", "1", "--http-port", str(http["all"])])}
        addr["gateway"] = procs.start_cmd("gateway", [
            "gateway", "--redis", redis_server, "--drafters", addr["spm"], "--verifiers", addr["verifier"],
            "--api-keys", str(root / "keys"), "--max-prompt-bytes", "2000", "--http-port", str(http["gateway"])])
        procs.wait_serving(addr)
        urls = {k: f"http://127.0.0.1:{p}" for k, p in http.items()}
        for name, url in urls.items():
            wait_healthy(url, procs, name)
        yield dict(addr, dirs=dirs, procs=procs, redis=redis_server, url=urls["gateway"], chat_url=urls["all"],
                   metrics=metrics)
    finally:
        procs.stop_all()


def wait_healthy(url: str, procs, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200 and json.load(r)["status"] == "serving":
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        assert time.monotonic() < deadline, f"{name}: HTTP API not healthy:\n{procs.log_of(name)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def engine(stack):
    d = stack["dirs"]
    return Engine.load(str(d["target"]), str(d["spm"]), device="cpu")


@pytest.fixture(scope="module")
def chat_engine(stack):
    d = stack["dirs"]
    return Engine.load(str(d["chat"]), str(d["spm"]), device="cpu")


@pytest.fixture(scope="module")
def rdb(stack):
    import redis

    r = redis.Redis.from_url(stack["redis"])
    yield r
    r.close()


def openai_client(url: str, key: str = KEYS["alice"]):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, path: str, body, headers=ALICE) -> tuple:
    """(status, JSON answer) of a raw POST; body bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# --- output -------------------------------------------------------------------------------------

CASES = [("slem", SamplingParams()), ("tli", SamplingParams(temperature=1.0, seed=7)),
         ("none", SamplingParams(temperature=0.8, top_p=0.9, seed=3))]


@pytest.mark.parametrize("algorithm,params", CASES, ids=[a for a, _ in CASES])
def test_completions_identical_to_generate(stack, engine, algorithm, params):
    ref = engine.generate(PROMPT, N, params, algorithm)
    n_prompt = len(engine.target_vocab.encode_prompt(PROMPT))
    c = openai_client(stack["url"])
    kw = dict(model="target", prompt=PROMPT, max_tokens=N, temperature=params.temperature, top_p=params.top_p,
              seed=params.seed, extra_body={"algorithm": algorithm, "drafter": "drafter-spm"})
    out = c.completions.create(**kw)
    assert out.choices[0].text == ref.text and out.model == "target" and out.object == "text_completion"
    assert out.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, ref.new_tokens)
    extra = out.model_extra["crossdraft"]
    assert extra["algorithm"] == ref.algorithm and extra["finish_reason"] == ref.finish_reason
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) >= 2  # one chunk per committed delta
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.new_tokens
    assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason


def test_chat_completions_stop_at_end_of_turn(stack, chat_engine):
    """serve all with the chat model: the template applied at the gateway, the answer ends at <|im_end|>
    (its generation_config.json; the drafter of another vocabulary fetched it with the tokenizer)."""
    prompt = chat.render(helpers.chat_bpe(), MESSAGES)
    ref = chat_engine.generate(prompt, 40, SamplingParams(), "slem")
    assert ref.finish_reason == "eos" and "user" not in ref.text
    c = openai_client(stack["chat_url"])
    kw = dict(model="chat", messages=MESSAGES, temperature=0, extra_body={"algorithm": "slem"})
    out = c.chat.completions.create(max_completion_tokens=40, **kw)
    msg = out.choices[0]
    assert msg.message.content == ref.text and msg.message.role == "assistant" and msg.finish_reason == "stop"
    assert out.model_extra["crossdraft"]["finish_reason"] == "eos" and out.object == "chat.completion"
    assert out.usage.completion_tokens == ref.new_tokens
    assert out.usage.prompt_tokens == len(chat_engine.target_vocab.encode_prompt(prompt))
    chunks = list(c.chat.completions.create(stream=True, **kw))  # no max tokens: the room left in the context
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_health(stack):
    c = openai_client(stack["url"])
    models = c.models.list().data
    assert [m.id for m in models] == ["target"]
    assert models[0].model_extra["crossdraft"]["drafters"] == ["drafter-spm"]
    assert c.models.retrieve("target").id == "target"
    with urllib.request.urlopen(stack["chat_url"] + "/health", timeout=5) as r:
        assert r.status == 200
    import openai

    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_curl_raw_server_sent_events(stack, engine):
    if shutil.which("curl") is None:
        pytest.fail("curl is not on PATH (Debian: apt-get install curl; .ci/run installs it)")
    body = {"model": "target", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True,
            "algorithm": "slem"}
    out = subprocess.run(["curl", "-sS", "-N", "-i", stack["url"] + "/v1/completions", "-H",
                          f"Authorization: Bearer {KEYS['alice']}", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, timeout=60, check=True).stdout
    head, _, events = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head.lower()
    frames = events.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    payloads = [json.loads(f[len(b"data: "):]) for f in frames[:-2]]
    assert all(f.startswith(b"data: {") and b"\n" not in f for f in frames[:-2])
    text = "".join(p["choices"][0]["text"] for p in payloads)
    assert text == engine.generate(PROMPT, 24, SamplingParams(), "slem").text
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in payloads[-1]


# --- sessions -----------------------------------------------------------------------------------

def test_an_http_session_is_an_ordinary_session(stack, engine, rdb):
    c = openai_client(stack["url"])
    out = c.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0,
                               extra_body={"session_id": "http-session-1"})
    sid = out.model_extra["crossdraft"]["session_id"]
    assert sid == "http-session-1" and out.id == f"cmpl-{sid}"
    assert rdb.hget(f"crossdraft:session:{{{sid}}}", "status") == b"done"
    with grpc.insecure_channel(stack["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        md = [("authorization", f"Bearer {KEYS['alice']}")]
        s = stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid, include_output=True), metadata=md,
                            timeout=10).session
        assert s.text == out.choices[0].text and s.spec.model == "target"
        replay = "".join(m.delta.text for m in stub.AttachSession(gateway_pb2.AttachSessionRequest(session_id=sid),
                                                                  metadata=md, timeout=10) if m.HasField("delta"))
        assert replay == out.choices[0].text
        with pytest.raises(grpc.RpcError) as e:  # another key does not see it
            stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), timeout=10,
                            metadata=[("authorization", f"Bearer {KEYS['bob']}")])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def keys(rdb) -> set:
    return set(rdb.keys("crossdraft:*"))


BAD = [
    ("bad JSON", b'{"model": "target", "prompt": ', ALICE, 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", ALICE, 400, None, None),
    ("unknown model", {"model": "nope", "prompt": PROMPT}, ALICE, 404, "model", "model_not_found"),
    ("no key", {"model": "target", "prompt": PROMPT}, {}, 401, None, "invalid_api_key"),
    ("wrong key", {"model": "target", "prompt": PROMPT}, {"Authorization": "Bearer wrong"}, 401, None,
     "invalid_api_key"),
    ("prompt over --max-prompt-bytes", {"model": "target", "prompt": "x" * 2001}, ALICE, 413, "prompt",
     "prompt_too_large"),
    ("prompt over the context", {"model": "target", "prompt": "x = 1\n" * 300, "max_tokens": 8}, ALICE, 400, "prompt",
     "context_length_exceeded"),
    ("max_tokens over the context", {"model": "target", "prompt": PROMPT, "max_tokens": 5000}, ALICE, 400, "prompt",
     "context_length_exceeded"),
    ("n = 3", {"model": "target", "prompt": PROMPT, "n": 3}, ALICE, 400, "n", None),
    ("negative max_tokens", {"model": "target", "prompt": PROMPT, "max_tokens": -1}, ALICE, 400, "max_tokens", None),
    ("temperature a string", {"model": "target", "prompt": PROMPT, "temperature": "hot"}, ALICE, 400, "temperature",
     None),
    ("empty prompt", {"model": "target", "prompt": ""}, ALICE, 400, "prompt", None),
    ("a list of prompts", {"model": "target", "prompt": ["a", "b"]}, ALICE, 400, "prompt", None),
    ("a bad stop", {"model": "target", "prompt": PROMPT, "stop": ["x"] * 17}, ALICE, 400, "stop", None),
    ("logprobs", {"model": "target", "prompt": PROMPT, "logprobs": 2}, ALICE, 400, "logprobs",
     "unsupported_parameter"),
    ("an unknown algorithm", {"model": "target", "prompt": PROMPT, "algorithm": "fast"}, ALICE, 400, "algorithm",
     None),
    ("a bad session id", {"model": "target", "prompt": PROMPT, "session_id": "a b"}, ALICE, 400, None, None),
]


@pytest.mark.parametrize("name,body,headers,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests(stack, rdb, name, body, headers, status, param, code):
    before = keys(rdb)
    got, answer = post(stack["url"], "/v1/completions", body, headers)
    assert got == status, answer
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    assert err["param"] == param and (code is None or err["code"] == code), err
    assert keys(rdb) == before


BAD_CHAT = [
    ("a model without a chat template", {"model": "target", "messages": MESSAGES}, 400, None, "no chat template"),
    ("no messages", {"model": "target", "messages": []}, 400, "messages", "non-empty list"),
    ("an image part", {"model": "target", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "only text parts"),
]


@pytest.mark.parametrize("name,body,status,param,words", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests(stack, rdb, name, body, status, param, words):
    before = keys(rdb)
    got, answer = post(stack["url"], "/v1/chat/completions", body)
    assert got == status and answer["error"]["param"] == param and words in answer["error"]["message"], answer
    assert keys(rdb) == before


def test_openai_client_errors(stack):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(stack["url"], key="wrong").completions.create(model="target", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(stack["url"]).completions.create(model="target", prompt=PROMPT, n=3)
    assert e.value.body["param"] == "n"


# --- stop strings -------------------------------------------------------------------------------

def test_a_stop_string_split_across_deltas(stack, engine):
    """A stop string made of the end of one streamed delta and the start of the next: the stream ends
    right before it, nothing of it is ever sent, and the text is the target's up to it (as in process,
    and through the gRPC API)."""
    c = openai_client(stack["url"])
    kw = dict(model="target", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"algorithm": "slem"})
    deltas = [ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].text]
    full = "".join(deltas)
    for i in range(len(deltas) - 1):
        stop = deltas[i][-2:] + deltas[i + 1][:2]
        at = full.find(stop)
        if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2 and at == len("".join(deltas[: i + 1])) - 2:
            break
    else:
        pytest.fail(f"no two deltas to split a stop string over: {deltas}")
    chunks = list(c.completions.create(stream=True, stop=[stop], **kw))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == full[:at] == engine.generate(PROMPT, N, SamplingParams(), "slem", stop=[stop]).text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["crossdraft"]["finish_reason"] == "stop"
    out = c.completions.create(stop=stop, **kw)
    assert out.choices[0].text == full[:at] and out.choices[0].finish_reason == "stop"
    # the session stopped there: the rounds after the stop string were never run
    assert out.usage.completion_tokens < c.completions.create(**kw).usage.completion_tokens
    with Client(stack["gateway"], timeout=60, api_key=KEYS["alice"]) as g:
        r = g.generate(PROMPT, N, algorithm="slem", stop=[stop])
    assert r["text"] == full[:at] and r["finish_reason"] == "stop"


# --- a client that goes away --------------------------------------------------------------------

def gauge(port: int) -> float:
    from test_metrics import scrape, value

    return value(scrape(f"http://127.0.0.1:{port}/metrics"), "crossdraft_sessions_active")


def wait_for(cond, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_client_that_disconnects_cancels_its_session(stack, rdb):
    """The client reads the first event of a stream, then closes its connection while the drafter is
    held (SIGSTOP): the gateway cancels the session in Redis; once the drafter runs again, the
    verifier's and the drafter's sessions end (their open-session gauges fall to 0)."""
    host, port = stack["url"][len("http://"):].split(":")
    body = json.dumps({"model": "target", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True,
                       "algorithm": "slem", "session_id": "http-disconnect-1"}).encode()
    drafter = stack["procs"].procs["spm"][0]
    s = socket.create_connection((host, int(port)), timeout=30)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
        os.kill(drafter.pid, signal.SIGSTOP)
    finally:
        s.close()
    try:
        key = "crossdraft:session:{http-disconnect-1}"
        wait_for(lambda: rdb.hget(key, "status") == b"cancelled", "the session was not cancelled")
        assert rdb.hget(key, "finish_reason") == b"cancelled"
    finally:
        os.kill(drafter.pid, signal.SIGCONT)
    wait_for(lambda: gauge(stack["metrics"]["verifier"]) == 0 and gauge(stack["metrics"]["spm"]) == 0,
             "the verifier's or the drafter's session is still open")


def test_a_unary_client_that_disconnects_cancels_its_session(stack, rdb):
    """A client waiting for a whole answer goes away while its session is being placed (its drafter is
    held, so the first commit cannot come): the session is cancelled all the same."""
    host, port = stack["url"][len("http://"):].split(":")
    body = json.dumps({"model": "target", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                       "algorithm": "slem", "session_id": "http-disconnect-2"}).encode()
    drafter = stack["procs"].procs["spm"][0]
    key = "crossdraft:session:{http-disconnect-2}"
    os.kill(drafter.pid, signal.SIGSTOP)
    try:
        s = socket.create_connection((host, int(port)), timeout=30)
        try:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body)
            wait_for(lambda: rdb.hget(key, "status") is not None, "the session was not created", 30)
        finally:
            s.close()
        wait_for(lambda: rdb.hget(key, "status") == b"cancelled", "the session was not cancelled")
    finally:
        os.kill(drafter.pid, signal.SIGCONT)
    wait_for(lambda: gauge(stack["metrics"]["verifier"]) == 0 and gauge(stack["metrics"]["spm"]) == 0,
             "the verifier's or the drafter's session is still open")


def test_sigterm_lets_a_stream_in_flight_finish_and_takes_no_new_connection(stack, engine):
    """A gateway of its own gets SIGTERM while a stream is held mid-way (its drafter stopped): it stops
    listening at once, and once the drafter runs again the stream goes on to its end, identical to
    the engine's text, within --grace; then the process exits 0."""
    procs = stack["procs"]
    addr = procs.start_cmd("gateway-drain", [
        "gateway", "--redis", stack["redis"], "--drafters", stack["spm"], "--verifiers", stack["verifier"],
        "--http-port", str(http_port := free_port())])
    procs.wait_serving({"gateway-drain": addr})
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(url, procs, "gateway-drain")
    gateway, drafter = procs.procs["gateway-drain"][0], procs.procs["spm"][0]
    body = json.dumps({"model": "target", "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True,
                       "algorithm": "slem"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [resp.readline()]  # the first event
        os.kill(drafter.pid, signal.SIGSTOP)
        try:
            gateway.send_signal(signal.SIGTERM)
            wait_for(lambda: not _connects(http_port), "the HTTP API still takes connections after SIGTERM", 10)
        finally:
            os.kill(drafter.pid, signal.SIGCONT)
        lines += resp.read().split(b"\n")  # (http.client undoes the chunked encoding)
    finally:
        conn.close()
    events = [json.loads(x[len(b"data: "):]) for x in lines if x.startswith(b"data: {")]
    assert b"data: [DONE]" in lines, lines[-3:]
    assert "".join(e["choices"][0]["text"] for e in events) == engine.generate(PROMPT, 120, SamplingParams(),
                                                                                  "slem").text
    assert gateway.wait(timeout=30) == 0, procs.log_of("gateway-drain")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False
