"""Prometheus metrics of the crossdraft services (verifier, drafter, gateway).

Owns: the metric families (all named `crossdraft_*`, all with a `role` label: verifier, drafter,
gateway), one `ServiceMetrics` per service bound to its role, and the HTTP endpoint that serves
them (`/metrics`, `--metrics-port`).

Registries. Metrics never go to prometheus_client's global default registry. Each `serve` process
makes its own `CollectorRegistry` and HTTP server (`ServiceMetrics(role)`). Several services in one
process (the embedded `serve all`) share ONE registry and one endpoint: pass the same `registry` to
each `ServiceMetrics(role, registry)`; the families are created once per registry and every series
is told apart by its `role` label, so nothing clashes.

    m = ServiceMetrics("verifier")          # its own registry
    m.serve(port, host)                     # /metrics on host:port (0: off)
    m.round(candidates=4, accepted=3, new_tokens=4, verify_ns=...)

Never: touches models, gRPC handlers' logic or session state; it only counts what they report.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "crossdraft_"
MAX_POSITION = 16  # accepted tokens by draft position: "1".."15", then "16+"
# Round latencies: fine between 1 and 50 ms, coarse around it.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ROLES = ("verifier", "drafter", "gateway")

def position_label(i: int) -> str:
    """The `position` label of the i-th (1-based) draft position."""
    return f"{MAX_POSITION}+" if i >= MAX_POSITION else str(i)


def _families(registry: CollectorRegistry) -> dict:
    """The metric families of this registry, created on first use (names without the prefix)."""
    r, p = registry, PREFIX
    return {
        "sessions_started": Counter(p + "sessions_started", "Sessions started", ["role"], registry=r),
        "sessions_finished": Counter(p + "sessions_finished", "Sessions ended (finished, failed or cancelled)",
                                     ["role"], registry=r),
        "sessions_active": Gauge(p + "sessions_active", "Sessions open now", ["role"], registry=r),
        "rounds": Counter(p + "rounds", "Verification rounds (one proposal, one verdict)", ["role"], registry=r),
        "draft_tokens": Counter(p + "draft_tokens", "Candidate target tokens verified", ["role"], registry=r),
        "accepted_tokens": Counter(p + "accepted_tokens", "Candidate target tokens accepted", ["role"], registry=r),
        "accepted_by_position": Counter(
            p + "accepted_tokens_by_position",
            f"Accepted candidates by draft position (1-based; positions from {MAX_POSITION} on in '{MAX_POSITION}+')",
            ["role", "position"], registry=r),
        "generated_tokens": Counter(p + "generated_tokens", "Target tokens committed (rate() gives tokens/s)",
                                    ["role"], registry=r),
        "last_tps": Gauge(p + "last_session_tokens_per_second", "Tokens/s of the last session that finished",
                          ["role"], registry=r),
        "draft_s": Histogram(p + "round_draft_seconds", "Drafting time per round (drafter)", ["role"],
                             buckets=LATENCY_BUCKETS, registry=r),
        "verify_s": Histogram(p + "round_verify_seconds", "Verification time per round (verifier: the verdict's "
                              "verify_ns)", ["role"], buckets=LATENCY_BUCKETS, registry=r),
        "network_s": Histogram(p + "round_network_seconds", "Round trip to the verifier minus its verify time, "
                               "per round (drafter)", ["role"], buckets=LATENCY_BUCKETS, registry=r),
        "round_s": Histogram(p + "round_seconds", "Whole round: drafting plus the round trip (drafter)", ["role"],
                             buckets=LATENCY_BUCKETS, registry=r),
        "batch_sequences": Histogram(p + "batch_sequences", "Sequences (sessions' steps) per batched forward pass",
                                     ["role"], buckets=BATCH_BUCKETS, registry=r),
        "batch_tokens": Histogram(p + "batch_tokens", "Tokens per batched forward pass", ["role"],
                                  buckets=TOKEN_BUCKETS, registry=r),
        "forward_s": Histogram(p + "forward_seconds", "Batched forward passes", ["role"], buckets=LATENCY_BUCKETS,
                               registry=r),
        "queue_wait_s": Histogram(p + "queue_wait_seconds", "Time a step waited for its forward pass", ["role"],
                                  buckets=LATENCY_BUCKETS, registry=r),
        "kv_budget": Gauge(p + "kv_budget_bytes", "KV cache memory the sessions may reserve (--kv-budget-mb)",
                           ["role"], registry=r),
        "kv_reserved": Gauge(p + "kv_reserved_bytes", "KV cache memory reserved by the open sessions", ["role"],
                             registry=r),
        "kv_queued": Gauge(p + "kv_sessions_queued", "Sessions waiting for room in the KV budget", ["role"],
                           registry=r),
        "kv_refused": Counter(p + "kv_sessions_refused", "Sessions refused for want of KV room", ["role"],
                              registry=r),
        "ttft_s": Histogram(p + "time_to_first_token_seconds", "From a session's start to its first committed "
                            "token (gateway)", ["role"], buckets=TTFT_BUCKETS, registry=r),
        "session_s": Histogram(p + "session_seconds", "Whole sessions, start to end (gateway)", ["role"],
                               buckets=SESSION_BUCKETS, registry=r),
        "bad_proposals": Counter(p + "bad_proposals", "Malformed proposals ignored (verifier)", ["role"],
                                 registry=r),
        "unsealed_deltas": Counter(p + "unsealed_deltas", "Deltas a drafter sent without the verifier's valid "
                                   "seal, refused (gateway with --verdict-key-file)", ["role"], registry=r),
        "handed_back": Counter(p + "handed_back", "Sessions a drafter handed back because drafting did not pay at "
                               "the verifier's load; the gateway stepped them on the verifier (gateway)", ["role"],
                               registry=r),
        "drafted_ahead": Counter(p + "drafted_ahead_tokens", "Drafted tokens that were drafted ahead, while the "
                                 "verifier checked the round before (drafter --draft-ahead)", ["role"], registry=r),
        "sent_ahead": Counter(p + "sent_ahead_rounds", "Rounds sent before the verdict on the round before, by "
                              "whether their guess held (drafter --draft-ahead)", ["role", "outcome"], registry=r),
        "alternatives": Counter(p + "alternative_rounds", "Rounds whose last committed candidate was one of the "
                                "drafter's alternatives (--draft-alternatives; verifier and drafter)", ["role"], registry=r),
        "slow_clients": Counter(p + "slow_clients", "Client streams cut because the client took no message for "
                                "--slow-client-seconds (gateway)", ["role"], registry=r),
        "failovers": Counter(p + "failovers", "Sessions resumed on another drafter (or the same one again) after "
                             "a failure (gateway)", ["role"], registry=r),
        "takeovers": Counter(p + "takeovers", "Sessions taken over from a replica that stopped (gateway)", ["role"],
                             registry=r),
        "store_errors": Counter(p + "store_errors", "Session store errors a gateway went on after (logged), by "
                                "operation: touch (failover), expire (client deadline), cancelled (a check)",
                                ["role", "op"], registry=r),
        "errors": Counter(p + "errors", "Calls answered with an error, by gRPC status code", ["role", "code"],
                          registry=r),
    }


_lock = threading.Lock()
_by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, dict]" = weakref.WeakKeyDictionary()


def families(registry: CollectorRegistry) -> dict:
    with _lock:
        f = _by_registry.get(registry)
        if f is None:
            f = _by_registry[registry] = _families(registry)
        return f


class ServiceMetrics:
    """One service's metrics: the families of `registry` (a new one if None) bound to `role`."""

    def __init__(self, role: str, registry: Optional[CollectorRegistry] = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.registry = registry if registry is not None else CollectorRegistry()
        f = families(self.registry)
        self._f = f
        # histograms are bound on first use, so a role shows only the latencies it measures
        lab = {k: v.labels(role=role) for k, v in f.items()
               if k not in ("accepted_by_position", "errors", "draft_s", "verify_s", "network_s", "round_s",
                            "ttft_s", "session_s", "failovers", "takeovers", "bad_proposals", "unsealed_deltas",
                            "handed_back", "slow_clients", "batch_sequences", "batch_tokens", "forward_s", "queue_wait_s",
                            "kv_budget", "kv_reserved", "kv_queued", "kv_refused", "store_errors", "drafted_ahead",
                            "sent_ahead", "alternatives")}
        self.sessions_started, self.sessions_finished = lab["sessions_started"], lab["sessions_finished"]
        self.sessions_active, self.rounds = lab["sessions_active"], lab["rounds"]
        self.draft_tokens, self.accepted_tokens = lab["draft_tokens"], lab["accepted_tokens"]
        self.generated_tokens, self.last_tps = lab["generated_tokens"], lab["last_tps"]
        self._refused_seen = 0
        self.by_position = [f["accepted_by_position"].labels(role=role, position=position_label(i))
                            for i in range(1, MAX_POSITION + 1)]
        self._server = None
        self._children: dict = {}

    # --- endpoint -------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> Optional[int]:
        """Serve /metrics over HTTP on host:port; 0 or None: off. Returns the port (or None)."""
        if not port:
            return None
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- events ---------------------------------------------------------------------------------
    def session_started(self) -> None:
        self.sessions_started.inc()
        self.sessions_active.inc()

    def session_finished(self, new_tokens: int = 0, seconds: float = 0.0, finished: bool = False) -> None:
        """A session ended (any outcome); a finished one with a duration sets the last tokens/s."""
        self.sessions_finished.inc()
        self.sessions_active.dec()
        if finished and seconds > 0:
            self.last_tps.set(new_tokens / seconds)

    def round(self, candidates: int, accepted: int, new_tokens: int, *, draft_ns: Optional[int] = None,
              verify_ns: Optional[int] = None, network_ns: Optional[int] = None,
              round_ns: Optional[int] = None) -> None:
        """One verification round; timings given are observed in their histograms (seconds)."""
        self.rounds.inc()
        self.draft_tokens.inc(candidates)
        self.accepted_tokens.inc(accepted)
        self.generated_tokens.inc(new_tokens)
        for i in range(min(accepted, MAX_POSITION - 1)):
            self.by_position[i].inc()
        if accepted >= MAX_POSITION:
            self.by_position[-1].inc(accepted - MAX_POSITION + 1)
        for ns, key in ((draft_ns, "draft_s"), (verify_ns, "verify_s"), (network_ns, "network_s"),
                        (round_ns, "round_s")):
            if ns is not None:
                self._child(key).observe(max(0, ns) / 1e9)

    def _child(self, key: str):
        """The family's series for this role, bound on first use (a histogram a role never observes
        does not appear in its /metrics) and then kept: no label lookup per round."""
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = self._f[key].labels(role=self.role)
        return c

    def committed(self, new_tokens: int, rounds: int = 0, draft_tokens: int = 0, accepted_tokens: int = 0) -> None:
        """The gateway: one delta committed to the session store, with the rounds it reports."""
        self.generated_tokens.inc(new_tokens)
        self.rounds.inc(rounds)
        self.draft_tokens.inc(draft_tokens)
        self.accepted_tokens.inc(accepted_tokens)

    def first_token(self, seconds: float) -> None:
        self._child("ttft_s").observe(max(0.0, seconds))

    def session_time(self, seconds: float) -> None:
        self._child("session_s").observe(max(0.0, seconds))

    def bad_proposal(self) -> None:
        self._child("bad_proposals").inc()

    def slow_client(self) -> None:
        self._child("slow_clients").inc()

    def unsealed_delta(self) -> None:
        self._child("unsealed_deltas").inc()

    def alternative(self) -> None:
        self._child("alternatives").inc()

    def handed_back(self) -> None:
        self._child("handed_back").inc()

    def ahead(self, tokens: int, held: int, stale: int) -> None:
        """Drafting ahead (drafter): tokens drafted ahead and used; rounds sent ahead whose guess held, failed."""
        if tokens:
            self._child("drafted_ahead").inc(tokens)
        for outcome, n in (("held", held), ("stale", stale)):
            if n:
                self._f["sent_ahead"].labels(role=self.role, outcome=outcome).inc(n)

    def failover(self) -> None:
        self._child("failovers").inc()

    def takeover(self) -> None:
        self._child("takeovers").inc()

    def batch(self, sequences: int, tokens: int, seconds: float, waits=()) -> None:
        """One batched forward pass of the model (the scheduler's observer)."""
        self._child("batch_sequences").observe(sequences)
        self._child("batch_tokens").observe(tokens)
        self._child("forward_s").observe(max(0.0, seconds))
        wait = self._child("queue_wait_s")
        for w in waits:
            wait.observe(max(0.0, w))

    def kv_budget(self, budget_bytes: int) -> None:
        self._child("kv_budget").set(budget_bytes)

    def kv_usage(self, usage: dict) -> None:
        """The KV budget's state (`KVBudget.usage()`), after a session was admitted, refused or ended."""
        self._child("kv_reserved").set(usage["reserved_bytes"])
        self._child("kv_queued").set(usage["queued"])
        if usage["refused"] > self._refused_seen:
            self._child("kv_refused").inc(usage["refused"] - self._refused_seen)
            self._refused_seen = usage["refused"]

    def store_error(self, op: str) -> None:
        """The gateway went on after a session store error in `op` (and logged it)."""
        self._f["store_errors"].labels(role=self.role, op=op).inc()

    def error(self, code) -> None:
        """An error answered with this status (a grpc.StatusCode or its name)."""
        self._f["errors"].labels(role=self.role, code=getattr(code, "name", str(code))).inc()
