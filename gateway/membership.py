"""Pool membership: which replicas (pods) a pool has right now, from one of three sources.

Owns: the `Member` record (one replica: `address` HOST:PORT that the gateway dials, its readiness as the
source reports it) and the sources behind one small interface (`Source.members()`, a snapshot; `start`,
`close`):
- `StaticSource`: the addresses given, as given (today's `--drafters a:1,b:2`);
- `DnsSource`: a name re-resolved every `refresh_s` seconds; every address:port it resolves to is a member
  (a Kubernetes headless Service resolves to its ready pods); `resolve` is injectable (tests);
- `KubernetesSource`: the EndpointSlices of one Service, listed and then watched through the Kubernetes API
  with the `kubernetes` client; each endpoint address is a member with its `ready`, `serving` and
  `terminating` conditions; a watch that expires (410 Gone), ends or breaks is followed by a new list, so
  the table never keeps a pod the API no longer has.
`sources_for(...)`: the sources of one `--drafters` / `--verifiers` flag under a `--discovery` mode.

Never: routes, dials a member, or knows what a member serves (that is `pool.py`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from crossdraft.errors import InvalidArgument

log = logging.getLogger("crossdraft.gateway")

DISCOVERY_MODES = ("static", "dns", "kubernetes")
DNS_REFRESH_S = 5.0
WATCH_TIMEOUT_S = 240  # a watch asks the API server to end it after this long; then it is re-listed
RETRY_S = (0.5, 10.0)  # backoff after a failed list or a broken watch: first, most
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
SERVICE_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class Member:
    """One replica. `ready`: takes new sessions (the EndpointSlice `ready` condition, or resolvable);
    `terminating`: on its way out (its running sessions go on, new ones go elsewhere); `name`: what it was
    found by (a DNS or Service name, for logs and the TLS server name)."""
    address: str
    ready: bool = True
    terminating: bool = False
    name: str = ""

    @property
    def routable(self) -> bool:
        return self.ready and not self.terminating


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Source:
    """What a pool's members come from. `members()` is a snapshot (a new dict each time: address -> Member)."""

    what = "source"

    def members(self) -> dict:
        raise NotImplementedError

    def start(self) -> None:
        """Begin following changes (a thread, for the dynamic sources)."""

    def close(self) -> None:
        """Stop following changes."""


class StaticSource(Source):
    def __init__(self, addresses: list):
        self._members = {a: Member(a, name=a.rpartition(":")[0]) for a in addresses}
        self.what = ",".join(addresses)

    def members(self) -> dict:
        return dict(self._members)


def system_resolve(host: str, port: int) -> list:
    """The addresses `host` resolves to now (IPv4 and IPv6), as HOST:PORT, sorted; [] when it does not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({join_host_port(info[4][0], port) for info in infos})


class _Follower(Source):
    """A source whose table a daemon thread keeps up to date (`_follow`, until `_stop` is set)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._table: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.synced = threading.Event()  # set once the first answer is in

    def members(self) -> dict:
        with self._lock:
            return dict(self._table)

    def _replace(self, table: dict) -> None:
        with self._lock:
            old, self._table = self._table, table
        if old != table:
            log.info("%s: members now %s", self.what, ", ".join(
                f"{a}{'' if m.routable else ' (terminating)' if m.terminating else ' (not ready)'}"
                for a, m in sorted(table.items())) or "none")
        self.synced.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name=f"members-{self.what}"[:32], daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        raise NotImplementedError


class DnsSource(_Follower):
    """A DNS name re-resolved every `refresh_s`: every address:port it resolves to is a member. A failed
    lookup keeps the last answer (a DNS hiccup does not empty a pool); an empty answer empties it."""

    def __init__(self, host: str, port: int, refresh_s: float = DNS_REFRESH_S,
                 resolve: Callable[[str, int], list] = system_resolve):
        super().__init__()
        self.host, self.port, self.refresh_s, self.resolve = host, port, refresh_s, resolve
        self.what = f"dns {host}:{port}"
        self.refresh()

    def refresh(self) -> None:
        try:
            addresses = self.resolve(self.host, self.port)
        except Exception as e:  # noqa: BLE001 - an injected resolver may raise anything: keep the last answer
            log.warning("%s: lookup failed, keeping %d members: %s", self.what, len(self._table), e)
            return
        self._replace({a: Member(a, name=self.host) for a in addresses})

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()


def _port_of(slice_, port: str) -> Optional[int]:
    """The slice's port named `port` (or numbered so); a slice with a single unnamed port: that one."""
    ports = slice_.ports or []
    for p in ports:
        if p.port is not None and (p.name == port or str(p.port) == port):
            return int(p.port)
    if port.isdigit():
        return int(port)
    return None


def slice_members(slice_, port: str, service: str) -> dict:
    """address -> Member for one EndpointSlice (a kubernetes.client V1EndpointSlice). Conditions as the
    API defines them: `ready` unset means ready; `terminating` unset means not terminating."""
    number = _port_of(slice_, port)
    out = {}
    if number is None:
        return out
    for ep in slice_.endpoints or []:
        c = ep.conditions
        ready = c is None or c.ready is None or bool(c.ready)
        terminating = c is not None and bool(c.terminating)
        for ip in ep.addresses or []:
            a = join_host_port(ip, number)
            out[a] = Member(a, ready=ready, terminating=terminating, name=service)
    return out


