"""The gateway's OpenAI-compatible HTTP API (`--http-port`), served beside gRPC in the same process.

Owns: the ASGI app (Starlette, served by uvicorn in a thread of its own) and its routes:
`POST /v1/completions`, `POST /v1/chat/completions` (unary, or server-sent events with `stream`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`; reading a request (its size, its JSON, its key)
and running it through the gRPC servicer's own code: `GatewayServicer.caller` (API keys, requests per
minute), `.open` (validation, placing, the session in the store, its events) and `.cancel`, with
`HttpCall` standing in for the gRPC context they read. So an HTTP session is an ordinary session of
the store: GetSession and AttachSession see it, under the same key. A client that goes away before
its answer is complete cancels its session (drafter and verifier stop).

Before a session is created, the target's tokenizer (`targets.py`) renders a chat's template and
counts the prompt's tokens: a prompt too long for the context (400 `context_length_exceeded`) or
over --max-prompt-bytes (413) writes nothing.

Never: parses HTTP itself, runs a session, or keeps session state (a session's text is the store's).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from crossdraft import chat, wire
from crossdraft.errors import CrossdraftError, NotFound
from crossdraft.sampling import SamplingParams
from crossdraft.serving.channels import TLS, check_plaintext
from crossdraft.v1 import gateway_pb2

from . import openai_api as api
from .targets import Targets

log = logging.getLogger("crossdraft.gateway.http")

BODY_FACTOR = 4  # a request body may be this many times --max-prompt-bytes (JSON escapes, messages), + 64 KiB


class HttpCall:
    """What the servicer reads of a gRPC call's context, for one HTTP request: its key, and whether
    the client is still there."""

    def __init__(self, authorization: str = ""):
        self.active = True
        self._metadata = (("authorization", authorization),) if authorization else ()

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> Optional[float]:
        return None

    def invocation_metadata(self):
        return self._metadata


class OpenAIApp:
    """The routes, over one GatewayServicer."""

    def __init__(self, servicer, ready=lambda: True):
        self.servicer, self.ready = servicer, ready
        self.targets = Targets(servicer.verifiers, servicer.drafters)
        self.max_body = BODY_FACTOR * servicer.max_prompt_bytes + (64 << 10)
        self.threads, self._sized = 2 * servicer.max_sessions + 8, False
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    # --- routes -------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def models(self, request: Request):
        try:
            await anyio.to_thread.run_sync(self.servicer.caller, _call(request))
            targets = await anyio.to_thread.run_sync(self.targets.models)
        except Exception as e:  # noqa: BLE001 - every failure is an OpenAI-shaped error
            return _error(e)
        return JSONResponse(api.models_list(targets, api.ALGORITHMS))

    async def model(self, request: Request):
        name = request.path_params["model"]
        try:
            await anyio.to_thread.run_sync(self.servicer.caller, _call(request))
            targets = await anyio.to_thread.run_sync(self.targets.models)
        except Exception as e:  # noqa: BLE001
            return _error(e)
        for t in targets:
            if t["id"] == name:
                return JSONResponse(api.model_card(t, api.ALGORITHMS))
        return _error(api.bad(f"the model {name!r} does not exist here", "model", "model_not_found", 404))

    async def health(self, request: Request):
        ok = self.ready()
        return JSONResponse({"status": "serving" if ok else "not_serving"}, status_code=200 if ok else 503)

    # --- a generation -------------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool):
        if not self._sized:  # a whole answer holds a worker thread for its session: as many as gRPC has
            anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
            self._sized = True
        call = _call(request)
        try:
            raw = await self._body(request)
            caller = await anyio.to_thread.run_sync(self.servicer.caller, call)
            req = api.parse_request(api.parse_json(raw), chat)
            spec, n_prompt = await anyio.to_thread.run_sync(self._spec, req)
            sid = req.session_id or uuid.uuid4().hex
            if req.stream:
                _, events = await anyio.to_thread.run_sync(self.servicer.open, spec, sid, call, caller)
                return _EventStream(self._chunks(req, sid, n_prompt, events), lambda: self._gone(call, sid))
            return await self._unary(request, req, spec, sid, n_prompt, call, caller)
        except Exception as e:  # noqa: BLE001 - every failure is an OpenAI-shaped error
            return _error(e)

    async def _body(self, request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise api.bad(f"the request body is {size} bytes, at most {self.max_body} allowed",
                          code="request_too_large", status=413)
        chunks, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > self.max_body:
                raise api.bad(f"the request body is over {self.max_body} bytes", code="request_too_large", status=413)
            chunks.append(part)
        return b"".join(chunks)

    def _spec(self, req: api.ApiRequest) -> tuple:
        """(GenerationSpec, prompt tokens): the prompt rendered (chat) and measured against the target."""
        try:
            address, info = self.targets.info(req.model)
        except NotFound as e:
            raise api.bad(str(e), "model", "model_not_found", 404) from None
        vocab = self.targets.vocab(address, info)
        prompt = req.prompt
        if req.chat:
            prompt = chat.render(getattr(vocab, "hf", None), req.messages, req.model, vocab.prompt_bos)
        limit = self.servicer.max_prompt_bytes
        if len(prompt.encode("utf-8")) > limit:
            raise api.bad(f"the prompt is {len(prompt.encode('utf-8'))} bytes, at most {limit} allowed",
                          "messages" if req.chat else "prompt", "prompt_too_large", 413)
        n_prompt = len(vocab.encode_prompt(prompt))
        room = info.max_context - n_prompt
        max_tokens = req.max_tokens or (min(room, self.servicer.max_new_tokens) if req.chat
                                        else api.COMPLETION_MAX_TOKENS)
        if room < 1 or max_tokens > room:
            raise api.bad(f"the model {req.model!r} has a context of {info.max_context} tokens; the prompt is "
                          f"{n_prompt} tokens and {max_tokens} more were asked for",
                          "messages" if req.chat else "prompt", "context_length_exceeded")
        params = wire.sampling_params_to_proto(SamplingParams(req.temperature, req.top_k, req.top_p, req.seed))
        spec = gateway_pb2.GenerationSpec(
            prompt=prompt, max_new_tokens=max_tokens, params=params, algorithm=wire.algorithm_to_proto(req.algorithm),
            draft_tokens=req.draft_tokens, model=req.model, drafter=req.drafter, stop_strings=req.stop)
        return spec, n_prompt

    async def _unary(self, request: Request, req, spec, sid: str, n_prompt: int, call: HttpCall, caller: str):
        def run():
            _, events = self.servicer.open(spec, sid, call, caller)
            if not call.active:  # the client left while the session was being placed
                self._gone(call, sid)
            text, end = [], None
            for kind, value in events:
                if kind == "delta":
                    text.append(value.text)
                else:
                    end = value
            return "".join(text), end

        out = await _unless_disconnected(request, run, lambda: self._gone(call, sid))
        if out is None:
            return JSONResponse({}, status_code=499)  # nobody reads it
        text, end = out
        if end is None or end.finish_reason == wire.finish_reason_to_proto("error"):
            msg = end.error_message if end is not None else "the session's events ended early"
            raise api.ApiError(500, f"session {sid}: {msg}", "server_error")
        reason = wire.finish_reason_from_proto(end.finish_reason)
        return JSONResponse(api.response(req, sid, text, reason, api.usage(n_prompt, end.stats.new_tokens),
                                         _extra(req, sid, end, reason)))

    async def _chunks(self, req, sid: str, n_prompt: int, events):
        """The server-sent events of a streaming answer: one chunk per committed delta, the finish
        reason, the usage when asked for, `[DONE]`."""
        created = int(time.time())
        if req.chat:
            yield api.sse(api.chunk(req, sid, created, role=True))
        async for kind, value in iterate_in_threadpool(events):
            if kind == "delta":
                if value.text:
                    yield api.sse(api.chunk(req, sid, created, value.text))
                continue
            reason = wire.finish_reason_from_proto(value.finish_reason)
            if reason == "error":
                yield api.sse(api.ApiError(500, f"session {sid}: {value.error_message}", "server_error").body())
            else:
                yield api.sse(api.chunk(req, sid, created, reason=reason, extra=_extra(req, sid, value, reason)))
                if req.include_usage:
                    yield api.sse(api.usage_chunk(req, sid, created, api.usage(n_prompt, value.stats.new_tokens)))
        yield api.sse("[DONE]")

    def _gone(self, call: HttpCall, sid: str) -> None:
        """The client went away before its answer was complete: its session is cancelled."""
        call.active = False
        try:
            if self.servicer.cancel(sid):
                log.info("session %s: the HTTP client went away; cancelled", sid)
        except CrossdraftError:  # not created yet (the request's own thread cancels it then), or gone
            pass


def _call(request: Request) -> HttpCall:
    return HttpCall(request.headers.get("authorization", ""))


def _extra(req, sid: str, end, reason: str) -> dict:
    """crossdraft's own fields of an answer: the session (GetSession, AttachSession), the algorithm used
    and why, the finish reason in crossdraft's words, the seed."""
    return {"session_id": sid, "algorithm": wire.algorithm_from_proto(end.algorithm), "why": end.why,
            "finish_reason": reason, "seed": req.seed}


