"""The composition root: `crossdraft serve all`, the three services in one process.

Owns: building the embedded default from the three services, which know nothing of one another: the
verifier and the drafter on loopback ports the OS picks, the gateway on --host:--port, one metrics
registry for the three roles, and one random verdict key between the verifier and the gateway. This
is the only module that imports more than one service; the CLI imports it lazily.

Never: contains service logic; each service is used through its public servicer or builder only.
"""
from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry

from crossdraft.batched import Limits
from crossdraft.options import kv_dtype, model_dtype
from crossdraft.seal import Sealer
from crossdraft.serving.channels import PLAINTEXT
from crossdraft.serving.metrics import ServiceMetrics
from crossdraft.serving.service import Service, setup_logging
from crossdraft.v1 import drafter_pb2_grpc, verifier_pb2_grpc
from drafter_service.server import SERVICE_NAME as DRAFTER_SERVICE
from drafter_service.server import DrafterServicer
from gateway.server import gateway_service, make_store
from verifier_service.server import SERVICE_NAME as VERIFIER_SERVICE
from verifier_service.server import VerifierServicer

log = logging.getLogger("crossdraft.compose")


def serve_all(args) -> int:
    """`crossdraft serve all`: the embedded default. One process, three gRPC servers: the verifier and
    the drafter on loopback ports picked by the OS, the gateway on --host:--port (the only one a client
    needs). Health SERVING on the gateway once both models are loaded and warmed; SIGTERM stops all three."""
    setup_logging()
    store = make_store(args.redis, args.ttl)
    registry = CollectorRegistry()  # one /metrics for the three roles, told apart by their `role` label
    gmetrics = ServiceMetrics("gateway", registry)
    # one process: its own random key seals the verifier's verdicts for its gateway
    sealer = Sealer(os.urandom(32))
    limits = Limits.from_args(args)
    verifier = VerifierServicer(args.target, limits, metrics=ServiceMetrics("verifier", registry), sealer=sealer,
                                max_model_len=args.max_model_len or None)
    drafter = DrafterServicer(args.drafter, limits, metrics=ServiceMetrics("drafter", registry))
    vsvc = Service(VERIFIER_SERVICE, verifier_pb2_grpc.add_VerifierServiceServicer_to_server, verifier,
                   "127.0.0.1", 0, max_workers=args.max_sessions + 8, grace_s=args.grace,
                   on_error=verifier.metrics.error)
    dsvc = Service(DRAFTER_SERVICE, drafter_pb2_grpc.add_DrafterServiceServicer_to_server, drafter,
                   "127.0.0.1", 0, max_workers=args.max_sessions + 8, grace_s=args.grace,
                   on_error=drafter.metrics.error)
    vsvc.start(handle_signals=False)
    dsvc.start(handle_signals=False)
    # the verifier and the drafter listen on loopback in this process: plaintext between them and the
    # gateway (the loopback rule); TLS and API keys apply to the gateway's port, the one clients reach
    gsvc = gateway_service(args, store, [dsvc.address], [vsvc.address], args.host, args.port, metrics=gmetrics,
                           pool_tls=PLAINTEXT, sealer=sealer)
    mport = gmetrics.serve(getattr(args, "metrics_port", 0), args.host)
    if mport:
        log.info("metrics on http://%s:%d/metrics", args.host, mport)
    log.info("listening on %s, loading %s and %s", gsvc.address, args.target, args.drafter)
    verifier.load(args.device, fast=not args.hf_runner, dtype=model_dtype(args), kv_dtype=kv_dtype(args))
    vsvc.set_serving()
    drafter.load(args.device, fast=not args.hf_runner, dtype=model_dtype(args), kv_dtype=kv_dtype(args))
    dsvc.set_serving()
    gsvc.set_serving()
    gsvc.wait()
    for svc in (dsvc, vsvc):
        svc.stop()
        svc.wait()
    gmetrics.stop()
    store.close()
    return 0
