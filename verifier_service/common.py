"""gRPC plumbing shared by the crossdraft services (verifier, drafter, later the gateway).

Owns, in one place:
- the mapping of errors to gRPC status codes (`status_of`, `ErrorInterceptor`): a
  `crossdraft.errors.CrossdraftError` becomes the status named by its `code` (INVALID_ARGUMENT,
  NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE, UNIMPLEMENTED, ABORTED,
  ALREADY_EXISTS, ...) with its one-line message; a failed outgoing call (`grpc.RpcError`, e.g. the
  drafter's Verify stream) keeps its status; anything else is INTERNAL with a one-line message (the
  traceback goes to the log);
- building a server: message size limits, the interceptor, standard health checking
  (`grpc.health.v1`: NOT_SERVING until the model is loaded and warmed, then SERVING), server
  reflection, and a graceful shutdown on SIGTERM/SIGINT (stop accepting, let in-flight calls finish
  within a grace period);
- client channel options with the same message size limits.

It lives here because the core library (`crossdraft/`) must not import grpc outside its wire and
store modules, and the top-level folders are fixed by the product card; `drafter_service` imports it.

Never: touches models or algorithms.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossdraft.errors import CrossdraftError, FailedPrecondition, InvalidArgument

MAX_MESSAGE_BYTES = 8 << 20  # per message, both directions (a Proposal with 64 full q rows is ~4 MiB)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
PACKAGE_PREFIX = "/crossdraft.v1."  # the interceptor wraps only our own services' methods
# Clients reconnect after this long (GOAWAY; calls in flight finish, without a time limit), so that a client
# of a pool behind one DNS name (a Kubernetes headless Service) re-resolves it and finds the pods added since.
MAX_CONNECTION_AGE_S = 300.0

log = logging.getLogger("crossdraft.services")


# --- TLS ----------------------------------------------------------------------------------------
# The rule (README, "Security"): a server listens with TLS when given a certificate and key; given a CA
# too, it requires client certificates signed by it (mutual TLS). Plaintext is allowed without a flag
# only on loopback (127.0.0.0/8, ::1, localhost); anywhere else it needs `--insecure`. An outgoing
# channel (the gateway to its pools, a drafter to a verifier) uses TLS when a CA is given, verifying the
# peer with it and presenting the certificate and key, if any, as its own identity; plaintext to a
# non-loopback address needs `--insecure` too. Every plaintext listener or channel logs a warning.

def is_loopback(host: str) -> bool:
    """True for a loopback host name or address: a HOST, HOST:PORT, or a gRPC target (`ipv4:A,B`,
    `ipv6:[A]:P`, `dns:///HOST:PORT`, `unix:PATH`; a list is loopback when all its addresses are)."""
    h = host.strip()
    if h.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:"):
        if h.startswith(scheme):
            return all(is_loopback(a) for a in h[len(scheme):].split(",") if a.strip())
    if h.startswith("dns:"):
        h = h[4:].rsplit("/", 1)[-1]
    if h.startswith("["):  # [::1]:port
        h = h[1:h.index("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:  # host:port
        h = h.rsplit(":", 1)[0]
    if h.lower() in ("localhost", "localhost.") or h.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: cannot be read: {e.strerror}") from None


@dataclass(frozen=True)
class TLS:
    """A process's TLS settings: its certificate and key (PEM files), the CA that signs its peers, the
    name its peers' certificates are checked against (default: the host of the address called), and
    `insecure`: plaintext allowed off loopback."""
    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""
    insecure: bool = False

    @classmethod
    def from_args(cls, args, ca_attr: str = "tls_ca") -> "TLS":
        t = cls(cert=getattr(args, "tls_cert", None) or "", key=getattr(args, "tls_key", None) or "",
                ca=getattr(args, ca_attr, None) or "", server_name=getattr(args, "tls_server_name", None) or "",
                insecure=bool(getattr(args, "insecure", False)))
        t.check()
        return t

    def check(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("--tls-cert and --tls-key go together: give both or neither")
        if self.insecure and (self.cert or self.ca):
            raise InvalidArgument("--insecure and --tls-* exclude each other")
        for path, what in ((self.cert, "--tls-cert"), (self.key, "--tls-key"), (self.ca, "--tls-ca")):
            if path:
                _read(path, what)

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert)

    @property
    def calls_tls(self) -> bool:
        return bool(self.ca)

    def server_credentials(self, require_client_ca: str = "") -> grpc.ServerCredentials:
        pair = (_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))
        ca = _read(require_client_ca, "--tls-ca") if require_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def channel(self, address: str, options=None, what: str = "peer") -> grpc.Channel:
        """A channel to address: TLS (and the client certificate, if any) when a CA is given; else
        plaintext, refused off loopback without --insecure, with a warning."""
        options = list(options if options is not None else CHANNEL_OPTIONS)
        if self.calls_tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca, "--tls-ca"),
                private_key=_read(self.key, "--tls-key") if self.key else None,
                certificate_chain=_read(self.cert, "--tls-cert") if self.cert else None)
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            return grpc.secure_channel(address, creds, options=options)
        check_plaintext(address, self.insecure, f"{what} {address}", listening=False, error=FailedPrecondition)
        return grpc.insecure_channel(address, options=options)


PLAINTEXT = TLS()  # no TLS: loopback only


def check_plaintext(address: str, insecure: bool, what: str, listening: bool = True,
                    error=InvalidArgument) -> None:
    """Refuse plaintext off loopback unless `insecure` (raises `error`); log a warning whenever plaintext is used."""
    loop = is_loopback(address)
    if not loop and not insecure:
        raise error(
            f"{what}: plaintext {'listening on' if listening else 'connection to'} a non-loopback address; give "
            f"{'--tls-cert and --tls-key' if listening else '--tls-ca'} for TLS, or --insecure to allow plaintext")
    log.warning("%s: plaintext gRPC (no TLS)%s", what,
                " on loopback" if loop else ", allowed by --insecure: anyone on the network can read and call it")


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


_END = object()


def decoupled(produce: Callable[[threading.Event], Iterable], maxsize: int = 64, name: str = "producer"):
    """Yield what `produce(stop)` yields, computed in a worker thread.

    A synchronous gRPC streaming handler blocks in each `yield` until the message has been handed to
    the transport, which takes one or more thread hand-offs (0.5-3 ms on a busy 2-core machine). With
    the round loop in a worker thread, that wait overlaps the next round instead of delaying it: the
    verifier is back waiting for the next proposal as soon as a verdict is computed, the drafter back
    drafting as soon as a delta is queued. The queue is bounded (`maxsize`): a consumer that does not
    read makes the producer wait in `put`, not grow memory. An exception in the producer is raised
    here, in the handler's thread, so the error interceptor maps it to a status. When the consumer
    stops early (the client went away, the handler is closed), `stop` is set; the producer should
    check it between rounds, and its blocked `put` gives up."""
    q: "queue.Queue" = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in produce(stop):
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            put((_END, e))

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item, err = q.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=30.0)


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


class Service:
    """A gRPC server for one crossdraft service, with health, reflection and graceful shutdown.

        svc = Service("crossdraft.v1.VerifierService", add_fn, servicer, host, port, workers)
        svc.start()          # listening, health NOT_SERVING
        ...load and warm the model...
        svc.set_serving()    # health SERVING, logs "serving on HOST:PORT"
        svc.wait()           # until SIGTERM/SIGINT (or stop()), then a graceful shutdown
    """

    def __init__(self, service_name: str, add_servicer: Callable, servicer, host: str, port: int,
                 max_workers: int = 32, grace_s: float = 10.0, on_error: Optional[Callable] = None,
                 tls: TLS = PLAINTEXT, client_ca: Optional[str] = None, interceptors: Iterable = ()):
        """`tls`: listen with TLS when it has a certificate; client certificates signed by `client_ca`
        (default: `tls.ca`) are then required. Without a certificate, plaintext (loopback only, unless
        `tls.insecure`). `interceptors` run before the error interceptor (e.g. the gateway's API keys)."""
        self.service_name, self.host, self.grace_s = service_name, host, grace_s
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=[*interceptors, ErrorInterceptor(on_error)],
                                  options=CHANNEL_OPTIONS + [("grpc.max_connection_age_ms", int(MAX_CONNECTION_AGE_S * 1000)),
                                           # a port already in use is an error, not shared with
                                           # another server that would answer half the calls
                                           ("grpc.so_reuseport", 0)])
        add_servicer(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names: Iterable[str] = (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                reflection.SERVICE_NAME)
        reflection.enable_server_reflection(tuple(names), self.server)
        if tls.serves_tls:
            ca = tls.ca if client_ca is None else client_ca
            self.port = self.server.add_secure_port(f"{host}:{port}", tls.server_credentials(ca))
            log.info("%s: TLS%s", service_name, ", client certificates required (mutual TLS)" if ca else "")
        else:
            check_plaintext(host, tls.insecure, f"{service_name} on {host}:{port}")
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise CrossdraftError(f"cannot listen on {host}:{port}")
        self._stop = threading.Event()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _set(self, status) -> None:
        for name in ("", self.service_name):  # "" is the whole server
            self.health.set(name, status)

    def start(self, handle_signals: bool = True) -> None:
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        self.server.start()

    def set_serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", self.address)

    def stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Block until a stop signal, then shut down: NOT_SERVING at once, no new calls, in-flight
        calls (a round being verified, a session's stream) get grace_s to finish."""
        while not self._stop.wait(0.5):
            pass
        log.info("shutting down (grace %.0f s)", self.grace_s)
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace_s).wait()
        log.info("stopped")


def load_warm(model: str, device=None, fast: bool = True) -> tuple:
    """(Vocab, Runner) of a model, warmed up by one short forward: what a service loads before SERVING."""
    from crossdraft.runner import load_model, make_runner
    from crossdraft.vocab import Vocab

    vocab = Vocab.load(model)
    runner = make_runner(load_model(model, device), fast=fast)
    runner.forward([0], last_only=True)
    runner.reset()
    return vocab, runner


def run_model_service(name: str, add_to_server, servicer, args, log) -> int:
    """`crossdraft serve verifier|drafter`: listen at once (health NOT_SERVING), serve metrics on
    `--metrics-port`, load and warm the model, then SERVING until SIGTERM."""
    svc = Service(name, add_to_server, servicer, args.host, args.port, max_workers=args.max_sessions + 8,
                  grace_s=args.grace, on_error=servicer.metrics.error, tls=TLS.from_args(args))
    svc.start()
    metrics_port = servicer.metrics.serve(getattr(args, "metrics_port", 0), args.host)
    if metrics_port:
        log.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    log.info("listening on %s, loading %s", svc.address, args.model)
    try:
        servicer.load(args.device, fast=not args.hf_runner)
        svc.set_serving()
        svc.wait()
    finally:
        servicer.metrics.stop()
    return 0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def model_id(name_or_path: str) -> str:
    """A directory's name, or the Hub id as given."""
    import os

    p = os.path.expanduser(name_or_path)
    return os.path.basename(os.path.normpath(p)) if os.path.isdir(p) else name_or_path


def dtype_name(runner) -> str:
    return str(getattr(runner, "dtype", "")).replace("torch.", "")
