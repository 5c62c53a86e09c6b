"""The Helm chart (helm/crossdraft): lint, render, validate against the Kubernetes schemas, and check the
rendered objects against what the services need.

Value sets: the chart's defaults (Kubernetes discovery, network policies on) and each helm/ci/*-values.yaml
(an external Redis; a GPU verifier with two drafter pools scaled on sessions per pod, one by KEDA, and a
ServiceMonitor; everything static: static discovery, no autoscaling, no metrics; TLS and API keys). For
each: `helm lint --strict`, `helm template`, `kubernetes-validate --strict` for two Kubernetes versions,
and checks of the objects: drafter pools and the verifier are separate workloads with separate
autoscalers, every container is probed, has resources and runs as non-root, no secret value appears in
plain text, the gateway's pool addresses are the rendered Services, and every crossdraft command line
parses with the real CLI. The bundled Redis's rendered command is run against a real redis-server, with
the gateway's password path (crossdraft/cli.py).

Helm comes from .tools/helm/helm (scripts/install_helm.sh) or PATH, kubernetes-validate from the test extra;
without them these tests skip, except when CROSSDRAFT_REQUIRE_HELM=1 (.ci/run sets it), where they fail.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "crossdraft"
CI_VALUES = ROOT / "helm" / "ci"
RELEASE, NAMESPACE = "demo", "ml"
FULL = f"{RELEASE}-crossdraft"
K8S_VERSIONS = ("1.27.0", "1.35.0")  # the chart's kubeVersion floor (gRPC probes GA) and Helm 4.1's client
VALUE_SETS = {"default": None, **{p.name[: -len("-values.yaml")]: p for p in sorted(CI_VALUES.glob("*-values.yaml"))}}
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}  # not in the Kubernetes schemas: checked by hand below
SECRET_ENV = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN$", re.I)  # not MAX_NEW_TOKENS


def _require(what: str, hint: str):
    msg = f"{what} not found ({hint})"
    if os.environ.get("CROSSDRAFT_REQUIRE_HELM") == "1":
        pytest.fail(msg + "; CROSSDRAFT_REQUIRE_HELM=1 (CI) needs it", pytrace=False)
    pytest.skip(msg)


@lru_cache(maxsize=1)
def _helm_path():
    local = ROOT / ".tools" / "helm" / "helm"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


def helm(*args, check=True) -> subprocess.CompletedProcess:
    path = _helm_path()
    if path is None:
        _require("helm", "bash scripts/install_helm.sh puts Helm 4 in .tools/helm/")
    proc = subprocess.run([path, *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stderr}", pytrace=False)
    return proc


def kubernetes_validate() -> str:
    """Path of the kubernetes-validate command of this Python (the test extra of pyproject.toml)."""
    exe = Path(sys.executable).with_name("kubernetes-validate")
    if not exe.exists():
        _require("kubernetes-validate", "pip install -e '.[test]'")
    return str(exe)


def values_args(name: str) -> list:
    return ["-f", str(VALUE_SETS[name])] if VALUE_SETS[name] else []


@lru_cache(maxsize=None)
def render(name: str) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(name)).stdout


def objects(name: str) -> list:
    return [d for d in yaml.safe_load_all(render(name)) if d]


@lru_cache(maxsize=None)
def values(name: str) -> dict:
    """The values of a set as Helm sees them: the chart's defaults with the file on top (maps merged)."""
    def merge(base, top):
        if isinstance(base, dict) and isinstance(top, dict):
            return {k: merge(base.get(k), top[k]) if k in top else base[k] for k in {**base, **top}}
        return top

    base = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(base, yaml.safe_load(VALUE_SETS[name].read_text())) if VALUE_SETS[name] else base


