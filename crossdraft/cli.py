"""The `crossdraft` command line: generate, bench and serve.

Owns: argument parsing, reading prompt files, printing, and turning every error into one line and a
non-zero exit code (never a traceback; `--debug` shows one).

Never: contains algorithm logic; everything runs through `crossdraft.engine.Engine` or, for `serve`,
a service package (`serve verifier|drafter|gateway`) or `crossdraft.compose` (`serve all`), imported
lazily, as are the client (`generate --gateway`) and the benchmarks: `generate` in process and
`bench` never import grpc.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CrossdraftError, InvalidArgument
from .options import (add_alternatives_arg, add_batching_args, add_model_args, add_slrs_args, add_tls_args,
                      check_batching_args,
                      check_slrs_args, draft_lengths, kv_dtype, model_dtype, positive_int, setup_torch)
from .prompts import read_prompts, zoo_dir
from .stops import check_stops

REDIS_PASSWORD_ENV = "CROSSDRAFT_REDIS_PASSWORD"
API_KEY_ENV = "CROSSDRAFT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="crossdraft",
        description="Lossless speculative decoding with a drafter whose tokenizer may differ from the target's "
                    "(TLI, SLEM, SLRS; Timor et al., ICML 2025).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generate_parser(sub)
    _key_parsers(sub)
    _bench_parser(sub)
    roles = _serve_parser(sub)
    _model_service_parsers(roles)
    _gateway_parsers(roles)
    return ap


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate a continuation of a prompt",
                       description="Generate with the target, sped up by the drafter. Output is exactly the "
                                   "target's: token for token under greedy decoding, its distribution under sampling.")
    g.add_argument("prompt", nargs="?", help="the prompt text (or use --prompts-file)")
    g.add_argument("--prompts-file", help="JSON Lines, one object with a \"prompt\" field per line")
    g.add_argument("--target", help="target model: a local directory or a Hugging Face Hub id")
    g.add_argument("--drafter", help="drafter model: a local directory or a Hub id (not needed for --algorithm none)")
    g.add_argument("--algorithm", default="auto", help="auto, same, tli, slem, slrs or none (default: auto)")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="at most this many new target tokens (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), > 0 to sample")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed; a seeded run is reproducible")
    g.add_argument("--draft-tokens", type=int, default=None,
                   help="draft length per round (drafter tokens); default: adaptive from observed acceptance")
    g.add_argument("--draft-top-k", type=int, default=0,
                   help="same/tli under sampling: the drafter samples from its top-k renormalised distribution, "
                        "which it then sends exactly (sparse); 0: its whole distribution (default)")
    add_alternatives_arg(g)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable, at most 16): the output ends right before the first one the "
                        "target writes, with finish reason stop")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    g.add_argument("--compare", action="store_true",
                   help="also run the target alone on each prompt and report the speedup and whether outputs match")
    g.add_argument("--batch-size", type=int, default=1,
                   help="run the prompts together, this many sessions at a time, their forward passes batched "
                        "(continuous batching, as the services do it); each output as it would be alone, up to "
                        "float rounding of batched products (default: 1, one after the other)")
    g.add_argument("--gateway", help="HOST:PORT of a crossdraft gateway: generate there over gRPC (--target and "
                                     "--drafter are then the gateway's; --compare is in-process only)")
    g.add_argument("--api-key", default=None,
                   help=f"API key for --gateway, sent as `authorization: Bearer KEY` (default: ${API_KEY_ENV}; "
                        "prefer the variable: a command line is visible to other users)")
    g.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="with --gateway: connect with TLS, verifying the gateway's certificate with this CA")
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="with --gateway and --tls-ca: client certificate, for a gateway that requires one")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name the gateway's certificate is checked against (default: the host of --gateway)")
    add_slrs_args(g)
    add_model_args(g)


def _key_parsers(sub) -> None:
    h = sub.add_parser("hash-key", help="print the SHA-256 hash of an API key, as a gateway's --api-keys file holds it",
                       description="Read an API key (from stdin, or a new random one with --new) and print the line "
                                   "of a --api-keys file for it: NAME:SHA256HEX. With --new the key itself is "
                                   "printed to stderr, once: give it to the client, keep only the hash.")
    h.add_argument("--name", default="", help="name of the key (default: key- and the hash's first 8 hex digits)")
    h.add_argument("--new", action="store_true", help="make a new random key (32 bytes, URL-safe base64)")

    k = sub.add_parser("new-verdict-key", help="write a new random key for --verdict-key-file (verifiers and gateways)",
                       description="Write 32 random bytes, as hex, to FILE (mode 0600): the key verifiers seal their "
                                   "verdicts with and gateways check them with (--verdict-key-file). Give it to the "
                                   "verifiers and the gateways, never to the drafters.")
    k.add_argument("file", help="where to write the key (refused if it exists)")


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark every algorithm and drafter against the target alone and Hugging Face",
                       description="Side by side in one process: the target alone, each algorithm with each drafter, "
                                   "and Hugging Face transformers' generate() (plain, assistant_model, assistant_tokenizer). "
                                   "Prints a table and writes JSON.")
    z = zoo_dir()
    b.add_argument("--target", default=str(z / "target-bpe8k"), help="target model (default: the zoo's target)")
    b.add_argument("--drafters", nargs="*", default=None,
                   help="drafter model directories, or names of directories next to the target "
                        "(default: every drafter-* directory next to the target)")
    b.add_argument("--prompts-file", default=str(z / "dev-prompts.jsonl"),
                   help="JSON Lines with a \"prompt\" or \"text\" field (default: the zoo's dev prompts)")
    b.add_argument("--num-prompts", type=int, default=6, help="how many prompts (default: 6)")
    b.add_argument("--prompt-chars", type=int, default=800, help="cut each prompt to this many characters (default: 800)")
    b.add_argument("--min-chars", type=int, default=2000,
                   help="skip documents shorter than this, so every prompt has a real continuation (default: 2000)")
    b.add_argument("--max-new-tokens", type=positive_int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--algorithms", default=None,
                   help="comma-separated, from same, tli, slem, slrs, auto (default: same,tli,slem; with "
                        "--concurrency: auto)")
    b.add_argument("--draft-tokens", type=int, default=None, help="fixed draft length (default: adaptive)")
    b.add_argument("--sweep-draft-tokens", type=draft_lengths, default=None, metavar="LIST",
                   help="run every algorithm but auto once per draft length in LIST (comma-separated; "
                        "'adaptive' is the default rule), e.g. adaptive,2,3,4,6: the fixed configurations "
                        "that `auto` (which searches lengths itself) is measured against")
    b.add_argument("--distributed", action="store_true",
                   help="also run each configuration through redis-server, a verifier, the drafters and a gateway "
                        "started here as separate processes on loopback (started and stopped by the bench; each "
                        "gets --threads torch threads, default 1), and report its tokens/s against the same "
                        "configuration in process and whether the outputs are identical")
    b.add_argument("--pin-cpus", action="store_true",
                   help="with --distributed or --concurrency: run the drafters, the gateway, Redis and the "
                        "bench's clients on the last core, the verifier on any (as on separate machines: the "
                        "verifier's scheduler never waits behind them)")
    b.add_argument("--concurrency", default=None, metavar="LIST",
                   help="the concurrency benchmark instead (crossdraft/loadbench.py): for each level in LIST "
                        "(e.g. 1,4,8,16), that many clients at once through redis-server, a verifier, the drafters "
                        "and a gateway started here (one torch thread each unless --threads), the target alone "
                        "and each of --algorithms (default there: auto) with each of --drafters (default there: "
                        "drafter-spm4k), and Hugging Face's batched generate() of the target in the same run: "
                        "aggregate and per-session tokens/s, TTFT and inter-token latency p50/p95, mean batch size")
    b.add_argument("--requests-per-client", type=int, default=2,
                   help="with --concurrency: generations each client runs one after the other (default: 2)")
    b.add_argument("--gateway", default=None, metavar="HOST:PORT",
                   help="with --concurrency: a running gateway instead of the processes started here")
    b.add_argument("--verifier-metrics", default=None, metavar="URL",
                   help="with --gateway: the verifier's /metrics URL, for the batch sizes")
    b.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() baselines")
    b.add_argument("--json-out", default="bench.json", help="where to write the results (default: bench.json)")
    add_slrs_args(b)
    add_model_args(b)


def _serve_parser(sub):
    s = sub.add_parser("serve", help="run a crossdraft gRPC service (verifier, drafter, gateway, or all three)",
                       description="Run a crossdraft service over gRPC. A verifier or drafter listens at once "
                                   "with health NOT_SERVING, loads and warms its model, then reports SERVING "
                                   "(grpc.health.v1); the gateway, which loads no model, reports SERVING once its "
                                   "session store answers and its pools' members are known (it waits 10 s at "
                                   "most); `all` once both of its models are loaded and warmed. SIGTERM stops it "
                                   "gracefully (a verifier or drafter drains first: docs/pools.md).")
    return s.add_subparsers(dest="role", required=True, metavar="ROLE")


def _model_service_parsers(roles) -> None:
    for role, what in (("verifier", "the target model: verifies the proposals of drafters (VerifierService)"),
                       ("drafter", "a drafter model: runs sessions against a verifier (DrafterService)")):
        r = roles.add_parser(role, help=what, description=f"Serve {what}.")
        r.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
        r.add_argument("--port", type=int, required=True, help="TCP port to listen on (0: any free port)")
        r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
        r.add_argument("--max-sessions", type=int, default=16,
                       help="sessions served at once; more are answered RESOURCE_EXHAUSTED (default: 16)")
        add_batching_args(r)
        r.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight calls get to finish after SIGTERM (default: 10)")
        r.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics over HTTP at HOST:PORT/metrics (default: 0, off)")
        add_tls_args(r)
        if role == "drafter":
            r.add_argument("--allowed-verifiers", default=None, metavar="HOST:PORT,...",
                           help="the only verifier addresses a session may name (`*` wildcards in a host, `*` for "
                                "a port; a DNS name also allows the addresses it resolves to); others are answered "
                                "PERMISSION_DENIED without a connection (default: any address, with a warning when "
                                "listening off loopback)")
            r.add_argument("--draft-ahead", action="store_true",
                           help="draft a greedy session's next round while the verifier checks its last one, on the "
                                "guess that every candidate is accepted, and (same, tli) send it before the verdict; "
                                "a wrong guess costs time, never the output. Off by default: on the 2-core CPU, "
                                "with the drafter sharing its core, it did not pay (docs/serving.md)")
            add_alternatives_arg(r)
        if role == "verifier":
            r.add_argument("--verdict-key-file", default=None, metavar="FILE",
                           help="seal every verdict with this key (HMAC-SHA256), shared with the gateways and never "
                                "given to drafters: a drafter then cannot change a session's output (the gateway "
                                "takes the same flag); make one with `crossdraft new-verdict-key FILE`")
        add_model_args(r)


def _gateway_parsers(roles) -> None:
    """`serve gateway` and `serve all` (the gateway with both models in one process): the gateway's flags."""
    gw = roles.add_parser("gateway", help="the client-facing GatewayService over pools of drafters and verifiers",
                          description="Serve the client-facing GatewayService: sessions in Redis (or in memory "
                                      "without --redis), a drafter per session by least load, a verifier by "
                                      "session affinity.")
    gw.add_argument("--drafters", required=True, help="drafter addresses, HOST:PORT[,HOST:PORT...]")
    gw.add_argument("--verifiers", required=True, help="verifier addresses, HOST:PORT[,HOST:PORT...]")
    gw.add_argument("--discovery", choices=("static", "dns", "kubernetes"), default="dns",
                    help="how --drafters/--verifiers become pool members (docs/pools.md): static, each address one "
                         "member; dns (default), a name is re-resolved and each address it resolves to is a "
                         "member (a headless Service: its pods); kubernetes, each entry is SERVICE:PORT (a port "
                         "name or number) whose EndpointSlices are watched through the Kubernetes API")
    gw.add_argument("--kube-namespace", default="",
                    help="with --discovery kubernetes: the namespace of the Services (default: the pod's own)")
    gw.add_argument("--dns-refresh-seconds", type=float, default=5.0,
                    help="with --discovery dns: how often names are re-resolved (default: 5)")
    gw.add_argument("--health-seconds", type=float, default=1.0,
                    help="how often every pool member's health is checked; a member NOT_SERVING (draining) or "
                         "down gets no new sessions (default: 1)")
    gw.add_argument("--verdict-key-file", default=None, metavar="FILE",
                    help="commit only the deltas a verifier sealed with this key (the verifiers' --verdict-key-file): "
                         "a delta a drafter changed or made up fails that drafter over, and the output stays the "
                         "target's (default: none, drafters are trusted to relay verdicts, with a warning)")
    al = roles.add_parser("all", help="the embedded default: verifier, drafter and gateway in one process",
                          description="Run the verifier and the drafter on loopback ports picked automatically "
                                      "and the gateway on --port, in one process; sessions in memory unless "
                                      "--redis is given.")
    al.add_argument("--target", required=True, help="target model: directory or Hugging Face Hub id")
    al.add_argument("--drafter", required=True, help="drafter model: directory or Hugging Face Hub id")
    for r in (gw, al):
        _gateway_args(r)
        if r is al:
            add_model_args(r)
            add_batching_args(r)
        else:
            r.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")


