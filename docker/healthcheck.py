"""HEALTHCHECK of the crossdraft image: asks the service this container runs for its grpc.health.v1 status.

    crossdraft-healthcheck [PORT]

The port is PORT, else $CROSSDRAFT_HEALTH_PORT, else the `--port` of the container's main process (PID 1:
`crossdraft serve ROLE --port N ...`). Exit 0 when the service answers SERVING; 1 when it is NOT_SERVING
(still loading its model, or shutting down), unreachable or silent. A container that runs no service
(`crossdraft generate`, `--help`) has nothing to check and is healthy.
"""
from __future__ import annotations

import os
import sys

TIMEOUT_S = 4.0


def port_of(cmdline: list) -> int | None:
    """The value of --port in a `crossdraft serve ...` command line, or None."""
    if "serve" not in cmdline:
        return None
    for i, arg in enumerate(cmdline):
        if arg == "--port" and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return None


def main_process_cmdline(pid: int = 1) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def check(port: int, host: str = "127.0.0.1") -> tuple:
    """(healthy, message) from one Health.Check call on host:port."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            return False, f"{host}:{port}: {e.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{host}:{port}: {status}"


def main(argv: list) -> int:
    port = argv[0] if argv else os.environ.get("CROSSDRAFT_HEALTH_PORT") or port_of(main_process_cmdline())
    if port is None:
        print("no crossdraft service in this container: nothing to check")
        return 0
    healthy, message = check(int(port))
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