def _error(exc: BaseException) -> JSONResponse:
    err = api.error_of(exc)
    if err.status >= 500 and not isinstance(exc, (api.ApiError, CrossdraftError)):
        log.warning("HTTP request failed: %s: %s", type(exc).__name__, err.message)
    return JSONResponse(err.body(), status_code=err.status)


async def _unless_disconnected(request: Request, fn, on_disconnect):
    """fn() in a worker thread, while watching the client: if it goes away first, on_disconnect() and
    None (fn's thread ends on its own: the call it reads is inactive)."""
    result: dict = {}

    async with anyio.create_task_group() as tg:
        async def work():
            try:
                result["out"] = await anyio.to_thread.run_sync(fn)
            except Exception as e:  # noqa: BLE001 - raised below, outside the task group
                result["error"] = e
            tg.cancel_scope.cancel()

        tg.start_soon(work)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        result["gone"] = True
        await anyio.to_thread.run_sync(on_disconnect)
        tg.cancel_scope.cancel()
    if result.get("gone"):
        return None
    if "error" in result:
        raise result["error"]
    return result["out"]


class _EventStream(StreamingResponse):
    """Server-sent events whose client going away (before the last event is sent) calls `on_disconnect`:
    the disconnect is watched whatever ASGI version the server speaks."""

    media_type = "text/event-stream"

    def __init__(self, content, on_disconnect):
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        done = told = False

        async with anyio.create_task_group() as tg:
            async def stream():
                nonlocal done
                try:
                    await self.stream_response(send)
                    done = True
                except OSError:
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)  # (cancelled when the stream ends first)
            if not done:
                told = True  # first, so that the stream's reader sees its call inactive
                await anyio.to_thread.run_sync(self.on_disconnect)
            tg.cancel_scope.cancel()
        if not done and not told:  # the send failed (the client's socket closed) before a disconnect message
            await anyio.to_thread.run_sync(self.on_disconnect)


