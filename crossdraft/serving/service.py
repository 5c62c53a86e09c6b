"""The gRPC server every crossdraft service runs in (`Service`), and the model services' main loop.

Owns: building a server (message size limits, the interceptors, standard health checking
(`grpc.health.v1`: NOT_SERVING until the model is loaded and warmed, then SERVING), server
reflection) and its life: listening at once, SERVING once ready, and a graceful shutdown on
SIGTERM/SIGINT (stop accepting, let in-flight calls finish within a grace period, those of its
`companions` too: the gateway's HTTP API). A service given a
`Drain` (drafters, verifiers) drains first: NOT_SERVING and no new sessions at once, running sessions
finish or, after half the grace period, are handed back to the gateway (`drain.py`).

Never: touches models or algorithms (it calls the servicer's own `load`).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Iterable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossdraft.errors import CrossdraftError
from crossdraft.options import kv_dtype, model_dtype

from .channels import CHANNEL_OPTIONS, PLAINTEXT, TLS, check_plaintext
from .drain import Drain
from .status import ErrorInterceptor

# Clients reconnect after this long (GOAWAY; calls in flight finish, without a time limit), so that a client
# of a pool behind one DNS name (a Kubernetes headless Service) re-resolves it and finds the pods added since.
MAX_CONNECTION_AGE_S = 300.0

log = logging.getLogger("crossdraft.services")


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
                 tls: TLS = PLAINTEXT, client_ca: Optional[str] = None, interceptors: Iterable = (),
                 drain: Optional[Drain] = None):
        """`drain`: the servicer's sessions drain on SIGTERM before the server stops (see `wait`).
        `tls`: listen with TLS when it has a certificate; client certificates signed by `client_ca`
        (default: `tls.ca`) are then required. Without a certificate, plaintext (loopback only, unless
        `tls.insecure`). `interceptors` run before the error interceptor (e.g. the gateway's API keys)."""
        self.service_name, self.host, self.grace_s, self.drain = service_name, host, grace_s, drain
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
        # servers beside the gRPC one that stop with it (the gateway's HTTP API): begin_stop() stops
        # their listening and lets requests in flight finish; stop(timeout) waits for them
        self.companions: list = []
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
        t0, left = time.monotonic(), self.grace_s
        if self.drain is not None:
            left = self._drain()
        self.health.enter_graceful_shutdown()
        for c in self.companions:
            c.begin_stop()
        self.server.stop(left).wait()
        for c in self.companions:
            c.stop(max(0.0, self.grace_s - (time.monotonic() - t0)))
        log.info("stopped")

    def _drain(self) -> float:
        """NOT_SERVING and no new sessions; running ones get half the grace period to finish, then are
        handed back (ended with UNAVAILABLE: the gateway resumes them elsewhere). -> grace left."""
        t0 = time.monotonic()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.drain.begin()
        log.info("draining: %d sessions running, no new ones", self.drain.active)
        if not self.drain.wait_idle(self.grace_s / 2):
            log.info("draining: handing %d sessions back to the gateway", self.drain.active)
            self.drain.hand_back()
            self.drain.wait_idle(max(0.0, self.grace_s - (time.monotonic() - t0)) / 2)
        log.info("drained in %.1f s", time.monotonic() - t0)
        return max(0.0, self.grace_s - (time.monotonic() - t0))


def run_model_service(name: str, add_to_server, servicer, args, log) -> int:
    """`crossdraft serve verifier|drafter`: listen at once (health NOT_SERVING), serve metrics on
    `--metrics-port`, load and warm the model, then SERVING until SIGTERM."""
    svc = Service(name, add_to_server, servicer, args.host, args.port, max_workers=args.max_sessions + 8,
                  grace_s=args.grace, on_error=servicer.metrics.error, tls=TLS.from_args(args),
                  drain=getattr(servicer, "drain", None))
    svc.start()
    metrics_port = servicer.metrics.serve(getattr(args, "metrics_port", 0), args.host)
    if metrics_port:
        log.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    log.info("listening on %s, loading %s", svc.address, args.model)
    try:
        servicer.load(args.device, fast=not args.hf_runner, dtype=model_dtype(args), kv_dtype=kv_dtype(args))
        svc.set_serving()
        svc.wait()
    finally:
        servicer.metrics.stop()
    return 0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