def _gateway_args(r) -> None:
    r.add_argument("--port", type=int, required=True, help="TCP port of the gateway (0: any free port)")
    r.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health) on this port, same host, TLS and API keys (0: any free port; "
                        "default: none; docs/http.md)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    r.add_argument("--redis", default=None, help="session store URL, redis://HOST:PORT/DB (default: in memory); "
                   f"a password in ${REDIS_PASSWORD_ENV} is added to it, so it need not be on the command line")
    r.add_argument("--ttl", type=float, default=24 * 3600.0, help="seconds a session is kept (default: 1 day)")
    r.add_argument("--max-sessions", type=int, default=64,
                   help="sessions run at once; more are answered RESOURCE_EXHAUSTED (default: 64)")
    r.add_argument("--drafter-timeout", type=float, default=10.0,
                   help="seconds a running session waits for its drafter's next delta before it fails over "
                        "to another drafter, resuming from the committed ids (default: 10)")
    r.add_argument("--failover-seconds", type=float, default=120.0,
                   help="how long a session keeps failing over (drafters, a restarting verifier) before it "
                        "fails (default: 120)")
    r.add_argument("--session-lease", type=float, default=30.0,
                   help="a running session no gateway has written to for this long is taken over by a "
                        "replica a client attaches to (default: 30)")
    r.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics over HTTP at HOST:PORT/metrics (default: 0, off; with "
                        "`all`, one endpoint for the three roles)")
    r.add_argument("--store-wait-seconds", type=float, default=30.0,
                   help="how long a running session retries its commit while Redis is unreachable; then it "
                        "stops here with its committed part in Redis, and a replica takes it over once Redis "
                        "is back and a client attaches (default: 30)")
    r.add_argument("--slow-client-seconds", type=float, default=30.0,
                   help="a streaming client that takes no message for this long (it stopped reading) has its "
                        "stream cut with RESOURCE_EXHAUSTED, which it gets when it reads again (if it reads nothing "
                        "for 60 s more, its call is cancelled); its session goes on and can be re-attached "
                        "(default: 30)")
    r.add_argument("--no-hand-back", action="store_true",
                   help="keep every speculative session on its drafter: by default a drafter whose session's "
                        "drafting the verifier's load keeps at nothing hands it back, and the gateway runs its "
                        "target steps itself until the load falls (docs/serving.md, \"Handed back\")")
    r.add_argument("--max-prompt-bytes", type=int, default=256 << 10,
                   help="longest prompt accepted, in UTF-8 bytes (default: 262144)")
    r.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight calls get to finish after SIGTERM (default: 10)")
    add_tls_args(r, gateway=True)
    r.add_argument("--api-keys", default=None, metavar="FILE",
                   help="API keys file: one NAME:SHA256HEX per line (`crossdraft hash-key`); clients then send "
                        "`authorization: Bearer KEY` and see only their own sessions (default: open)")
    r.add_argument("--key-max-sessions", type=int, default=0,
                   help="with --api-keys: sessions one key runs at once, more RESOURCE_EXHAUSTED (default: 0, "
                        "no limit)")
    r.add_argument("--key-requests-per-minute", type=int, default=0,
                   help="with --api-keys: requests one key makes per minute, more RESOURCE_EXHAUSTED; counted "
                        "in Redis with --redis, so all replicas share it (default: 0, no limit)")