# --- serving ------------------------------------------------------------------------------------

class HttpServer:
    """uvicorn in a daemon thread, on a socket bound at construction (a port in use fails at once)."""

    def __init__(self, app, host: str, port: int, tls: TLS, client_ca: str = "", grace_s: float = 10.0):
        import ssl

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise CrossdraftError(f"cannot listen on {host}:{port} (HTTP): {e.strerror}") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        kw = {}
        if tls.serves_tls:
            kw = dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
            if client_ca:
                kw.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_s, **kw)
        self.server = uvicorn.Server(config)
        self.scheme = "https" if tls.serves_tls else "http"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="http-api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.scheme, self.host, self.port)

    def begin_stop(self) -> None:
        """Stop listening; requests in flight (a stream being generated) go on to their end."""
        self.server.should_exit = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, waiting at most `timeout` for the requests in flight."""
        self.begin_stop()
        self.thread.join(timeout)


def serve_http(args, servicer, svc, host: str) -> HttpServer:
    """Start the HTTP API of `servicer` on --http-port (0: a free port), with the gRPC listener's TLS
    (--tls-cert/--tls-key, --tls-client-ca); /health follows the gRPC server's health (`svc`), and on
    SIGTERM it stops listening and lets the requests in flight finish within --grace, as `svc` does."""
    port = args.http_port
    if not 0 <= port <= 65535:
        raise CrossdraftError(f"--http-port must be in [0, 65535], got {port}")
    tls = TLS.from_args(args)
    if not tls.serves_tls:
        check_plaintext(host, tls.insecure, f"the HTTP API on {host}:{port}")
    app = OpenAIApp(servicer, ready=lambda: _serving(svc))
    server = HttpServer(app.app, host, port, tls, getattr(args, "tls_client_ca", None) or "",
                        grace_s=getattr(args, "grace", 10.0))
    server.start()
    svc.companions.append(server)  # SIGTERM: it stops listening and drains with the gRPC server
    return server


def _serving(svc) -> bool:
    from grpc_health.v1 import health_pb2

    try:
        return svc.health.Check(health_pb2.HealthCheckRequest(), None).status == \
            health_pb2.HealthCheckResponse.SERVING
    except Exception:  # noqa: BLE001 - no status yet
        return False