def kubernetes_api(namespace: str = ""):
    """(DiscoveryV1Api, namespace): in-cluster config when running in a pod, else the kubeconfig
    ($KUBECONFIG or ~/.kube/config). The namespace: the given one, else the pod's own, else the kubeconfig
    context's, else "default"."""
    from kubernetes import client, config

    context_ns = ""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as e:  # noqa: BLE001 - a missing or broken kubeconfig: one line, not a traceback
            raise InvalidArgument(f"--discovery kubernetes: not in a cluster and no usable kubeconfig: {e}") from None
        try:
            context_ns = config.list_kube_config_contexts()[1]["context"].get("namespace", "")
        except Exception:  # noqa: BLE001 - no current context namespace: fall through
            context_ns = ""
    if not namespace and os.path.isfile(NAMESPACE_FILE):
        with open(NAMESPACE_FILE) as f:
            namespace = f.read().strip()
    return client.DiscoveryV1Api(), namespace or context_ns or "default"


class KubernetesSource(_Follower):
    """The EndpointSlices of Service `service` in `namespace` (label kubernetes.io/service-name), port
    `port` (a port name such as "grpc", or a number): listed, then watched from the list's
    resourceVersion. A watch that the API server ends (timeoutSeconds) goes on from the last version seen;
    one that expires (410 Gone) or breaks is followed by a new list (after a short backoff when it broke),
    so deleted slices missed meanwhile leave the table too. `api`: a DiscoveryV1Api (tests give one on a
    stand-in server)."""

    def __init__(self, service: str, port: str, namespace: str, api, watch_timeout_s: int = WATCH_TIMEOUT_S):
        super().__init__()
        self.service, self.port, self.namespace, self.api = service, str(port), namespace, api
        self.watch_timeout_s = watch_timeout_s
        self.what = f"kubernetes {namespace}/{service}:{port}"
        self._slices: dict = {}  # slice name -> {address: Member}
        self.lists = 0  # how many times it listed (tests: a watch expiry is followed by a list)

    def _publish(self) -> None:
        table: dict = {}
        for members in self._slices.values():
            for a, m in members.items():
                if a not in table or (m.routable and not table[a].routable):
                    table[a] = m  # an address in two slices (during a slice's rewrite): the ready one wins
        self._replace(table)

    def _list(self) -> str:
        got = self.api.list_namespaced_endpoint_slice(self.namespace, label_selector=f"{SERVICE_LABEL}={self.service}")
        self._slices = {s.metadata.name: slice_members(s, self.port, self.service) for s in got.items or []}
        self.lists += 1
        self._publish()
        return got.metadata.resource_version

    def _watch(self, version: str) -> str:
        """Follow events from `version` until the server ends the watch; -> the last version seen.
        Raises ApiException (410 Gone: expired) or a connection error."""
        from kubernetes import watch

        w = watch.Watch()
        for ev in w.stream(self.api.list_namespaced_endpoint_slice, self.namespace,
                           label_selector=f"{SERVICE_LABEL}={self.service}", resource_version=version,
                           timeout_seconds=self.watch_timeout_s, allow_watch_bookmarks=True):
            if self._stop.is_set():
                w.stop()
                break
            kind, obj = ev["type"], ev["object"]
            if kind == "BOOKMARK":
                version = ev["raw_object"]["metadata"]["resourceVersion"]
                continue
            version = obj.metadata.resource_version or version
            if kind == "DELETED":
                self._slices.pop(obj.metadata.name, None)
            else:  # ADDED, MODIFIED
                self._slices[obj.metadata.name] = slice_members(obj, self.port, self.service)
            self._publish()
        return version

    def _follow(self) -> None:
        pause, version = RETRY_S[0], None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                pause = RETRY_S[0]
            except Exception as e:  # noqa: BLE001 - expired (410), refused, reset: list again
                gone = getattr(e, "status", None) == 410
                log.log(logging.INFO if gone else logging.WARNING, "%s: %s; listing again", self.what,
                        "the watch expired" if gone else f"the watch broke ({type(e).__name__}: {e})")
                version = None
                if not gone and self._stop.wait(pause):
                    return
                pause = pause if gone else min(RETRY_S[1], pause * 2)


def split_entry(entry: str, what: str) -> tuple:
    """'HOST:PORT' -> (host, port); IPv6 as [ADDR]:PORT."""
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port:
        raise InvalidArgument(f"{what}: {entry!r} is not HOST:PORT")
    return host.strip("[]") if host.startswith("[") else host, port


def sources_for(mode: str, addresses: list, what: str, refresh_s: float = DNS_REFRESH_S,
                namespace: str = "", api=None, resolve: Callable = system_resolve) -> list:
    """The sources of one pool flag. `static`: each entry one member, as given. `dns` (the default): an IP
    entry (or localhost) is one member, a name a `DnsSource` of every address it resolves to. `kubernetes`:
    each entry SERVICE:PORT (PORT a port name or number) is a `KubernetesSource` in `namespace`."""
    if mode not in DISCOVERY_MODES:
        raise InvalidArgument(f"--discovery must be one of {', '.join(DISCOVERY_MODES)}, got {mode!r}")
    if mode == "static":
        return [StaticSource(addresses)]
    if mode == "kubernetes":
        if api is None:
            api, namespace = kubernetes_api(namespace)
        return [KubernetesSource(*split_entry(a, what), namespace=namespace, api=api) for a in addresses]
    fixed, out = [], []
    for a in addresses:
        host, port = split_entry(a, what)
        if is_ip(host) or host.lower() in ("localhost", "localhost.") or not port.isdigit():
            fixed.append(a)
        else:
            out.append(DnsSource(host, int(port), refresh_s, resolve))
    return ([StaticSource(fixed)] if fixed else []) + out


def wait_synced(sources: list, timeout_s: float) -> bool:
    """Wait until every dynamic source has its first answer (or `timeout_s`); True when all have."""
    deadline = time.monotonic() + timeout_s
    for s in sources:
        ev = getattr(s, "synced", None)
        if ev is not None and not ev.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True
