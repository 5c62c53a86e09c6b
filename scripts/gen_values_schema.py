"""Write helm/crossdraft/values.schema.json, the JSON schema (draft-07) Helm checks the chart's values against.

The schema is generated so that the shapes every role shares (image, resources, probes, autoscaling, PDB,
placement) are written once; tests/test_helm.py checks that the committed file is this script's output and
that it has the same keys as values.yaml. Run it after changing values.yaml:

    python3 scripts/gen_values_schema.py
"""
import argparse
import copy
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "helm" / "crossdraft" / "values.schema.json"



# shorthands for the JSON schema nodes below
def s(**kw):
    return {"type": "string", **kw}


def i(**kw):
    return {"type": "integer", **kw}


def b(**kw):
    return {"type": "boolean", **kw}


def obj(props, required=(), extra=False, **kw):
    """An object with these properties and, unless `extra`, no others (a typo in values fails)."""
    o = {"type": "object", "properties": props, "additionalProperties": extra, **kw}
    if required:
        o["required"] = list(required)
    return o


def ref(name):
    return {"$ref": f"#/definitions/{name}"}


def maplike(desc):
    """A Kubernetes object passed through as it is (affinity, security context, ...)."""
    return {"type": "object", "description": desc}


def strmap(desc):
    return {"type": "object", "additionalProperties": {"type": "string"}, "description": desc}


def lst(desc, items=None):
    return {"type": "array", "description": desc, **({"items": items} if items else {})}


definitions = {
    "port": i(minimum=1, maximum=65535),
    "quantity": {"type": ["string", "integer", "number"], "description": "a Kubernetes quantity, e.g. 500m, 2Gi"},
    "name": s(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63),
    "intOrPercent": {"anyOf": [i(minimum=0), s(pattern="^([0-9]+%?)?$")]},
    "roleImage": obj({"repository": s(), "tag": s(), "pullPolicy": s(enum=["", "Always", "IfNotPresent", "Never"])},
                     description="image fields of one role; empty ones fall back to the global image"),
    "resources": obj({"requests": {"type": "object", "additionalProperties": ref("quantity")},
                      "limits": {"type": "object", "additionalProperties": ref("quantity")},
                      "claims": {"type": "array"}}, description="container resources"),
    "probe": obj({"initialDelaySeconds": i(minimum=0), "periodSeconds": i(minimum=1),
                  "timeoutSeconds": i(minimum=1), "successThreshold": i(minimum=1),
                  "failureThreshold": i(minimum=1), "terminationGracePeriodSeconds": i(minimum=1)},
                 description="settings merged into a gRPC probe"),
    "autoscaling": obj({"enabled": b(), "minReplicas": i(minimum=1), "maxReplicas": i(minimum=1),
                        "targetCPUUtilizationPercentage": i(minimum=0, maximum=1000),
                        "metrics": lst("autoscaling/v2 metric specs", {"type": "object"}),
                        "behavior": maplike("HPA behavior")}),
    "drafterAutoscaling": obj({"enabled": b(), "minReplicas": i(minimum=1), "maxReplicas": i(minimum=1),
                               "targetCPUUtilizationPercentage": i(minimum=0, maximum=1000),
                               "targetSessionsPerPod": {"type": ["integer", "number", "string"],
                                                        "description": "0: off; a quantity"},
                               "keda": obj({"enabled": b(), "serverAddress": s(), "query": s()}),
                               "metrics": lst("autoscaling/v2 metric specs", {"type": "object"}),
                               "behavior": maplike("HPA behavior")}),
    "pdb": obj({"enabled": b(), "maxUnavailable": ref("intOrPercent"), "minAvailable": ref("intOrPercent")}),
    "env": lst("container env entries", obj({"name": s(minLength=1)}, required=["name"], extra=True)),
    "args": lst("extra arguments", {"type": ["string", "number", "integer", "boolean"]}),
    "tolerations": lst("tolerations", {"type": "object"}),
}

placement = {
    "nodeSelector": strmap("node labels the pods must match"),
    "tolerations": ref("tolerations"),
    "affinity": maplike("pod affinity"),
    "topologySpreadConstraints": lst("topology spread constraints", {"type": "object"}),
    "podAnnotations": strmap("pod annotations"),
    "podLabels": strmap("pod labels"),
    "extraEnv": ref("env"),
    "extraArgs": ref("args"),
}
probes = {"startupProbe": ref("probe"), "livenessProbe": ref("probe"), "readinessProbe": ref("probe")}

model_role = {
    "image": ref("roleImage"),
    "replicas": i(minimum=0),
    "port": ref("port"),
    "gpu": i(minimum=0),
    "gpuResourceName": s(minLength=1),
    "device": s(pattern="^(|cpu|cuda|cuda:[0-9]+|auto)$"),
    "threads": i(minimum=0),
    "maxSessions": i(minimum=1, maximum=4096),
    "graceSeconds": i(minimum=0),
    "resources": ref("resources"),
    "pdb": ref("pdb"),
    **probes, **placement,
}
drafter_defaults = {**model_role, "autoscaling": ref("drafterAutoscaling")}
pool = obj({"name": s(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=20), "model": s(minLength=1),
            **copy.deepcopy(drafter_defaults)}, required=["name", "model"],
           description="a drafter pool: a name, a model, and any drafter default overridden")
