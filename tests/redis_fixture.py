"""A real redis-server for the tests: `redis_server` (session-scoped URL) and `start_redis()` for a
throwaway one. Each server binds 127.0.0.1 on a free port, persists nothing, and is killed by pid.

Without redis-server on PATH the fixture fails under CI (which installs it) and skips elsewhere.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

START_TIMEOUT_S = 10.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def redis_server_binary() -> str:
    """The path of redis-server; fails (under CI) or skips the test when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        msg = "redis-server is not on PATH (Debian: apt-get install redis-server)"
        if _in_ci():
            pytest.fail(msg + "; CI must install it (.ci/run does)", pytrace=False)
        pytest.skip(msg)
    return path


def _free_port() -> int:
    from crossdraft.local_cluster import free_port

    return free_port()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """Kill a server started here, by its pid, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def start_redis():
    """Start redis-server on a free port; yield (url, process); kill it at the end."""
    binary = redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="crossdraft-redis-") as tmp:
        last = ""
        for _ in range(3):  # the free port may be taken between the probe and the bind
            port = _free_port()
            log = os.path.join(tmp, f"redis-{port}.log")
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", tmp, "--logfile", log],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline and not _answers_ping(port):
                time.sleep(0.05)
            if proc.poll() is None and _answers_ping(port):
                break
            stop(proc)
            with contextlib.suppress(OSError), open(log, errors="replace") as f:
                last = " ".join(f.read().split())[-500:]
        else:
            pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT_S:.0f} s: {last}", pytrace=False)
        try:
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            stop(proc)


@pytest.fixture(scope="session")
def redis_server():
    """URL of a redis-server started for this test session."""
    with start_redis() as (url, _):
        yield url
