"""The shapes of the OpenAI API: requests checked and read, responses, stream chunks and errors built.

Owns: reading the JSON body of `POST /v1/completions` and `POST /v1/chat/completions` into an
`ApiRequest` (the OpenAI fields crossdraft serves, its own extra fields, a clear 400 for a field it
does not serve), the response objects and server-sent-event chunks, finish reasons in OpenAI's words,
and errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the HTTP status of
each of crossdraft's typed errors (`error_of`, the one mapping).

Defaults follow OpenAI's: temperature 1 and top_p 1 (sampling; send temperature 0 for greedy), a
random seed when none is given (the response tells it), max_tokens 16 for completions; for chat, the
room left in the target's context.

Never: serves HTTP, talks to a service, or touches the session store.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

from crossdraft.chat import check_messages
from crossdraft.errors import InvalidArgument
from crossdraft.serving.status import status_of
from crossdraft.stops import check_stops

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ALGORITHMS = ("auto", "same", "tli", "slem", "slrs", "none")  # the `algorithm` field (wire.py's names)
MAX_DRAFT_TOKENS = 64
# crossdraft's status codes -> (HTTP status, OpenAI error type)
_HTTP = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "FAILED_PRECONDITION": (400, "invalid_request_error"),
         "UNIMPLEMENTED": (400, "invalid_request_error"), "OUT_OF_RANGE": (400, "invalid_request_error"),
         "ALREADY_EXISTS": (409, "invalid_request_error"), "NOT_FOUND": (404, "invalid_request_error"),
         "UNAUTHENTICATED": (401, "authentication_error"), "PERMISSION_DENIED": (403, "permission_error"),
         "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "server_error"),
         "DEADLINE_EXCEEDED": (504, "server_error")}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 503: "service_unavailable"}
# fields crossdraft does not serve, with the values that mean "not asked for"
_UNSERVED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
             "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
             "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
             "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "audio": (None,),
             "modalities": (None, ["text"]), "prediction": (None,)}


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else _CODES.get(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_of(exc: BaseException) -> ApiError:
    """Any exception of a request -> its ApiError: crossdraft's typed errors and gRPC statuses by code,
    anything else 500 (one line; the caller logs the traceback)."""
    if isinstance(exc, ApiError):
        return exc
    code, message = status_of(exc)
    status, kind = _HTTP.get(code.name, (500, "server_error"))
    return ApiError(status, message, kind)


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400) -> ApiError:
    return ApiError(status, message, "invalid_request_error", param, code)


@dataclass
class ApiRequest:
    """One completion request, checked. `max_tokens` None: the endpoint's default."""

    chat: bool
    model: str
    prompt: str = ""
    messages: list = field(default_factory=list)
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    algorithm: str = "auto"
    drafter: str = ""
    draft_tokens: int = 0
    session_id: str = ""


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def parse_request(body: dict, chat: bool) -> ApiRequest:
    """The body of a completion request -> ApiRequest; ApiError 400 naming the field that is wrong."""
    for name, fine in _UNSERVED.items():
        if name in body and body[name] not in fine:
            raise bad(f"{name} is not supported by crossdraft", param=name, code="unsupported_parameter")
    if body.get("n", 1) not in (1, None):
        raise bad(f"n must be 1 (one choice per request), got {body['n']!r}", param="n")
    req = ApiRequest(chat=chat, model=_string(body, "model", required=True))
    if chat:
        try:
            req.messages = check_messages(body.get("messages"))
        except InvalidArgument as e:
            raise bad(str(e), param="messages") from None
    else:
        req.prompt = _prompt(body.get("prompt"))
    req.max_tokens = _max_tokens(body)
    req.temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    req.top_k = _int(body, "top_k", 0, 0, 1 << 31)
    seed = body.get("seed")
    req.seed = secrets.randbits(63) if seed is None else _int(body, "seed", 0, 0, (1 << 63) - 1)
    try:
        req.stop = check_stops(body.get("stop"))
    except InvalidArgument as e:
        raise bad(str(e), param="stop") from None
    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options must be an object", param="stream_options")
    req.include_usage = bool(req.stream and opts and _bool(opts, "include_usage"))
    if body.get("user") is not None:
        _string(body, "user")
    _crossdraft_fields(body, req)
    return req


def _crossdraft_fields(body: dict, req: ApiRequest) -> None:
    """crossdraft's own fields: algorithm, drafter (a drafter model id), draft_tokens, session_id."""
    req.algorithm = _string(body, "algorithm") or "auto"
    if req.algorithm not in ALGORITHMS:
        raise bad(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {req.algorithm!r}", param="algorithm")
    drafter = _string(body, "drafter")
    req.drafter = "" if drafter in ("", "auto") else drafter
    req.draft_tokens = _int(body, "draft_tokens", 0, 0, MAX_DRAFT_TOKENS)
    req.session_id = _string(body, "session_id")


def _string(body: dict, name: str, required: bool = False) -> str:
    v = body.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v):
        raise bad(f"{name} must be a {'non-empty ' if required else ''}string", param=name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false", param=name)
    return v


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", param=name)
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if low_open else lo <= v) and v <= hi
    if not ok:
        raise bad(f"{name} must be a number in {'(' if low_open else '['}{lo:g}, {hi:g}], got {v!r}", param=name)
    return float(v)


def _prompt(v) -> str:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, list):
        raise bad("prompt must be one string (lists of prompts or of token ids are not supported)", param="prompt")
    if not isinstance(v, str) or not v:
        raise bad("prompt must be a non-empty string", param="prompt")
    return v


def _max_tokens(body: dict) -> Optional[int]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad(f"{name} must be an integer >= 1, got {v!r}", param=name)
    return v


# --- responses ----------------------------------------------------------------------------------

def finish_reason(name: str) -> Optional[str]:
    """crossdraft's finish reason -> OpenAI's: eos and stop strings are 'stop'."""
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}.get(name)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_id(req: ApiRequest, sid: str) -> str:
    return f"{'chatcmpl' if req.chat else 'cmpl'}-{sid}"


def response(req: ApiRequest, sid: str, text: str, reason: str, use: dict, extra: dict) -> dict:
    """The whole answer of a request that did not stream."""
    choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(reason)}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": response_id(req, sid), "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": [choice], "usage": use,
            "crossdraft": extra}


def chunk(req: ApiRequest, sid: str, created: int, text: Optional[str] = None, reason: str = "",
          role: bool = False, extra: Optional[dict] = None) -> dict:
    """One chunk of a stream: a delta of text, the role (chat's first chunk) or the finish reason."""
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason(reason) if reason else None}
    if req.chat:
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out = {"id": response_id(req, sid), "object": "chat.completion.chunk" if req.chat else "text_completion",
           "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    if extra is not None:
        out["crossdraft"] = extra
    return out


def usage_chunk(req: ApiRequest, sid: str, created: int, use: dict) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {"id": response_id(req, sid), "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [], "usage": use}


def sse(data) -> bytes:
    """One server-sent event: `data: JSON` (or the text `[DONE]`) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(targets: list, algorithms) -> dict:
    return {"object": "list", "data": [model_card(t, algorithms) for t in targets]}


def model_card(target: dict, algorithms) -> dict:
    return {"id": target["id"], "object": "model", "created": 0, "owned_by": "crossdraft",
            "crossdraft": {"drafters": target["drafters"], "algorithms": list(algorithms)}}

