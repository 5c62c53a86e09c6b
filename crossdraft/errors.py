"""Typed errors of the core library. Each maps to one gRPC status code (`crossdraft/serving/status.py`,
the one interceptor every service runs) and to one CLI exit code; the message is for the user, one line,
no traceback.

Never: imports grpc; the mapping to status codes lives in `crossdraft/serving/status.py`.
"""
from __future__ import annotations


class CrossdraftError(Exception):
    """Base class: a problem the user can act on, with a one-line message."""

    code = "INTERNAL"  # the gRPC status name this error maps to
    exit_code = 1


class InvalidArgument(CrossdraftError):
    """A request field is wrong: empty prompt, bad sampling parameter, prompt too long."""

    code = "INVALID_ARGUMENT"
    exit_code = 2


class NotFound(CrossdraftError):
    code = "NOT_FOUND"
    exit_code = 2


class FailedPrecondition(CrossdraftError):
    """The request is well formed but cannot apply: `same` with different tokenizers, an unbridgeable pair."""

    code = "FAILED_PRECONDITION"
    exit_code = 2


class ModelLoadError(CrossdraftError):
    """A model or tokenizer directory is missing, unreadable or of an unsupported kind."""

    code = "FAILED_PRECONDITION"
    exit_code = 2


class Unimplemented(CrossdraftError):
    code = "UNIMPLEMENTED"
    exit_code = 2


class ResourceExhausted(CrossdraftError):
    code = "RESOURCE_EXHAUSTED"
    exit_code = 2


class AlreadyExists(CrossdraftError):
    """A session with this id is already open (on this verifier)."""

    code = "ALREADY_EXISTS"
    exit_code = 2


class Unavailable(CrossdraftError):
    """A service cannot serve now: its model is still loading, or a peer it needs cannot be reached."""

    code = "UNAVAILABLE"
    exit_code = 1


class Aborted(CrossdraftError):
    """A session's two sides disagree (a verdict for another committed length): the session must restart."""

    code = "ABORTED"
    exit_code = 1


class PermissionDenied(CrossdraftError):
    """The caller may not do this here: e.g. name a verifier a drafter is not allowed to dial."""

    code = "PERMISSION_DENIED"
    exit_code = 2


class Unauthenticated(CrossdraftError):
    """A request to a gateway with API keys came without a key, or with one it does not know."""

    code = "UNAUTHENTICATED"
    exit_code = 2
