"""Errors to gRPC status codes, in one place.

Owns: the mapping of errors to status codes (`status_of`, `ErrorInterceptor`): a
`crossdraft.errors.CrossdraftError` becomes the status named by its `code` (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE, UNIMPLEMENTED, ABORTED,
ALREADY_EXISTS, ...) with its one-line message; a failed outgoing call (`grpc.RpcError`, e.g. the
drafter's Verify stream) keeps its status; anything else is INTERNAL with a one-line message (the
traceback goes to the log).

Never: decides what is an error; handlers raise, this module only reports.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import grpc

from crossdraft.errors import CrossdraftError

PACKAGE_PREFIX = "/crossdraft.v1."  # the interceptor wraps only our own services' methods

log = logging.getLogger("crossdraft.services")


def one_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def status_of(exc: BaseException) -> tuple:
    """(grpc.StatusCode, message) for an exception raised by a handler."""
    if isinstance(exc, CrossdraftError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), one_line(exc) or exc.code.lower()
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code() or grpc.StatusCode.UNKNOWN
        return code, one_line(exc.details() or "") or code.name.lower()
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {one_line(exc)}"


def _abort(context, exc: BaseException, method: str, on_error=None):
    code, message = status_of(exc)
    _report(on_error, code)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, CrossdraftError):
        log.exception("%s failed", method)
    else:
        log.info("%s: %s: %s", method, code.name, message)
    context.abort(code, message)


def _report(on_error, code) -> None:
    if on_error is not None:
        try:
            on_error(code)
        except Exception:  # noqa: BLE001 - counting an error must never hide it
            log.exception("on_error failed")


def _already_aborted(context) -> bool:
    try:
        return context.code() is not None  # the handler called context.abort itself
    except Exception:  # noqa: BLE001 - older grpc without ServicerContext.code()
        return False


def _wrap_unary(behavior, method, on_error=None):
    @functools.wraps(behavior)
    def handler(request, context):
        try:
            return behavior(request, context)
        except Exception as e:  # noqa: BLE001 - the one place handler failures become statuses
            if _already_aborted(context):
                _report(on_error, context.code())
                raise
            _abort(context, e, method, on_error)
    return handler


def _wrap_stream(behavior, method, on_error=None):
    @functools.wraps(behavior)
    def handler(request, context):
        try:
            yield from behavior(request, context)
        except Exception as e:  # noqa: BLE001
            if _already_aborted(context):
                _report(on_error, context.code())
                raise
            _abort(context, e, method, on_error)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps every exception of a crossdraft handler to one status code with a message (`status_of`);
    `on_error(code)`, if given, is told each status so answered (the services' error counter)."""

    def __init__(self, on_error: Optional[Callable] = None):
        self.on_error = on_error

    def intercept_service(self, continuation, handler_call_details):
        h = continuation(handler_call_details)
        method = handler_call_details.method
        if h is None or not method.startswith(PACKAGE_PREFIX):
            return h
        kw = dict(request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)
        on = self.on_error
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(h.unary_unary, method, on), **kw)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(h.unary_stream, method, on), **kw)
        if h.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(h.stream_unary, method, on), **kw)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(h.stream_stream, method, on), **kw)
