"""The container image (docker/Dockerfile), its HEALTHCHECK (docker/healthcheck.py) and the one-machine
compose file (docker/compose.yaml).

Always run: the healthcheck against a real gRPC server (NOT_SERVING, SERVING, gone), every compose command
line parsed by the real CLI, and the Dockerfile's promises (non-root user, healthcheck, both variants,
nothing it copies left out of the build context). Run only where a Docker daemon answers and the image is
built (scripts/build_image_local.sh here; CROSSDRAFT_DOCKER_IMAGE names another tag): the three services
in containers, read-only and non-root, generating through the gateway exactly what the in-process engine
generates. It skips with the reason otherwise (CI has no Docker daemon).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import needs
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ZOO = needs.zoo_path()
IMAGE = os.environ.get("CROSSDRAFT_DOCKER_IMAGE", "crossdraft:0.1.0")


def healthcheck(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


# --- healthcheck ------------------------------------------------------------------------------------

def test_healthcheck_follows_the_service_health():
    from crossdraft.serving.service import Service

    svc = Service("crossdraft.v1.VerifierService", lambda servicer, server: None, None, "127.0.0.1", 0, grace_s=0)
    svc.start(handle_signals=False)
    port = str(svc.port)
    try:
        r = healthcheck(port)
        assert r.returncode == 1 and "NOT_SERVING" in r.stdout  # loading its model
        svc.set_serving()
        r = healthcheck(port)
        assert r.returncode == 0 and f"127.0.0.1:{port}: SERVING" in r.stdout
        assert healthcheck(env={"CROSSDRAFT_HEALTH_PORT": port}).returncode == 0
    finally:
        svc.server.stop(0).wait()
    r = healthcheck(port)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stdout  # gone


def test_healthcheck_finds_the_port_of_the_main_process():
    sys.path.insert(0, str(DOCKER))
    try:
        import healthcheck as hc
    finally:
        sys.path.remove(str(DOCKER))
    cmd = ["/opt/crossdraft/bin/python", "/opt/crossdraft/bin/crossdraft", "serve", "verifier", "--model", "/m"]
    assert hc.port_of(cmd + ["--port", "50051"]) == 50051
    assert hc.port_of(cmd + ["--port=50052", "--metrics-port", "9090"]) == 50052
    assert hc.port_of(["crossdraft", "generate", "--gateway", "h:1", "x"]) is None
    assert "pytest" in " ".join(hc.main_process_cmdline(os.getpid()))
    if hc.port_of(hc.main_process_cmdline()) is None:  # PID 1 here is no crossdraft service
        r = healthcheck(env={"CROSSDRAFT_HEALTH_PORT": ""})
        assert r.returncode == 0 and "nothing to check" in r.stdout


# --- compose ----------------------------------------------------------------------------------------

def test_compose_commands_parse_and_point_at_each_other():
    from crossdraft.cli import build_parser

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())  # `<<` merges the shared settings
    services = compose["services"]
    assert set(services) == {"redis", "verifier", "drafter", "gateway"}
    parser = build_parser()
    args = {}
    for name in ("verifier", "drafter", "gateway"):
        s = services[name]
        assert s["user"] == "10001:10001" and s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        a = args[name] = parser.parse_args(s["command"])
        assert (a.command, a.role, a.host) == ("serve", name, "0.0.0.0")
    gw = args["gateway"]
    assert gw.drafters == f"drafter:{args['drafter'].port}" and gw.verifiers == f"verifier:{args['verifier'].port}"
    assert args["drafter"].allowed_verifiers == gw.verifiers  # the drafter dials the compose verifier, nothing else
    assert gw.redis == "redis://redis:6379/0"  # no password in it: it comes from the environment
    assert services["gateway"]["environment"]["CROSSDRAFT_REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert services["redis"]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert '--requirepass "$$REDIS_PASSWORD"' in services["redis"]["command"][-1]
    assert services["gateway"]["ports"] == [f"127.0.0.1:{gw.port}:{gw.port}", f"127.0.0.1:{gw.http_port}:{gw.http_port}"]
    assert f"EXPOSE {gw.port} {gw.http_port} " in (DOCKER / "Dockerfile").read_text()  # both of the gateway's ports
    for dep in ("redis", "verifier", "drafter"):
        assert services["gateway"]["depends_on"][dep] == {"condition": "service_healthy"}
    # the verdict key (a compose secret) reaches the verifier and the gateway, never the drafter
    assert compose["secrets"]["verdict_key"] == {"environment": "VERDICT_KEY"}
    for name in ("verifier", "gateway"):
        assert services[name]["secrets"] == ["verdict_key"]
        assert args[name].verdict_key_file == "/run/secrets/verdict_key"
    assert "secrets" not in services["drafter"] and "verdict_key_file" not in vars(args["drafter"])
    for name in ("verifier", "drafter"):
        model = args[name].model
        assert model.startswith("/models/") and (not ZOO.is_dir() or (ZOO / model.removeprefix("/models/")).is_dir())


# --- Dockerfile -------------------------------------------------------------------------------------

def test_dockerfile_promises():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"/opt/crossdraft/bin/crossdraft-healthcheck\"\]", text, re.M)
    assert 'ENTRYPOINT ["crossdraft"]' in text
    assert "cpu) index=cpu" in text and "cuda) index=cu128" in text and "ARG VARIANT=cpu" in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 1  # one stage: the legacy builder builds every stage
    ignore = (ROOT / ".dockerignore").read_text().split()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
            top = path.rstrip("/").split("/")[0]
            assert f"!{path}" in ignore or f"!{top}/" in ignore or f"!{top}" in ignore, path


# --- the image, where it can be built and run ----------------------------------------------------------

def _docker_ready() -> str:
    """Why the image test cannot run here, or '' when it can."""
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon answers (Debian: apt-get install docker.io; dockerd &)"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30).returncode != 0:
        return f"image {IMAGE} is not built (bash scripts/build_image_local.sh)"
    if not ZOO.is_dir():
        return f"no model zoo at {ZOO}"
    return ""


def _free_port() -> int:
    from crossdraft.local_cluster import free_port

    return free_port()


_WHY_NO_IMAGE = _docker_ready()


@pytest.mark.skipif(bool(_WHY_NO_IMAGE), reason=_WHY_NO_IMAGE or "-")
def test_image_serves_a_generation_identical_to_the_engine(redis_server):
    """Verifier, drafter and gateway as containers of the image (non-root, read-only root, no
    capabilities, host network on loopback), sessions in a real redis-server: the image's HEALTHCHECK
    turns healthy, a generation through the gateway equals the in-process engine's, the model services
    run crossdraft's CPU kernels built ahead (the image has no compiler), SIGTERM exits 0."""
    from crossdraft.client import Client
    from crossdraft.engine import Engine
    from crossdraft.sampling import SamplingParams

    vport, dport, gport = _free_port(), _free_port(), _free_port()
    common = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges:true", "-v", f"{ZOO}:/models:ro"]
    runs = {
        "verifier": ["serve", "verifier", "--model", "/models/target-bpe8k", "--host", "127.0.0.1", "--port", str(vport), "--threads", "1"],
        "drafter": ["serve", "drafter", "--model", "/models/drafter-spm4k", "--host", "127.0.0.1", "--port", str(dport), "--threads", "1"],
        "gateway": ["serve", "gateway", "--host", "127.0.0.1", "--port", str(gport), "--redis", redis_server,
                    "--drafters", f"127.0.0.1:{dport}", "--verifiers", f"127.0.0.1:{vport}"],
    }
    names = {role: f"crossdraft-test-{role}-{os.getpid()}" for role in runs}
    try:
        for role, cmd in runs.items():
            subprocess.run(["docker", "run", "-d", "--name", names[role], *common, IMAGE, *cmd], check=True,
                           capture_output=True, timeout=60)
        deadline = time.monotonic() + 120
        for role in runs:
            while True:
                state = subprocess.run(["docker", "exec", names[role], "python", "/opt/crossdraft/bin/crossdraft-healthcheck"],
                                       capture_output=True, text=True, timeout=30)
                if state.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"{role} not SERVING: {state.stdout}{state.stderr}"
                time.sleep(1)
        prompt = "def fib(n):"
        with Client(f"127.0.0.1:{gport}") as client:
            out = client.generate(prompt, 32, 0.0, 0, "slem")
        engine = Engine.load(str(ZOO / "target-bpe8k"), str(ZOO / "drafter-spm4k"), device="cpu")
        ref = engine.generate(prompt, 32, SamplingParams(0.0, 0, 1.0, 0).validate(), "none")
        assert out["ids"] == ref.ids and out["text"] == ref.text
        for role in ("verifier", "drafter"):  # crossdraft's CPU kernels, built ahead in the image (no compiler here)
            logs = subprocess.run(["docker", "logs", names[role]], capture_output=True, text=True, timeout=30)
            said = logs.stdout + logs.stderr
            assert "CPU kernels, built ahead: /opt/crossdraft/share/crossdraft/kernels/" in said, said[-2000:]
            assert "not in use" not in said, said[-2000:]
        for role in runs:
            subprocess.run(["docker", "stop", "-t", "30", names[role]], check=True, capture_output=True, timeout=60)
            code = subprocess.run(["docker", "inspect", names[role], "--format", "{{.State.ExitCode}}"],
                                  capture_output=True, text=True, timeout=30).stdout.strip()
            assert code == "0", role
    finally:
        subprocess.run(["docker", "rm", "-f", *names.values()], capture_output=True, timeout=60)