drafter = obj({"pools": {"type": "array", "minItems": 1, "items": pool}, **drafter_defaults}, required=["pools"])

verifier = obj({"model": s(minLength=1), **model_role,
                "cachePersistence": obj({"enabled": b(), "size": ref("quantity"), "storageClass": s()})},
               required=["model"])

gateway = obj({
    "image": ref("roleImage"), "replicas": i(minimum=0), "port": ref("port"),
    "httpPort": i(minimum=0, maximum=65535),
    "service": obj({"type": s(enum=["ClusterIP", "NodePort", "LoadBalancer"]), "port": ref("port"),
                    "httpPort": ref("port"), "annotations": strmap("Service annotations")}),
    "sessionTTLSeconds": {"type": "number", "exclusiveMinimum": 0},
    "maxSessions": i(minimum=1, maximum=4096), "maxPromptBytes": i(minimum=1),
    "graceSeconds": i(minimum=0), "resources": ref("resources"),
    "auth": obj({"existingSecret": s(), "existingSecretKey": s(minLength=1), "maxSessionsPerKey": i(minimum=0),
                 "requestsPerMinutePerKey": i(minimum=0), "testKeySecret": s(), "testKeySecretKey": s(minLength=1)}),
    "discovery": s(enum=["static", "dns", "kubernetes"]),
    "dnsRefreshSeconds": {"type": "number", "exclusiveMinimum": 0},
    "healthCheckSeconds": {"type": "number", "exclusiveMinimum": 0},
    "autoscaling": ref("autoscaling"), "pdb": ref("pdb"), **probes, **placement})

secret_ref = {"existingSecret": s(), "existingSecretPasswordKey": s(minLength=1)}
redis = obj({
    "enabled": b(),
    "image": obj({"repository": s(minLength=1), "tag": s(minLength=1),
                  "pullPolicy": s(enum=["Always", "IfNotPresent", "Never"])}),
    "auth": obj(secret_ref),
    "persistence": obj({"enabled": b(), "size": ref("quantity"), "storageClass": s(),
                        "accessModes": lst("PVC access modes", s())}),
    "appendfsync": s(enum=["always", "everysec", "no"]),
    "resources": ref("resources"),
    "podSecurityContext": maplike("pod security context of Redis"),
    **{k: placement[k] for k in ("nodeSelector", "tolerations", "affinity", "podAnnotations", "extraEnv", "extraArgs")},
    "external": obj({"url": s(pattern="^$|^(redis|rediss|unix)://"), **secret_ref}),
}, **{"if": {"properties": {"enabled": {"const": False}}, "required": ["enabled"]},
      "then": {"properties": {"external": {"properties": {"url": s(minLength=1)}, "required": ["url"]}}}})

schema = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "crossdraft chart values",
    "type": "object",
    "additionalProperties": False,
    "definitions": definitions,
    "properties": {
        "global": {"type": "object"},
        "nameOverride": s(), "fullnameOverride": s(),
        "commonLabels": strmap("labels of every object"),
        "clusterDomain": s(minLength=1),
        "image": obj({"repository": s(minLength=1), "tag": s(), "cudaTagSuffix": s(),
                      "pullPolicy": s(enum=["Always", "IfNotPresent", "Never"])}),
        "imagePullSecrets": lst("image pull secrets", obj({"name": s(minLength=1)}, required=["name"])),
        "serviceAccount": obj({"create": b(), "name": s(), "annotations": strmap("annotations"), "automountToken": b()}),
        "models": obj({
            "pvc": obj({"claimName": s(), "mountPath": s(pattern="^/"), "subPath": s()}),
            "hub": obj({"tokenSecret": s(), "tokenSecretKey": s(minLength=1), "offline": b()}),
            "cache": obj({"sizeLimit": ref("quantity")})}),
        "podSecurityContext": maplike("pod security context of the crossdraft pods"),
        "securityContext": maplike("container security context of the crossdraft containers"),
        "metrics": obj({"enabled": b(), "port": ref("port"), "podAnnotations": b(),
                        "serviceMonitor": obj({"enabled": b(), "interval": s(pattern="^[0-9]+(ms|s|m|h)$"),
                                               "labels": strmap("ServiceMonitor labels")})}),
        "networkPolicy": obj({"enabled": b(), "gatewayFrom": lst("NetworkPolicy peers", {"type": "object"}),
                              "metricsFrom": lst("NetworkPolicy peers", {"type": "object"}),
                              "extraAllowedVerifiers": lst("HOST:PORT entries", s(pattern=r"^[^,\s]+:[^,\s]+$"))}),
        "tls": obj({"enabled": b(), "existingSecret": s(),
                    "secrets": obj({"gateway": s(), "drafter": s(), "verifier": s()}),
                    "serverName": s(minLength=1, pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"),
                    "gatewayClientCertificates": b()}),
        "verdictKey": obj({"enabled": b(), "existingSecret": s(), "existingSecretKey": s(minLength=1)}),
        "gateway": gateway, "drafter": drafter, "verifier": verifier, "redis": redis,
        "tests": obj({"prompt": s(minLength=1), "maxNewTokens": i(minimum=1, maximum=100000),
                      "resources": ref("resources")}),
    },
}


def render() -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(OUT), help=f"where to write the schema (default: {OUT})")
    args = ap.parse_args(argv)
    path = Path(args.out)
    if not path.parent.is_dir():
        ap.error(f"no such directory: {path.parent}")
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