def redis_url_with_password(url, environ=os.environ):
    """`--redis` with the password of $CROSSDRAFT_REDIS_PASSWORD added (percent-encoded), if that is set:
    how a deployment passes a password from a Secret without putting it in the command line."""
    password = environ.get(REDIS_PASSWORD_ENV)
    if not url or not password:
        return url
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is not None:
        raise InvalidArgument(f"--redis has a password and ${REDIS_PASSWORD_ENV} is set too: give only one")
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _print_result(args, out: dict) -> None:
    if args.json:
        print(json.dumps(out, ensure_ascii=False), flush=True)
        return
    sys.stdout.write(out["text"] + "\n")
    print(f"[{out['algorithm']}] {out['new_tokens']} tokens in {out['seconds']:.2f}s "
          f"({out['tokens_per_second']} tok/s), {out['rounds']} target passes, "
          f"accepted {out['accepted_tokens']}/{out['draft_tokens']} drafted", file=sys.stderr, flush=True)


def _generate_via_gateway(args) -> int:
    """`generate --gateway HOST:PORT`: the same flags and output, the generation run by a gateway
    (`crossdraft.client`); a gRPC error becomes one line and exit code 2 (the request) or 1 (the service)."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise InvalidArgument("give either a PROMPT or --prompts-file, not both or neither")
    if args.compare:
        raise InvalidArgument("--compare runs in-process only (not with --gateway)")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    stops = check_stops(args.stop)
    import grpc

    from .client import Client

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        with Client(args.gateway, api_key=api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, tls_server_name=args.tls_server_name) as client:
            for prompt in prompts:
                out = client.generate(prompt, args.max_new_tokens, args.temperature, args.seed, args.algorithm,
                                      args.draft_tokens, args.top_k, args.top_p, stop=stops)
                out.pop("ids"), out.pop("session_id")
                _print_result(args, out)
    except grpc.RpcError as e:
        code = e.code()
        err = CrossdraftError(f"gateway {args.gateway}: {code.name if code else 'UNKNOWN'}: "
                              f"{(e.details() or '').strip().splitlines()[0] if (e.details() or '').strip() else ''}")
        err.exit_code = 2 if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                      grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND,
                                      grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) else 1
        raise err from None
    return 0


def cmd_generate(args) -> int:
    if args.gateway:
        return _generate_via_gateway(args)
    params, prompts, algo, stops = _check_generate(args)
    setup_torch(args)
    from .engine import Engine

    engine = Engine.load(args.target, args.drafter if algo != "none" else None, device=args.device,
                         dtype=model_dtype(args), fast=not args.hf_runner, kv_dtype=kv_dtype(args),
                         draft_top_k=args.draft_top_k, alternatives=args.draft_alternatives,
                         slrs_tau=args.slrs_tau, slrs_budget=args.slrs_budget)
    if args.batch_size > 1:
        return _generate_batch(args, engine, prompts, params, algo, stops)
    for prompt in prompts:
        res = engine.generate(prompt, args.max_new_tokens, params, algo, args.draft_tokens, stop=stops)
        base = engine.generate(prompt, args.max_new_tokens, params, "none") if args.compare else None
        _print_generation(args, res, base)
    return 0


def _check_generate(args) -> tuple:
    """(sampling params, prompts, algorithm, stop strings) of `generate`, every flag checked before a model
    loads."""
    from .sampling import SamplingParams

    if (args.prompt is None) == (args.prompts_file is None):
        raise InvalidArgument("give either a PROMPT or --prompts-file, not both or neither")
    if not args.target:
        raise InvalidArgument("--target is required")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).validate()
    stops = check_stops(args.stop)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    if any(not p for p in prompts):
        raise InvalidArgument("the prompt is empty")
    algo = args.algorithm
    if algo not in ("auto", "same", "tli", "slem", "slrs", "none"):
        raise InvalidArgument(f"unknown algorithm {algo!r}; choose one of auto, same, tli, slem, slrs, none")
    if algo not in ("none", "auto") and not args.drafter:
        raise InvalidArgument(f"algorithm {algo!r} needs --drafter")
    if args.draft_top_k < 0:
        raise InvalidArgument(f"--draft-top-k must be >= 0, got {args.draft_top_k}")
    if not 1 <= args.batch_size <= 1024:
        raise InvalidArgument(f"--batch-size must be in [1, 1024], got {args.batch_size}")
    check_slrs_args(args)
    return params, prompts, algo, stops


def _print_generation(args, res, base=None) -> None:
    """One generation on stdout (its text, or with --json its JSON), its statistics on stderr; with
    `base` (the target alone on the same prompt) the speedup and whether the outputs are identical."""
    out = res.as_json()
    if base is not None and res.algorithm != "none":
        out["target_alone_seconds"] = round(base.seconds, 6)
        out["speedup"] = round(base.seconds / res.seconds * res.new_tokens / max(base.new_tokens, 1), 3) \
            if res.seconds else None
        out["identical_to_target_alone"] = base.ids == res.ids
    if args.json:
        print(json.dumps(out, ensure_ascii=False), flush=True)
        return
    sys.stdout.write(res.text + "\n")
    line = (f"[{res.algorithm}] {res.new_tokens} tokens in {res.seconds:.2f}s "
            f"({out['tokens_per_second']} tok/s), {res.rounds} target passes, "
            f"accepted {res.accepted_tokens}/{res.draft_tokens} drafted")
    if "speedup" in out:
        line += (f"; target alone {out['target_alone_seconds']:.2f}s -> speedup {out['speedup']}x, "
                 f"identical: {out['identical_to_target_alone']}")
    print(line, file=sys.stderr, flush=True)


def _generate_batch(args, engine, prompts: list, params, algo: str, stops: list) -> int:
    """`generate --batch-size N`: the prompts run together, N sessions at a time, their forward passes
    batched (`Engine.generate_batch`); each printed as it would be alone, then the batch's throughput
    (and, with --compare, the target alone batched the same way)."""
    import time

    t0 = time.perf_counter()
    results = engine.generate_batch(prompts, args.max_new_tokens, params, algo, args.draft_tokens, args.batch_size,
                                    stop=stops)
    wall = time.perf_counter() - t0
    bases, base_wall = None, None
    if args.compare:
        t0 = time.perf_counter()
        bases = engine.generate_batch(prompts, args.max_new_tokens, params, "none", None, args.batch_size)
        base_wall = time.perf_counter() - t0
    for i, res in enumerate(results):
        _print_generation(args, res, bases[i] if bases else None)
    tokens = sum(r.new_tokens for r in results)
    line = f"batch of {len(prompts)} prompts, {args.batch_size} at a time: {tokens} tokens in {wall:.2f}s " \
           f"({tokens / wall:.1f} tok/s over all sessions)"
    if bases:
        base_tokens = sum(r.new_tokens for r in bases)
        same = sum(r.ids == b.ids for r, b in zip(results, bases))
        line += (f"; target alone batched {base_tokens / base_wall:.1f} tok/s -> "
                 f"{(tokens / wall) / (base_tokens / base_wall):.2f}x, identical {same}/{len(results)}")
    print(line, file=sys.stderr, flush=True)
    return 0


def cmd_hash_key(args, stdin=None) -> int:
    """`crossdraft hash-key`: NAME:SHA256HEX of a key read from stdin (or of a new one, printed to stderr)."""
    import hashlib

    if args.new:
        import secrets

        key = secrets.token_urlsafe(32)
        print(key, file=sys.stderr)
    else:
        key = (stdin or sys.stdin).readline().strip()
        if not key:
            raise InvalidArgument("no key on stdin (or give --new for a new one)")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    print(f"{args.name or 'key-' + digest[:8]}:{digest}")
    return 0


def cmd_new_verdict_key(args) -> int:
    from .seal import new_key_file

    if os.path.exists(args.file):
        raise InvalidArgument(f"{args.file} exists; remove it first to replace the key")
    print(new_key_file(args.file))
    return 0


def cmd_serve(args) -> int:
    if not 1 <= args.max_sessions <= 4096:
        raise InvalidArgument(f"--max-sessions must be in [1, 4096], got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be in [0, 65535], got {args.port}")
    if getattr(args, "http_port", None) is not None and not 0 <= args.http_port <= 65535:
        raise InvalidArgument(f"--http-port must be in [0, 65535], got {args.http_port}")
    for name in ("drafter_timeout", "failover_seconds", "session_lease", "slow_client_seconds",
                 "store_wait_seconds"):
        v = getattr(args, name, None)
        if v is not None and not 0.1 <= v <= 86400:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be in [0.1, 86400] seconds, got {v}")
    if args.role != "gateway":
        check_batching_args(args)
    if not 0 <= getattr(args, "metrics_port", 0) <= 65535:
        raise InvalidArgument(f"--metrics-port must be in [0, 65535], got {args.metrics_port}")
    if getattr(args, "verdict_key_file", None):
        from .seal import sealer_from_args

        sealer_from_args(args)  # an unreadable or short key is a usage error now, not at the first session
    if args.role in ("gateway", "all"):
        args.redis = redis_url_with_password(args.redis)
    if args.role == "gateway":
        from gateway.server import serve as serve_gateway

        return serve_gateway(args)
    from .runner import check_local

    if args.role == "all":
        check_local(args.target)
        check_local(args.drafter)
        setup_torch(args)
        from .compose import serve_all

        return serve_all(args)
    check_local(args.model)
    setup_torch(args)
    if args.role == "verifier":
        from verifier_service.server import serve
    else:
        from drafter_service.server import serve
    return serve(args)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            setup_torch(args)
            if args.concurrency:
                from .loadbench import run_concurrency

                return run_concurrency(args)
            from .bench import run_bench

            return run_bench(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "hash-key":
            return cmd_hash_key(args)
        if args.command == "new-verdict-key":
            return cmd_new_verdict_key(args)
    except CrossdraftError as e:
        print(f"crossdraft: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("crossdraft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place unexpected errors become one line
        if getattr(args, "debug", False):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"crossdraft: internal error: {type(e).__name__}: {first} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