def by_kind(objs: list, kind: str) -> dict:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list) -> dict:
    return {**by_kind(objs, "Deployment"), **by_kind(objs, "StatefulSet")}


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions with In) against labels."""
    sel = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in sel.items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def flag(args: list, name: str) -> str:
    """The value of --name=VALUE in a rendered argument list."""
    vals = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(vals) == 1, (name, args)
    return vals[0]


def crossdraft_containers(objs: list):
    for w in workloads(objs).values():
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["name"] != "redis":
                yield w, c


# --- lint, render, validate ------------------------------------------------------------------------

def test_value_sets_present():
    assert {"default", "external-redis", "gpu-two-pools", "static"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name):
    out = helm("lint", "--strict", str(CHART), *values_args(name))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_kubernetes_validate_strict(name, version, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(render(name))
    proc = subprocess.run([kubernetes_validate(), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR" not in out, out
    objs = objects(name)
    passed = re.findall(r"passed for resource (\S+) against version", out)
    expected = sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in objs if o["kind"] not in CRD_KINDS)
    assert sorted(passed) == expected and len(expected) >= 10  # every object validated, none skipped


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    """Negative control: the validator does reject what the API server would (a misspelt field)."""
    path = tmp_path / "bad.yaml"
    path.write_text(render("default").replace("terminationGracePeriodSeconds", "terminationGracePeriodSecs", 1))
    proc = subprocess.run([kubernetes_validate(), "--strict", "-k", K8S_VERSIONS[0], str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "terminationGracePeriodSecs" in proc.stdout + proc.stderr


@pytest.mark.parametrize("sets, message", [
    (["--set", "gateway.replicas=two"], "/gateway/replicas"),
    (["--set", "verifier.gpu=-1"], "/verifier/gpu"),
    (["--set", "drafter.pools=none"], "/drafter/pools"),
    (["--set", "metrics.port=70000"], "/metrics/port"),
    (["--set", "gateway.autoscaling.enabled=yes"], "/gateway/autoscaling/enabled"),
    (["--set-json", 'drafter.pools=[{"name":"Bad_Name","model":"m"}]'], "/drafter/pools/0/name"),
    (["--set-json", 'drafter.pools=[{"name":"a"}]'], "model"),
    (["--set", "gateway.replicaCount=2"], "replicaCount"),  # a typo is an error, not ignored
    (["--set", "redis.auth.password=hunter2"], "password"),  # a password is never a value
    (["--set", "redis.external.password=hunter2"], "password"),
    (["--set", "redis.enabled=false"], "/redis/external/url"),  # external Redis needs its URL
    (["--set-json", 'networkPolicy.extraAllowedVerifiers=["no-port"]'], "/networkPolicy/extraAllowedVerifiers/0"),
])
def test_schema_rejects(sets, message):
    proc = helm("template", RELEASE, str(CHART), *sets, check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("sets, message", [
    (["--set-json", 'drafter.pools=[{"name":"a","model":"m"},{"name":"a","model":"n"}]'], "used twice"),
    (["--set", "redis.enabled=false", "--set", "redis.external.url=redis://:pw@redis:6379/0"], "must not contain a password"),
    (["--set", "gateway.autoscaling.targetCPUUtilizationPercentage=0"], "autoscaling needs"),
])
def test_template_refuses(sets, message):
    proc = helm("template", RELEASE, str(CHART), *sets, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- values.yaml and its schema ---------------------------------------------------------------------

def test_schema_is_generated():
    """values.schema.json is scripts/gen_values_schema.py's output (edit the script, then run it)."""
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_values_schema.py"))
    assert (CHART / "values.schema.json").read_text() == gen["render"](), "run python3 scripts/gen_values_schema.py"


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict) and v:
                yield from _keys(v, f"{prefix}{k}.")


