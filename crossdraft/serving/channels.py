"""Channels and TLS: how every crossdraft process listens and dials.

Owns: the message size limits of every channel (`CHANNEL_OPTIONS`), the TLS settings of a process
(`TLS`: its certificate, the CA of its peers, `--insecure`), and the plaintext rule: plaintext only on
loopback unless `--insecure`, always with a warning (`check_plaintext`, `is_loopback`).

Never: touches models, sessions or the services' logic.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import grpc

from crossdraft.errors import FailedPrecondition, InvalidArgument

MAX_MESSAGE_BYTES = 8 << 20  # per message, both directions (a Proposal with 64 full q rows is ~4 MiB)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

log = logging.getLogger("crossdraft.services")


# --- TLS ----------------------------------------------------------------------------------------
# The rule (docs/security.md, "TLS and mutual TLS"): a server listens with TLS when given a certificate and key; given a CA
# too, it requires client certificates signed by it (mutual TLS). Plaintext is allowed without a flag
# only on loopback (127.0.0.0/8, ::1, localhost); anywhere else it needs `--insecure`. An outgoing
# channel (the gateway to its pools, a drafter to a verifier) uses TLS when a CA is given, verifying the
# peer with it and presenting the certificate and key, if any, as its own identity; plaintext to a
# non-loopback address needs `--insecure` too. Every plaintext listener or channel logs a warning.

def is_loopback(host: str) -> bool:
    """True for a loopback host name or address: a HOST, HOST:PORT, or a gRPC target (`ipv4:A,B`,
    `ipv6:[A]:P`, `dns:///HOST:PORT`, `unix:PATH`; a list is loopback when all its addresses are)."""
    h = host.strip()
    if h.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:"):
        if h.startswith(scheme):
            return all(is_loopback(a) for a in h[len(scheme):].split(",") if a.strip())
    if h.startswith("dns:"):
        h = h[4:].rsplit("/", 1)[-1]
    if h.startswith("["):  # [::1]:port
        h = h[1:h.index("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:  # host:port
        h = h.rsplit(":", 1)[0]
    if h.lower() in ("localhost", "localhost.") or h.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: cannot be read: {e.strerror}") from None


@dataclass(frozen=True)
class TLS:
    """A process's TLS settings: its certificate and key (PEM files), the CA that signs its peers, the
    name its peers' certificates are checked against (default: the host of the address called), and
    `insecure`: plaintext allowed off loopback."""
    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""
    insecure: bool = False

    @classmethod
    def from_args(cls, args, ca_attr: str = "tls_ca") -> "TLS":
        t = cls(cert=getattr(args, "tls_cert", None) or "", key=getattr(args, "tls_key", None) or "",
                ca=getattr(args, ca_attr, None) or "", server_name=getattr(args, "tls_server_name", None) or "",
                insecure=bool(getattr(args, "insecure", False)))
        t.check()
        return t

    def check(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("--tls-cert and --tls-key go together: give both or neither")
        if self.insecure and (self.cert or self.ca):
            raise InvalidArgument("--insecure and --tls-* exclude each other")
        for path, what in ((self.cert, "--tls-cert"), (self.key, "--tls-key"), (self.ca, "--tls-ca")):
            if path:
                _read(path, what)

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert)

    @property
    def calls_tls(self) -> bool:
        return bool(self.ca)

    def server_credentials(self, require_client_ca: str = "") -> grpc.ServerCredentials:
        pair = (_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))
        ca = _read(require_client_ca, "--tls-ca") if require_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def channel(self, address: str, options=None, what: str = "peer") -> grpc.Channel:
        """A channel to address: TLS (and the client certificate, if any) when a CA is given; else
        plaintext, refused off loopback without --insecure, with a warning."""
        options = list(options if options is not None else CHANNEL_OPTIONS)
        if self.calls_tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca, "--tls-ca"),
                private_key=_read(self.key, "--tls-key") if self.key else None,
                certificate_chain=_read(self.cert, "--tls-cert") if self.cert else None)
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            return grpc.secure_channel(address, creds, options=options)
        check_plaintext(address, self.insecure, f"{what} {address}", listening=False, error=FailedPrecondition)
        return grpc.insecure_channel(address, options=options)


PLAINTEXT = TLS()  # no TLS: loopback only


def check_plaintext(address: str, insecure: bool, what: str, listening: bool = True,
                    error=InvalidArgument) -> None:
    """Refuse plaintext off loopback unless `insecure` (raises `error`); log a warning whenever plaintext is used."""
    loop = is_loopback(address)
    if not loop and not insecure:
        raise error(
            f"{what}: plaintext {'listening on' if listening else 'connection to'} a non-loopback address; give "
            f"{'--tls-cert and --tls-key' if listening else '--tls-ca'} for TLS, or --insecure to allow plaintext")
    log.warning("%s: plaintext gRPC (no TLS)%s", what,
                " on loopback" if loop else ", allowed by --insecure: anyone on the network can read and call it")
