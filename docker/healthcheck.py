"""HEALTHCHECK of the crossdraft image: asks the service this container runs for its grpc.health.v1 status.

    crossdraft-healthcheck [PORT]

The port is PORT, else $CROSSDRAFT_HEALTH_PORT, else the `--port` of the container's main process (PID 1:
`crossdraft serve ROLE --port N ...`). When that process serves TLS (`--tls-cert`), the check speaks TLS
too, with the process's own certificate and key as client certificate (mutual TLS), its `--tls-ca`
(`--tls-client-ca` for a gateway) as CA, and its `--tls-server-name` (default localhost) as the name the
certificate must carry: how the Helm chart probes a pod with TLS (Kubernetes' gRPC probes speak only plaintext). Exit 0 when the service answers SERVING; 1 when it is NOT_SERVING
(still loading its model, or shutting down), unreachable or silent. A container that runs no service
(`crossdraft generate`, `--help`) has nothing to check and is healthy.
"""
from __future__ import annotations

import os
import sys

TIMEOUT_S = 4.0


def flag_of(cmdline: list, name: str) -> str | None:
    """The value of --name in a `crossdraft serve ...` command line, or None."""
    if "serve" not in cmdline:
        return None
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def port_of(cmdline: list) -> int | None:
    """The value of --port in a `crossdraft serve ...` command line, or None."""
    port = flag_of(cmdline, "--port")
    return int(port) if port is not None else None


def tls_of(cmdline: list) -> dict | None:
    """{cert, key, ca, server_name} of a `crossdraft serve ...` command line that serves TLS, else None."""
    cert, key = flag_of(cmdline, "--tls-cert"), flag_of(cmdline, "--tls-key")
    if not cert or not key:
        return None
    gateway = "gateway" in cmdline or "all" in cmdline
    ca = flag_of(cmdline, "--tls-client-ca") if gateway else flag_of(cmdline, "--tls-ca")
    return {"cert": cert, "key": key, "ca": ca or flag_of(cmdline, "--tls-ca"),
            "server_name": flag_of(cmdline, "--tls-server-name") or "localhost"}


def main_process_cmdline(pid: int = 1) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _channel(address: str, tls: dict | None):
    import grpc

    if not tls:
        return grpc.insecure_channel(address)

    def read(path):
        with open(path, "rb") as f:
            return f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=read(tls["ca"]) if tls.get("ca") else None,
                                         private_key=read(tls["key"]), certificate_chain=read(tls["cert"]))
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", tls["server_name"])])


def check(port: int, host: str = "127.0.0.1", tls: dict | None = None) -> tuple:
    """(healthy, message) from one Health.Check call on host:port (over TLS with `tls`, see `tls_of`)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(f"{host}:{port}", tls) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            return False, f"{host}:{port}: {e.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{host}:{port}: {status}"


def main(argv: list) -> int:
    cmdline = main_process_cmdline()
    port = argv[0] if argv else os.environ.get("CROSSDRAFT_HEALTH_PORT") or port_of(cmdline)
    if port is None:
        print("no crossdraft service in this container: nothing to check")
        return 0
    healthy, message = check(int(port), tls=tls_of(cmdline))
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
