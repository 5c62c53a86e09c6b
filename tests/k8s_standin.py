"""A stand-in for the two Kubernetes API calls the gateway's `--discovery kubernetes` makes: list and watch
of discovery.k8s.io/v1 EndpointSlices in a namespace, filtered by a `key=value` label selector.

It imitates, over real HTTP/1.1 on loopback: the list (an EndpointSliceList with a resourceVersion), the
watch (`?watch=true&resourceVersion=N&timeoutSeconds=T`: a chunked response, one JSON event per line,
ADDED / MODIFIED / DELETED with the whole object, held open until the timeout), a watch from a version
older than the kept history answered with an ERROR event `410 Gone` (as the API server does once etcd
compacted it), and watches ended early by the server (`end_watches`, as an API server restart or a load
balancer does).

It is NOT an API server: no authentication, no other resources or verbs, no field selectors, no
bookmarks, no pagination, and resource versions are one counter. Tests point the real `kubernetes`
client at it (`api()` in process, `kubeconfig()` for a gateway process).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

GROUP_PATH = "/apis/discovery.k8s.io/v1/namespaces/"


class EndpointSliceAPI:
    def __init__(self, namespace: str = "default"):
        self.namespace = namespace
        self.slices: dict = {}  # name -> the EndpointSlice as JSON
        self.history: list = []  # (resourceVersion, type, object)
        self.version = 1
        self.oldest = 0  # events at or below this version are gone (410)
        self.generation = 0  # bumped by end_watches: open watches end
        self.cond = threading.Condition()
        self.requests: list = []  # ("list" | "watch", query)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                api._get(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="k8s-standin", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- what the tests do -----------------------------------------------------------------------
    def put(self, name: str, service: str, endpoints: list, port: int = 0, port_name: str = "grpc") -> None:
        """Create or replace a slice. `endpoints`: [(ip, {"ready": .., "serving": .., "terminating": ..}), ...]
        (a condition left out is unset, as the API allows); `port` of the slice's one port."""
        with self.cond:
            self.version += 1
            kind = "MODIFIED" if name in self.slices else "ADDED"
            obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                   "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(self.version),
                                "labels": {"kubernetes.io/service-name": service}},
                   "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
                   "endpoints": [{"addresses": [ip], "conditions": dict(c)} for ip, c in endpoints]}
            self.slices[name] = obj
            self.history.append((self.version, kind, obj))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.version += 1
            obj = dict(self.slices.pop(name))
            obj["metadata"] = dict(obj["metadata"], resourceVersion=str(self.version))
            self.history.append((self.version, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history so far: a watch from an older version gets 410 Gone."""
        with self.cond:
            self.oldest = self.version
            self.history.clear()

    def end_watches(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def count(self, what: str) -> int:
        return sum(1 for w, _ in self.requests if w == what)

    def close(self) -> None:
        self.end_watches()
        self.server.shutdown()
        self.server.server_close()

    def api(self):
        """A DiscoveryV1Api of the real client, talking to this stand-in."""
        from kubernetes import client

        cfg = client.Configuration(host=self.url)
        return client.DiscoveryV1Api(client.ApiClient(cfg))

    def kubeconfig(self, path) -> str:
        """Write a kubeconfig for this stand-in (namespace set in its context); -> its path."""
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": self.namespace}}]}))
        return str(path)

    # --- HTTP ------------------------------------------------------------------------------------
    def _selected(self, obj: dict, selector: str) -> bool:
        if not selector:
            return True
        key, _, value = selector.partition("=")
        return obj["metadata"].get("labels", {}).get(key) == value

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != f"{GROUP_PATH}{self.namespace}/endpointslices":
            body = json.dumps({"kind": "Status", "code": 404, "message": "not served by the stand-in"}).encode()
            h.send_response(404)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        watching = q.get("watch") in ("true", "1")
        self.requests.append(("watch" if watching else "list", q))
        if watching:
            self._watch(h, q)
            return
        with self.cond:
            items = [o for o in self.slices.values() if self._selected(o, q.get("labelSelector", ""))]
            body = json.dumps({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                               "metadata": {"resourceVersion": str(self.version)}, "items": items}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _chunk(h, event: dict) -> None:
        data = (json.dumps(event) + "\n").encode()
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    def _watch(self, h: BaseHTTPRequestHandler, q: dict) -> None:
        since = int(q.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        selector = q.get("labelSelector", "")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            with self.cond:
                generation = self.generation
                if since < self.oldest:
                    self._chunk(h, {"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                        "message": f"too old resource version: {since} ({self.oldest})"}})
                    return
                while True:
                    for v, kind, obj in self.history:
                        if v > since and self._selected(obj, selector):
                            self._chunk(h, {"type": kind, "object": obj})
                    since = max(since, self.version)
                    left = deadline - time.monotonic()
                    if left <= 0 or self.generation != generation:
                        return
                    self.cond.wait(min(left, 0.5))
                    if self.oldest > since:  # compacted while watching: the server ends it
                        return
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            try:
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            except OSError:
                pass