def test_schema_and_values_have_the_same_options():
    """Every option the schema names for a role is in values.yaml with its default and comment, and the
    reverse (helm lint checks the reverse too, through additionalProperties: false)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for role in ("gateway", "drafter", "verifier", "redis"):
        in_schema = set(schema["properties"][role]["properties"])
        assert in_schema == set(defaults[role]), (role, in_schema ^ set(defaults[role]))
    pool = schema["properties"]["drafter"]["properties"]["pools"]["items"]["properties"]
    assert set(pool) == (set(defaults["drafter"]) - {"pools"}) | {"name", "model"}
    assert set(schema["properties"]) - {"global"} == set(defaults)


def test_every_value_is_documented():
    """Each key of values.yaml has a `# --` comment right above it, or sits under a key that has one
    (a Kubernetes object passed through whole, such as resources or podSecurityContext)."""
    undocumented, stack = [], []  # stack: (indent, documented)
    comment = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        text = line.strip()
        if text.startswith("# --"):
            comment = True
            continue
        if not text or text.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        m = re.match(r"(-\s+)?([A-Za-z0-9_.\-/]+):", text)
        if m is None:
            continue
        if m.group(1):  # a list item's first key belongs to the list
            indent += len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = any(doc for _, doc in stack)
        if not (comment or inherited):
            is_section = not text.split(":", 1)[1].strip()  # a map whose keys are documented one by one
            if not is_section:
                undocumented.append(text)
        stack.append((indent, comment or inherited))
        comment = False
    assert not undocumented, undocumented


# --- rendered objects -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_drafter_pools_and_verifier_are_separate_workloads(name):
    objs, vals = objects(name), values(name)
    ws = workloads(objs)
    pools = vals["drafter"]["pools"]
    drafters = {n: w for n, w in ws.items() if component(w) == "drafter"}
    assert all(w["kind"] == "Deployment" for w in drafters.values())
    assert sorted(drafters) == sorted(f"{FULL}-drafter-{p['name']}" for p in pools)
    verifiers = [w for w in ws.values() if component(w) == "verifier"]
    assert [w["kind"] for w in verifiers] == ["StatefulSet"]
    assert verifiers[0]["spec"]["replicas"] == vals["verifier"]["replicas"]
    # no workload's selector picks another workload's pods: each pool scales alone
    for n, w in ws.items():
        for other, o in ws.items():
            assert matches(w["spec"]["selector"], pod_labels(o)) == (n == other), (n, other)
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    targets = {h["spec"]["scaleTargetRef"]["name"]: h for h in hpas.values()}
    assert len(targets) == len(hpas)  # one workload per HPA
    for h in hpas.values():
        ref = h["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ws[ref["name"]]["kind"] == "Deployment"
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"] and h["spec"]["metrics"]
    assert verifiers[0]["metadata"]["name"] not in targets  # a fixed verifier list (see values.yaml)
    for so in by_kind(objs, "ScaledObject").values():  # a pool scaled by KEDA: KEDA makes its HPA
        assert so["spec"]["scaleTargetRef"]["name"] not in targets
        targets[so["spec"]["scaleTargetRef"]["name"]] = so
    for n, w in drafters.items():
        pool = next(p for p in pools if n.endswith(f"-drafter-{p['name']}"))
        scaled = pool.get("autoscaling", {}).get("enabled", vals["drafter"]["autoscaling"]["enabled"])
        assert (n in targets) == scaled and ("replicas" in w["spec"]) == (not scaled)
    # the load metrics of gpu-two-pools: test_drafter_autoscaling_on_load
    if name != "static":
        assert f"{FULL}-gateway" in targets and len(targets) == 1 + len(pools)
    else:
        assert not hpas


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pdbs_select_exactly_one_workload(name):
    objs = objects(name)
    ws = workloads(objs)
    pdbs = by_kind(objs, "PodDisruptionBudget")
    for n, pdb in pdbs.items():
        assert [w for w, o in ws.items() if matches(pdb["spec"]["selector"], pod_labels(o))] == [n]
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    expected = 0 if name == "static" else 2 + len(values(name)["drafter"]["pools"])
    assert len(pdbs) == expected


def _security(pod_spec: dict, container: dict) -> dict:
    return {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_has_probes_resources_and_runs_as_non_root(name):
    objs = objects(name)
    pods = [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in workloads(objs).values()]
    tests = [(p["metadata"]["name"], p["spec"]) for p in by_kind(objs, "Pod").values()]
    assert len(pods) >= 4 - (not values(name)["redis"]["enabled"]) and len(tests) == 1
    for owner, spec in pods + tests:
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{owner}/{c['name']}"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}), where
            sec = _security(spec, c)
            assert sec.get("runAsNonRoot") is True and sec.get("runAsUser", 0) != 0, where
            assert sec.get("allowPrivilegeEscalation") is False and "ALL" in sec["capabilities"]["drop"], where
            assert sec.get("readOnlyRootFilesystem") is True, where
            # a token only where the API is called: the gateway under discovery kubernetes
            api = owner == f"{FULL}-gateway" and values(name)["gateway"]["discovery"] == "kubernetes"
            assert spec.get("automountServiceAccountToken") is api, where
    for owner, spec in pods:
        for c in spec["containers"]:
            where = f"{owner}/{c['name']}"
            assert all(p in c for p in ("startupProbe", "livenessProbe", "readinessProbe")), where
            if c["name"] != "redis":  # the crossdraft services answer grpc.health.v1 on their gRPC port
                port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
                for p in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if values(name)["tls"]["enabled"]:  # gRPC probes speak only plaintext: the TLS healthcheck
                        assert c[p]["exec"]["command"] == ["python", "/opt/crossdraft/bin/crossdraft-healthcheck"]
                        assert "grpc" not in c[p], (where, p)
                    else:
                        assert c[p]["grpc"] == {"port": port}, (where, p)
                grace = float(flag(c["args"], "grace"))
                assert spec["terminationGracePeriodSeconds"] >= grace + 10, where  # --grace fits before SIGKILL
                budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
                assert budget >= {"gateway": 60, "drafter": 300, "verifier": 900}[c["name"]], (where, budget)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gpu_only_where_configured(name):
    objs, vals = objects(name), values(name)
    sts = by_kind(objs, "StatefulSet")[f"{FULL}-verifier"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    gpu = vals["verifier"]["gpu"]
    if gpu:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpu
        assert flag(c["args"], "device") == "cuda" and c["image"].endswith("-cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in sts["spec"]["template"]["spec"]["tolerations"])
        claims = sts["spec"]["volumeClaimTemplates"]
        assert [t["metadata"]["name"] for t in claims] == ["cache"]
    else:
        assert "nvidia.com/gpu" not in render(name)
        assert flag(c["args"], "device") == "cpu" and not c["image"].endswith("-cuda")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_secret_value_in_plain_text(name):
    text, objs = render(name), objects(name)
    for w in list(workloads(objs).values()) + list(by_kind(objs, "Pod").values()):
        spec = w["spec"]["template"]["spec"] if "template" in w["spec"] else w["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (w["metadata"]["name"], e)
            for arg in c.get("command", []) + c.get("args", []):
                assert not re.search(r"://[^/@\s]*:[^/@\s]*@", str(arg)), arg  # no password in a URL
                assert not re.search(r"--requirepass\s+(?!\"\$REDIS_PASSWORD\")", str(arg)), arg
    assert not by_kind(objs, "ConfigMap")
    # a generated password appears once: in its Secret
    for s in by_kind(objs, "Secret").values():
        for key, b64 in s["data"].items():
            plain = base64.b64decode(b64).decode()
            assert len(plain) >= 32 and text.count(plain) == 0 and text.count(b64) == 1, key
    vals = values(name)
    gw = by_kind(objs, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    pw = {e["name"]: e for e in gw["env"]}.get("CROSSDRAFT_REDIS_PASSWORD")
    if vals["redis"]["enabled"]:
        secret = vals["redis"]["auth"]["existingSecret"] or f"{FULL}-redis"
        assert pw["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "redis-password"}
        assert (f"{FULL}-redis" in by_kind(objs, "Secret")) == (not vals["redis"]["auth"]["existingSecret"])
    else:
        ext = vals["redis"]["external"]
        assert pw["valueFrom"]["secretKeyRef"] == {"name": ext["existingSecret"], "key": ext["existingSecretPasswordKey"]}
        assert flag(gw["args"], "redis") == ext["url"] and f"{FULL}-redis" not in by_kind(objs, "Secret")
    token = vals["models"]["hub"]["tokenSecret"]
    for w, c in crossdraft_containers(objs):
        env = {e["name"]: e for e in c["env"]}
        if component(w) in ("drafter", "verifier") and token:
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": token, "key": vals["models"]["hub"]["tokenSecretKey"]}
        else:
            assert "HF_TOKEN" not in env


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_command_line_parses_with_the_cli(name):
    from crossdraft.cli import build_parser

    parser = build_parser()
    seen = set()
    for w, c in crossdraft_containers(objects(name)):
        args = parser.parse_args(c["args"])  # argparse exits (SystemExit) on an unknown or bad flag
        assert (args.command, args.role) == ("serve", c["name"]) and args.host == "0.0.0.0"
        assert args.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        if args.role != "gateway":
            metrics = [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"]
            assert metrics == ([args.metrics_port] if args.metrics_port else [])
            assert args.threads >= 1  # not all the node's cores in a pod with a CPU share
        seen.add(args.role)
    assert seen == {"gateway", "drafter", "verifier"}
    # the helm test pod: `crossdraft generate --gateway ...` with its env substituted
    pod = next(iter(by_kind(objects(name), "Pod").values()))
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    line = next(part for part in c["args"][0].split(";") if "crossdraft generate" in part)
    words = shlex.split(re.sub(r'"\$(\w+)"', lambda m: shlex.quote(env[m.group(1)]), line.split("$(", 1)[1].rstrip(")")))
    args = parser.parse_args(words[1:])
    assert args.command == "generate" and args.json and args.gateway == f"{FULL}-gateway.{NAMESPACE}.svc.cluster.local:50050"
    assert args.prompt == values(name)["tests"]["prompt"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gateway_is_given_the_rendered_pools(name):
    """Under each gateway.discovery mode the gateway's pool flags name the rendered Services: kubernetes,
    SERVICE:grpc (a port of that Service); dns, the headless Services' names (drafter pools and every
    verifier); static, the drafter pools' names and each verifier pod's stable name."""
    from gateway.pool import parse_addresses

    objs, vals = objects(name), values(name)
    services, ws = by_kind(objs, "Service"), workloads(objs)
    gw = by_kind(objs, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    mode = vals["gateway"]["discovery"]
    assert flag(gw["args"], "discovery") == mode
    suffix = f".{NAMESPACE}.svc.cluster.local"

    def service_of(addr: str) -> tuple:
        host, port = addr.rsplit(":", 1)
        if mode == "kubernetes":
            svc = services[host]
            assert port in [p["name"] for p in svc["spec"]["ports"]]
        else:
            assert host.endswith(suffix)
            svc = services[host.removesuffix(suffix)]
            assert int(port) in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        return svc

    drafters = parse_addresses(flag(gw["args"], "drafters"), "--drafters")
    assert len(drafters) == len(vals["drafter"]["pools"])
    for addr in drafters:
        svc = service_of(addr)
        assert svc["spec"]["clusterIP"] == "None"
        chosen = [n for n, w in ws.items() if matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert len(chosen) == 1 and component(ws[chosen[0]]) == "drafter"
    sts = ws[f"{FULL}-verifier"]
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and matches({"matchLabels": headless["spec"]["selector"]}, pod_labels(sts))
    verifiers = parse_addresses(flag(gw["args"], "verifiers"), "--verifiers")
    if mode == "static":
        assert verifiers == [f"{FULL}-verifier-{i}.{headless['metadata']['name']}{suffix}:{vals['verifier']['port']}"
                             for i in range(sts["spec"]["replicas"])]
    else:
        assert [service_of(a)["metadata"]["name"] for a in verifiers] == [headless["metadata"]["name"]]
    if mode == "kubernetes":
        assert flag(gw["args"], "kube-namespace") == NAMESPACE
    if vals["redis"]["enabled"]:
        assert flag(gw["args"], "redis") == f"redis://{FULL}-redis{suffix}:6379/0"
        assert f"{FULL}-redis" in services


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gateway_service_exposes_the_http_api(name):
    """The HTTP API's port: --http-port on the gateway, a named container port, a Service port on it
    (and no trace of it with gateway.httpPort 0)."""
    objs, vals = objects(name), values(name)
    gw = by_kind(objs, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    svc = by_kind(objs, "Service")[f"{FULL}-gateway"]
    port = vals["gateway"]["httpPort"]
    assert port and int(flag(gw["args"], "http-port")) == port
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in gw["ports"]
    http = [p for p in svc["spec"]["ports"] if p["name"] == "http"]
    assert len(http) == 1 and http[0]["targetPort"] == "http" and http[0]["port"] == vals["gateway"]["service"]["httpPort"]
    off = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                                              *values_args(name), "--set", "gateway.httpPort=0").stdout) if d]
    gw_off = by_kind(off, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in gw_off["args"] if a.startswith("--http-port")]
    assert [p["name"] for p in by_kind(off, "Service")[f"{FULL}-gateway"]["spec"]["ports"]] == ["grpc"]


def _allowed_sources(objs: list, target: dict, port: int) -> set:
    """Names of the workloads whose pods the NetworkPolicies let reach `target` on `port` ('*': any)."""
    ws = workloads(objs)
    policies = [p for p in by_kind(objs, "NetworkPolicy").values()
                if matches(p["spec"]["podSelector"], pod_labels(target))]
    assert policies, target["metadata"]["name"]
    out = set()
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            if "ports" in rule and port not in [r["port"] for r in rule["ports"]]:
                continue
            if "from" not in rule:
                out.add("*")
                continue
            for peer in rule["from"]:
                if set(peer) == {"podSelector"}:
                    out |= {n for n, w in ws.items() if matches(peer["podSelector"], pod_labels(w))}
                    if matches(peer["podSelector"], {**pod_labels(target), "app.kubernetes.io/component": "test"}):
                        out.add("helm-test")
                else:
                    out.add("peer:" + json.dumps(peer, sort_keys=True))
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policies_are_on_and_let_only_the_right_roles_through(name):
    """Secure by default (docs/threat-model.md): in every value set, the chart's defaults included, only
    the gateway reaches the drafters and Redis, only the gateway and the drafters reach the verifiers, and
    the metrics ports are open to `metricsFrom` (any source when empty)."""
    objs, vals = objects(name), values(name)
    ws = workloads(objs)
    gw, redis, verifier = f"{FULL}-gateway", f"{FULL}-redis", f"{FULL}-verifier"
    drafters = {n for n, w in ws.items() if component(w) == "drafter"}
    assert len(drafters) == len(vals["drafter"]["pools"])
    metrics_from = vals["networkPolicy"]["metricsFrom"]
    for d in drafters:
        assert _allowed_sources(objs, ws[d], 50052) == {gw}
        assert _allowed_sources(objs, ws[d], 50051) == set()  # no rule opens a drafter's other ports
        monitoring = _allowed_sources(objs, ws[d], 9090)
        if not vals["metrics"]["enabled"]:
            assert monitoring == set()
        elif metrics_from:
            assert len(monitoring) == 1 and "monitoring" in next(iter(monitoring))
        else:
            assert monitoring == {"*"}
    assert _allowed_sources(objs, ws[verifier], 50051) == {gw} | drafters
    if vals["redis"]["enabled"]:
        assert _allowed_sources(objs, ws[redis], 6379) == {gw}
    gateway_from = _allowed_sources(objs, ws[gw], 50050)
    if vals["networkPolicy"]["gatewayFrom"]:
        assert "helm-test" in gateway_from and any("clients" in s for s in gateway_from) and len(gateway_from) == 2
    else:
        assert gateway_from == {"*"}
    if vals["gateway"].get("httpPort"):  # the OpenAI-compatible HTTP port: the same clients as gRPC
        assert _allowed_sources(objs, ws[gw], vals["gateway"]["httpPort"]) == gateway_from


def test_network_policies_can_be_turned_off():
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "networkPolicy.enabled=false").stdout
    assert not by_kind([d for d in yaml.safe_load_all(out) if d], "NetworkPolicy")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_drafters_may_dial_the_release_verifiers_and_nothing_else(name):
    """Each drafter's --allowed-verifiers allows every verifier address the gateway is given (and the
    StatefulSet's other pod names, should replicas change), and refuses anything else a session could name.
    Under `discovery: kubernetes` the gateway is given the verifiers' Service and port name and dials the
    pod IPs of its EndpointSlices: the drafter allows them through the Service's DNS name (a headless
    Service resolves to those pods), which is what is checked for such an entry."""
    from drafter_service.allowed import AllowedVerifiers
    from gateway.pool import parse_addresses

    objs, vals = objects(name), values(name)
    gw = by_kind(objs, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    drafters = parse_addresses(flag(gw["args"], "drafters"), "--drafters")
    port, suffix = vals["verifier"]["port"], f".{NAMESPACE}.svc.cluster.local"
    verifiers = [a if a.rpartition(":")[2].isdigit() else f"{a.rpartition(':')[0]}{suffix}:{port}"
                 for a in parse_addresses(flag(gw["args"], "verifiers"), "--verifiers")]
    others = [*drafters, f"{FULL}-redis{suffix}:6379", f"{FULL}-verifier-0.{FULL}-verifier.other.svc.cluster.local:{port}",
              f"{FULL}-verifier-0.{FULL}-verifier{suffix}:{port + 1}", "evil.example.com:443", "169.254.169.254:80"]
    seen = 0
    for w, c in crossdraft_containers(objs):
        if c["name"] != "drafter":
            continue
        allowed = AllowedVerifiers.parse(flag(c["args"], "allowed-verifiers"))
        assert all(allowed.allows(a) for a in verifiers + [f"{FULL}-verifier-9.{FULL}-verifier{suffix}:{port}"])
        assert not any(allowed.allows(a) for a in others), [a for a in others if allowed.allows(a)]
        seen += 1
    assert seen == len(vals["drafter"]["pools"])


def test_more_allowed_verifiers_from_values():
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set-json",
               'networkPolicy.extraAllowedVerifiers=["verifier.other-team.svc:50051","*.gpu.internal:*"]').stdout
    from drafter_service.allowed import AllowedVerifiers

    (c,) = [c for _, c in crossdraft_containers([d for d in yaml.safe_load_all(out) if d]) if c["name"] == "drafter"]
    allowed = AllowedVerifiers.parse(flag(c["args"], "allowed-verifiers"))
    assert allowed.allows("verifier.other-team.svc:50051") and allowed.allows("a.gpu.internal:1")
    assert not allowed.allows("verifier.other-team.svc:50052")


def test_service_monitor_scrapes_drafters_and_verifiers():
    objs = objects("gpu-two-pools")
    (sm,) = by_kind(objs, "ServiceMonitor").values()
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    scraped = {n for n, s in by_kind(objs, "Service").items() if matches(sm["spec"]["selector"], s["metadata"]["labels"])}
    assert scraped == {f"{FULL}-drafter-spm4k", f"{FULL}-drafter-bpe2k", f"{FULL}-verifier"}
    for n in scraped:
        assert "metrics" in [p["name"] for p in by_kind(objs, "Service")[n]["spec"]["ports"]]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert not by_kind(objects("default"), "ServiceMonitor")
    for name in ("default", "gpu-two-pools"):  # pod annotations for annotation-based scraping
        for w in workloads(objects(name)).values():
            ann = w["spec"]["template"]["metadata"].get("annotations", {})
            assert (ann.get("prometheus.io/scrape") == "true") == (component(w) in ("drafter", "verifier"))
    assert "prometheus.io/scrape" not in render("static") and "--metrics-port=0" in render("static")


def test_least_privilege_service_accounts():
    """The pods' shared ServiceAccount has no permission and no token. With gateway.discovery kubernetes
    the gateway alone runs as its own ServiceAccount, with a token and one Role: get, list and watch on
    endpointslices in the release's namespace, nothing else; with dns or static, no Role at all."""
    seen = set()
    for name in VALUE_SETS:
        objs, mode = objects(name), values(name)["gateway"]["discovery"]
        seen.add(mode)
        shared = by_kind(objs, "ServiceAccount")[FULL]
        assert shared["automountServiceAccountToken"] is False
        assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in objs)
        roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
        for wname, w in workloads(objs).items():
            spec = w["spec"]["template"]["spec"]
            if component(w) == "gateway" and mode == "kubernetes":
                assert spec["serviceAccountName"] == f"{FULL}-gateway" and spec["automountServiceAccountToken"] is True
            else:
                assert spec["serviceAccountName"] == FULL and spec["automountServiceAccountToken"] is False, wname
        if mode != "kubernetes":
            assert not roles and not bindings
            continue
        (role,) = roles.values()
        assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                  "verbs": ["get", "list", "watch"]}]
        (binding,) = bindings.values()
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-gateway", "namespace": NAMESPACE}]
    assert seen == {"static", "dns", "kubernetes"}


