"""The four processes of a distributed deployment on this machine, for benchmarks and tests.

Owns: starting redis-server, one verifier (the target), one drafter per drafter model and a gateway
as child processes on loopback, each in its own process group; waiting until every service answers
`grpc.health.v1` SERVING; stopping them all (SIGTERM, then SIGKILL) whatever happened. Each child's
output goes to a log file in a temporary directory; a child that dies or never becomes healthy is
reported with the tail of its log.

    with LocalCluster(target, [drafter_dir, ...], threads=1) as cluster:
        Client(cluster.gateway).generate(...)

Never: generates anything itself. grpc is imported lazily (the core library must not need it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .errors import FailedPrecondition, Unavailable
from .seal import new_key_file


_handed_out: set = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process (the kernel may give the
    same ephemeral port to two binds in a row once the first socket is closed)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class LocalCluster:
    def __init__(self, target: str, drafters: list, threads: int = 1, redis: bool = True,
                 python: Optional[str] = None, env: Optional[dict] = None, pin: bool = False,
                 model_args: tuple = (), metrics: bool = False, device: str = "auto", dtype: str = "auto",
                 drafter_args: tuple = (), verifier_args: tuple = ()):
        """`pin`: on a machine of two or more cores, everything but the verifier (the drafters, the
        gateway, Redis, and the caller once it calls `pin_caller`) runs on the last core, and the
        verifier on any: as on separate machines, the verifier's scheduler never waits on the run queue
        behind them (see docs/benchmarks.md, "Many users at once"). `device`, `dtype`: the model services'
        --device and --dtype (as the in-process side of a comparison loads its models). `model_args`:
        more flags for the verifier and the drafters (--max-sessions, --max-batch-tokens, ...);
        `verifier_args`, `drafter_args`: for one of them only (--pass-log, --draft-ahead, ...).
        `metrics`: each service serves /metrics (`self.metrics`: name -> URL)."""
        self.target, self.drafter_dirs, self.threads, self.use_redis = target, list(drafters), threads, redis
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if pin and len(cpus) < 2:
            raise FailedPrecondition("pinning the services needs at least two cores")
        self.pin = {"drafter": {cpus[-1]}, "gateway": {cpus[-1]}, "redis": {cpus[-1]}} if pin else {}
        self.python = python or sys.executable
        # Services that share this machine's cores wait for work without spinning (an OpenMP pool
        # spinning in an idle process takes a core from the busy one).
        self.env = dict(os.environ, **{"OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        self.procs: list = []  # (name, Popen, log path)
        self.logdir = ""
        self.gateway = self.verifier = ""
        self.drafters: dict = {}  # drafter directory name -> address
        self.model_args = ("--device", device or "auto", "--dtype", dtype or "auto", *model_args)
        self.drafter_args = tuple(drafter_args)  # the drafters' own flags (`serve drafter --help`)
        self.verifier_args = tuple(verifier_args)  # and the verifier's
        self.with_metrics = metrics
        self.metrics: dict = {}  # service name -> its /metrics URL (with metrics=True)

    def _spawn(self, name: str, cmd: list) -> None:
        path = os.path.join(self.logdir, f"{name}.log")
        cpus = self.pin.get(name.split("-")[0])
        with open(path, "wb") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=self.env,
                                 preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.procs.append((name, p, path))

    def pin_caller(self) -> None:
        """With `pin`: this process, every thread of it, onto the others' core (a benchmark's clients stand
        for users elsewhere). Without: nothing."""
        if not self.pin:
            return
        cpus = self.pin["gateway"]
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), cpus)
            except OSError:  # a thread that ended meanwhile
                pass

    def _serve(self, role: str, *args: str, name: str = "") -> list:
        extra = list(self.model_args) if role in ("verifier", "drafter") else []
        if role == "drafter":
            extra += self.drafter_args
        if role == "verifier":
            extra += self.verifier_args
        if self.with_metrics:
            port = free_port()
            self.metrics[name or role] = f"http://127.0.0.1:{port}/metrics"
            extra += ["--metrics-port", str(port)]
        return [self.python, "-m", "crossdraft.cli", "serve", role, *args, *extra]

    def start(self, timeout: float = 300.0) -> "LocalCluster":
        self.logdir = tempfile.mkdtemp(prefix="crossdraft-cluster-")
        try:
            redis_url = ""
            if self.use_redis:
                exe = shutil.which("redis-server")
                if exe is None:
                    raise FailedPrecondition("redis-server is not on PATH (apt-get install redis-server)")
                rport = free_port()
                self._spawn("redis", [exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"])
                redis_url = f"redis://127.0.0.1:{rport}/0"
            t = str(self.threads)
            key = new_key_file(os.path.join(self.logdir, "verdict.key"))  # the verifier's and the gateway's only
            vport = free_port()
            self.verifier = f"127.0.0.1:{vport}"
            self._spawn("verifier", self._serve("verifier", "--model", self.target, "--port", str(vport),
                                                "--threads", t, "--verdict-key-file", key))
            for d in self.drafter_dirs:
                port = free_port()
                self.drafters[Path(d).name] = f"127.0.0.1:{port}"
                self._spawn(f"drafter-{Path(d).name}", self._serve("drafter", "--model", d, "--port", str(port),
                                                                   "--threads", t, name=f"drafter-{Path(d).name}"))
            gport = free_port()
            self.gateway = f"127.0.0.1:{gport}"
            gw = ["--port", str(gport), "--drafters", ",".join(self.drafters.values()), "--verifiers", self.verifier,
                  "--verdict-key-file", key]
            if redis_url:
                gw += ["--redis", redis_url]
            self._spawn("gateway", self._serve("gateway", *gw))
            deadline = time.monotonic() + timeout
            for name, addr, service in [("verifier", self.verifier, "crossdraft.v1.VerifierService"),
                                        *((f"drafter-{n}", a, "crossdraft.v1.DrafterService")
                                          for n, a in self.drafters.items()),
                                        ("gateway", self.gateway, "crossdraft.v1.GatewayService")]:
                self._wait_healthy(name, addr, service, deadline)
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, name: str, address: str, service: str, deadline: float) -> None:
        """Until `address` answers SERVING for `service` (by name: the right server answers)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self._check_alive()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"{name} at {address} not SERVING in time; its log:\n{self._tail(name)}")
                time.sleep(0.25)

    def _check_alive(self) -> None:
        for name, p, _ in self.procs:
            if p.poll() is not None:
                raise Unavailable(f"{name} exited with code {p.returncode}; its log:\n{self._tail(name)}")

    def names(self) -> list:
        return [nm for nm, _, _ in self.procs]

    def tail(self, name: str, n: int = 15) -> str:
        """The last `n` lines of a child's log."""
        return self._tail(name, n)

    def _tail(self, name: str, n: int = 15) -> str:
        for nm, _, path in self.procs:
            if nm == name:
                try:
                    with open(path, "rb") as f:
                        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
                except OSError:
                    return ""
        return ""

    def stop(self) -> None:
        for _, p, _ in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.procs = []
        if self.logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)
            self.logdir = ""

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.stop()
