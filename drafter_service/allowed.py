"""Which verifiers a drafter may dial: `--allowed-verifiers`.

A session's caller names the verifier (`RunSessionRequest.verifier_address`), and the drafter opens a
connection to it: without a limit, whoever can call a drafter can make it dial any host and port it can
reach (a request forgery from inside the cluster). The allow-list limits that to the verifiers of the
deployment.

An entry is `HOST:PORT`: HOST a name or address, `*` wildcards allowed in it (`*.verifier.ns.svc:50051`),
PORT a number or `*`; `[::1]:50051` for IPv6; a gRPC target with a scheme (`unix:/path`) only as written;
`*` alone allows any address. An entry whose HOST is a DNS name without wildcards also allows the
addresses that name resolves to (a headless Service's name resolves to its ready pods, so a gateway
that names verifier pods by IP is covered); names are resolved when a session names an IP address,
and again at most every `RESOLVE_EVERY_S` while one is refused.

Never: dials anything itself, or decides anything about sessions.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import socket
import threading
import time
from typing import Optional

from crossdraft.errors import InvalidArgument, PermissionDenied

RESOLVE_EVERY_S = 10.0
SCHEMES = ("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")  # gRPC targets matched only as written


def split_address(address: str) -> Optional[tuple]:
    """(host, port) of `HOST:PORT`, `[V6]:PORT` or `dns:///HOST:PORT`, host lower-cased, port digits or
    `*`; None for anything else (a gRPC target of another scheme, no port)."""
    a = address.strip()
    if a.startswith(SCHEMES):
        return None
    if a.startswith("dns:"):
        a = a[4:].rsplit("/", 1)[-1]
    if a.startswith("["):
        host, sep, rest = a[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port = rest[1:]
    elif a.count(":") == 1:
        host, port = a.split(":")
    else:
        return None
    if not host or not (port == "*" or port.isdigit()):
        return None
    return host.lower().rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class AllowedVerifiers:
    """The verifier addresses a drafter may dial (see the module docstring); `AllowedVerifiers(None)`
    allows any address."""

    def __init__(self, entries: Optional[list] = None):
        self.entries = list(entries) if entries else None
        self._parsed = []  # (host pattern, port pattern) of the HOST:PORT entries
        self._targets = set()  # entries of another form, matched as written
        for e in self.entries or []:
            hp = split_address(e)
            if hp is None:
                self._targets.add(e.strip())
            else:
                self._parsed.append(hp)
        self._names = [(h, p) for h, p in self._parsed if "*" not in h and not _is_ip(h)]
        self._resolved: set = set()  # (ip, port pattern) the names resolved to
        self._resolved_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, text: Optional[str]) -> "AllowedVerifiers":
        """From `--allowed-verifiers` (comma-separated entries); empty or None: any address."""
        entries = [e.strip() for e in (text or "").split(",") if e.strip()]
        for e in entries:
            if e != "*" and not e.startswith(SCHEMES) and split_address(e) is None:
                raise InvalidArgument(f"--allowed-verifiers: {e!r} is not HOST:PORT (PORT a number or *)")
        return cls(entries)

    @property
    def any(self) -> bool:
        return self.entries is None or "*" in self.entries

    def allows(self, address: str) -> bool:
        if self.any or address.strip() in self._targets:
            return True
        hp = split_address(address)
        if hp is None:
            return False
        host, port = hp
        if any(fnmatch.fnmatchcase(host, h) and p in ("*", port) for h, p in self._parsed):
            return True
        if not _is_ip(host) or not self._names:
            return False
        ip = ipaddress.ip_address(host).compressed
        return self._in_resolved(ip, port, refresh=False) or self._in_resolved(ip, port, refresh=True)

    def _in_resolved(self, ip: str, port: str, refresh: bool) -> bool:
        with self._lock:
            if refresh and time.monotonic() - self._resolved_at >= RESOLVE_EVERY_S:
                self._resolved = self._resolve()
                self._resolved_at = time.monotonic()
            return (ip, port) in self._resolved or (ip, "*") in self._resolved

    def _resolve(self) -> set:
        out = set()
        for host, port in self._names:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError:
                continue
            out.update((ipaddress.ip_address(info[4][0].split("%")[0]).compressed, port) for info in infos)
        return out

    def check(self, address: str) -> None:
        """PermissionDenied unless `address` is allowed."""
        if not self.allows(address):
            raise PermissionDenied(f"verifier address {address!r} is not among this drafter's --allowed-verifiers")

    def __str__(self) -> str:
        return "any address" if self.any else ",".join(self.entries)