def test_drafter_autoscaling_on_load():
    """CPU by default; targetSessionsPerPod adds the Pods metric crossdraft_sessions_active (Prometheus
    adapter); with keda, a ScaledObject on the same load (and CPU) replaces the pool's HPA."""
    hpas = by_kind(objects("default"), "HorizontalPodAutoscaler")
    metrics = hpas[f"{FULL}-drafter-smollm2"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource"] and metrics[0]["resource"]["name"] == "cpu"
    objs = objects("gpu-two-pools")
    hpas, scaled = by_kind(objs, "HorizontalPodAutoscaler"), by_kind(objs, "ScaledObject")
    assert f"{FULL}-drafter-spm4k" not in hpas  # KEDA owns that pool's HPA
    (pods,) = hpas[f"{FULL}-drafter-bpe2k"]["spec"]["metrics"]  # CPU off: the load alone
    assert pods == {"type": "Pods", "pods": {"metric": {"name": "crossdraft_sessions_active",
                                                        "selector": {"matchLabels": {"role": "drafter"}}},
                                             "target": {"type": "AverageValue", "averageValue": "8"}}}
    so = scaled[f"{FULL}-drafter-spm4k"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == f"{FULL}-drafter-spm4k" in by_kind(objs, "Deployment")
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (2, 10)
    prom, cpu = so["spec"]["triggers"]
    assert prom["type"] == "prometheus" and prom["metadata"]["threshold"] == "4"
    assert f'namespace="{NAMESPACE}"' in prom["metadata"]["query"] and f"{FULL}-drafter-spm4k-" in prom["metadata"]["query"]
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
    proc = helm("template", RELEASE, str(CHART), "--set", "drafter.autoscaling.keda.enabled=true", check=False)
    assert proc.returncode != 0 and "targetSessionsPerPod" in proc.stderr


def test_models_from_a_pvc_or_the_hub():
    objs = objects("gpu-two-pools")
    for w, c in crossdraft_containers(objs):
        if component(w) == "gateway":
            continue
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert vols["models"]["persistentVolumeClaim"] == {"claimName": "crossdraft-models", "readOnly": True}
        assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
        assert flag(c["args"], "model").startswith("/models/")
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
    for w, c in crossdraft_containers(objects("default")):
        if component(w) != "gateway":
            assert "models" not in {m["name"] for m in c["volumeMounts"]}
            assert "/" in flag(c["args"], "model") and not flag(c["args"], "model").startswith("/")  # a Hub id
            assert {"name": "HF_HOME", "value": "/cache/huggingface"} in c["env"]


def test_notes_show_a_grpcurl_call_of_a_real_method():
    from crossdraft.v1 import gateway_pb2

    out = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    m = re.search(r"grpcurl -plaintext -d '(\{.*?\})'.*?\n\s*127\.0\.0\.1:50050 (\S+)/(\w+)", notes, re.S)
    assert m, notes
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    assert m.group(2) == service.full_name and service.methods_by_name.get(m.group(3)) is not None
    assert json.loads(m.group(1))["spec"]["prompt"]
    assert f"port-forward svc/{FULL}-gateway 50050:50050" in notes and f"helm test {RELEASE}" in notes


# --- the bundled Redis's command and the gateway's password, for real ---------------------------------

def test_redis_url_with_password_from_env():
    from crossdraft.cli import redis_url_with_password
    from crossdraft.errors import InvalidArgument

    env = {"CROSSDRAFT_REDIS_PASSWORD": "p@ss:/w rd%"}
    assert redis_url_with_password("redis://h:6379/0", {}) == "redis://h:6379/0"
    assert redis_url_with_password(None, env) is None
    url = redis_url_with_password("rediss://alice@h:6380/2", env)
    assert url == "rediss://alice:p%40ss%3A%2Fw%20rd%25@h:6380/2"
    import redis

    kw = redis.Redis.from_url(url).connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["host"], kw["port"], kw["db"]) == ("alice", env["CROSSDRAFT_REDIS_PASSWORD"], "h", 6380, 2)
    with pytest.raises(InvalidArgument):
        redis_url_with_password("redis://:other@h:6379/0", env)


def _free_port() -> int:
    from crossdraft.local_cluster import free_port

    return free_port()


def test_bundled_redis_command_and_the_gateway_password_path(tmp_path, caplog):
    """Runs the rendered Redis container command (with a password full of shell and URL metacharacters)
    against a real redis-server, its probe command, and the gateway's store through
    $CROSSDRAFT_REDIS_PASSWORD: the password works, is not in the process title, and is not logged."""
    from redis_fixture import redis_server_binary

    from crossdraft.cli import redis_url_with_password
    from crossdraft.errors import Unavailable
    from gateway.server import make_store

    binary = redis_server_binary()
    redis = by_kind(objects("default"), "StatefulSet")[f"{FULL}-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"] == ["sh", "-c"]
    script, arg0 = redis["args"][0], redis["args"][1]
    assert "--appendonly yes" in script and '--requirepass "$REDIS_PASSWORD"' in script
    assert "exec redis-server " in script and " --dir /data " in script  # the pod's PVC
    script = script.replace("exec redis-server", f"exec {shlex.quote(binary)}").replace("/data", str(tmp_path))
    password = "p@ss w:rd/$(id)`id`\"'%"
    port = _free_port()
    proc = subprocess.Popen(["sh", "-c", script, arg0, "--port", str(port), "--bind", "127.0.0.1"],
                            env={**os.environ, "REDIS_PASSWORD": password}, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT)
    try:
        import redis as redis_py

        client = redis_py.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis_py.exceptions.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("crossdraft:test", "1")
        assert list(tmp_path.glob("appendonlydir/*.aof"))  # AOF persistence in the data directory
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # no retries, unlike redis-py
            sock.sendall(b"PING\r\nAUTH wrong\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += sock.recv(256) or b"\r\n\r\n"
        assert reply.startswith(b"-NOAUTH") and b"-WRONGPASS" in reply, reply
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()  # redis-server replaced its process title
        # the readiness probe, as rendered, with the Secret in REDISCLI_AUTH as the pod has it
        probe = redis["readinessProbe"]["exec"]["command"]
        if shutil.which("redis-cli"):
            probe = [probe[0], probe[1], probe[2].replace("-p 6379", f"-p {port}")]
            env = {**os.environ, "REDISCLI_AUTH": password}
            assert subprocess.run(probe, env=env, timeout=10).returncode == 0
            env.pop("REDISCLI_AUTH")
            assert subprocess.run(probe, env=env, timeout=10).returncode != 0
        # the gateway: --redis without a password, the password from the env var the chart sets
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(Unavailable):
            make_store(url, 60)
        with caplog.at_level(logging.INFO, logger="crossdraft.gateway"):
            store = make_store(redis_url_with_password(url, {"CROSSDRAFT_REDIS_PASSWORD": password}), 60)
        try:
            assert store.ping()
            assert caplog.records and all("p@ss" not in r.getMessage() and "p%40ss" not in r.getMessage()
                                          for r in caplog.records)
        finally:
            store.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- what the chart relies on in the services: a pool behind one DNS name ---------------------------------

class _NamedDrafter:
    """A DrafterService that answers GetInfo with its name and streams RunSession for `stream_s` seconds,
    recording the client connection (peer) of each call."""

    def __init__(self, name: str, stream_s: float = 0.0):
        self.name, self.stream_s, self.peers = name, stream_s, []

    def servicer(self):
        from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc

        outer = self

        class Servicer(drafter_pb2_grpc.DrafterServiceServicer):
            metrics = None

            def GetInfo(self, request, context):
                outer.peers.append(context.peer())
                return drafter_pb2.DrafterServiceGetInfoResponse(model_id=outer.name)

            def RunSession(self, request, context):
                for _ in range(int(outer.stream_s / 0.05)):
                    time.sleep(0.05)
                    yield drafter_pb2.RunSessionResponse()

        return Servicer()


def _serve(fake):
    from crossdraft.serving.service import Service
    from crossdraft.v1 import drafter_pb2_grpc

    svc = Service("crossdraft.v1.DrafterService", drafter_pb2_grpc.add_DrafterServiceServicer_to_server,
                  fake.servicer(), "127.0.0.1", 0, grace_s=0)
    svc.start(handle_signals=False)
    return svc


def test_gateway_pool_spreads_sessions_over_the_replicas_behind_one_address():
    """A drafter pool is one headless Service name with several pods behind it: the gateway's channel must
    use them all (round_robin), not only the first (gRPC's default pick_first)."""
    from crossdraft.v1 import drafter_pb2
    from gateway.pool import Pool

    fakes = [_NamedDrafter("a"), _NamedDrafter("b")]
    svcs = [_serve(f) for f in fakes]
    try:
        address = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in svcs)  # one name, two addresses, as DNS gives
        pool = Pool("drafter", [address])
        answers = [pool.drafter_stub(address).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5).model_id
                   for _ in range(10)]
        pool.close()
        assert min(answers.count("a"), answers.count("b")) >= 3, answers  # pick_first: all "a"
    finally:
        for s in svcs:
            s.server.stop(0).wait()


def test_services_recycle_connections_so_clients_find_new_replicas(monkeypatch):
    """A client reconnects (and so re-resolves a pool's DNS name) after MAX_CONNECTION_AGE_S, while a
    call in flight, such as a session's stream, runs to its end."""
    import grpc

    import crossdraft.serving.service as common
    from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc

    monkeypatch.setattr(common, "MAX_CONNECTION_AGE_S", 0.3)
    fake = _NamedDrafter("a", stream_s=1.2)
    svc = _serve(fake)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            stub.GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5)
            streamed = sum(1 for _ in stub.RunSession(drafter_pb2.RunSessionRequest(), timeout=10))  # 4x the age
            stub.GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5)
        assert streamed == int(1.2 / 0.05)
        assert len(fake.peers) == 2 and fake.peers[0] != fake.peers[1]  # a new connection (client port)
    finally:
        svc.server.stop(0).wait()


def test_readme_values_example_renders(tmp_path):
    """The values file the README's "Install on Kubernetes" shows is valid and does what it says."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install on Kubernetes"):]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "my-values.yaml"
    path.write_text(example)
    objs = [d for d in yaml.safe_load_all(helm("template", "cd", str(CHART), "-n", "ml", "-f", str(path)).stdout) if d]
    ws = workloads(objs)
    assert "cd-crossdraft-drafter-smollm2" in ws  # the name `kubectl scale` and `get hpa` use there
    assert "cd-crossdraft-drafter-smollm2" in by_kind(objs, "HorizontalPodAutoscaler")
    c = ws["cd-crossdraft-verifier"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example.com/crossdraft:0.1.0-cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "svc/cd-crossdraft-gateway 50050:50050" in section and "cd-crossdraft-gateway" in by_kind(objs, "Service")


# --- TLS and API keys (issue 6) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_tls_flags_secrets_and_api_keys(name):
    """Without `tls.enabled` every role runs with --insecure (the pods listen on 0.0.0.0, where crossdraft
    refuses plaintext unless asked); with it, each role mounts its certificate Secret and gets the TLS
    flags. `gateway.auth.existingSecret` mounts the hashed keys file and passes the per-key limits; the
    helm test pod then reads a raw key from its own Secret, through the environment."""
    from crossdraft.cli import build_parser

    objs, vals = objects(name), values(name)
    t, auth = vals["tls"], vals["gateway"]["auth"]
    parser = build_parser()
    for w, c in crossdraft_containers(objs):
        role = component(w)
        a = parser.parse_args(c["args"])
        spec = w["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        if t["enabled"]:
            assert not a.insecure and a.tls_server_name == t["serverName"]
            assert (a.tls_cert, a.tls_key, a.tls_ca) == ("/etc/crossdraft/tls/tls.crt", "/etc/crossdraft/tls/tls.key",
                                                         "/etc/crossdraft/tls/ca.crt")
            assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/crossdraft/tls", "readOnly": True}
            assert vols["tls"]["secret"]["secretName"] == (t["secrets"][role] or t["existingSecret"])
        else:
            assert a.insecure and not (a.tls_cert or a.tls_ca) and "tls" not in vols
        if role == "gateway":
            if auth["existingSecret"]:
                assert a.api_keys == "/etc/crossdraft/auth/api-keys"
                assert (a.key_max_sessions, a.key_requests_per_minute) == (auth["maxSessionsPerKey"],
                                                                           auth["requestsPerMinutePerKey"])
                assert vols["api-keys"]["secret"]["secretName"] == auth["existingSecret"]
                assert vols["api-keys"]["secret"]["items"] == [{"key": auth["existingSecretKey"], "path": "api-keys"}]
            else:
                assert a.api_keys is None and "api-keys" not in vols
    pod = next(iter(by_kind(objs, "Pod").values()))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    if auth["testKeySecret"]:
        assert env["CROSSDRAFT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": auth["testKeySecret"],
                                                                          "key": auth["testKeySecretKey"]}
    assert ("--tls-ca /etc/crossdraft/tls/ca.crt" in pod["spec"]["containers"][0]["args"][0]) == t["enabled"]


def test_tls_and_auth_need_their_secrets(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("tls: {enabled: true}\n")
    out = helm("template", RELEASE, str(CHART), "-f", str(f), check=False)
    assert out.returncode != 0 and "tls.existingSecret" in out.stderr
    f.write_text("gateway: {auth: {existingSecret: keys}}\n")
    out = helm("template", RELEASE, str(CHART), "-f", str(f), check=False)
    assert out.returncode != 0 and "testKeySecret" in out.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_verdict_key_reaches_gateways_and_verifiers_never_drafters(name):
    """The key verifiers seal verdicts with (crossdraft/seal.py): in the gateway and the verifiers, as a
    file from a Secret; a drafter pod neither mounts it nor names it, so it cannot forge a delta."""
    objs = objects(name)
    secret = f"{FULL}-verdict-key"
    assert secret in by_kind(objs, "Secret")
    for w in workloads(objs).values():
        role = component(w)
        if role not in ("gateway", "drafter", "verifier"):
            continue
        pod = w["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == role]
        mounted = [v for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == secret]
        if role == "drafter":
            assert not mounted and secret not in json.dumps(w) and "verdict" not in json.dumps(c)
        else:
            assert len(mounted) == 1 and flag(c["args"], "verdict-key-file") == "/etc/crossdraft/verdict/key"
            assert any(m["mountPath"] == "/etc/crossdraft/verdict" and m["readOnly"] for m in c["volumeMounts"])


def objects_with(sets: list) -> list:
    return [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *sets).stdout)
            if d]


def test_the_verdict_key_can_be_off_or_from_an_existing_secret():
    off = objects_with(["--set", "verdictKey.enabled=false"])
    assert "--verdict-key-file" not in json.dumps(off) and f"{FULL}-verdict-key" not in by_kind(off, "Secret")
    mine = objects_with(["--set", "verdictKey.existingSecret=mykey"])
    assert f"{FULL}-verdict-key" not in by_kind(mine, "Secret")
    assert '"secretName": "mykey"' in json.dumps(mine)
