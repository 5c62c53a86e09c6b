"""`crossdraft bench --concurrency 1,4,8,16`: many users at once, through the services.

Owns: the concurrency benchmark. It starts redis-server, a verifier, the drafters and a gateway as
separate processes on loopback (`LocalCluster`, each with `--threads` torch threads, default 1), or
takes a running gateway (`--gateway`, with `--verifier-metrics` for the batch sizes). For each level C
and each configuration (the target alone, `--algorithm none`, and each speculative configuration,
`auto` by default) it runs C concurrent clients, each generating `--requests-per-client` times from
prompts no other client uses, and measures:
- aggregate tokens/s: all tokens over the wall time from the first request to the last end;
- per-session tokens/s: each session's tokens over its own time, mean over sessions;
- time to first token (client side: request to first streamed delta) and inter-token latency (a
  session's time from its first delta to its last over the tokens after the first), p50 and p95;
- the mean batch size at the verifier (sequences per forward pass, from its /metrics histogram).
In the same run, the baseline that users compare with: Hugging Face transformers' `generate()` of the
same target on a plain left-padded batch of the same C prompts, in this process, with one torch thread
(the `--threads` of the services). Ratios are within one run; prints a table and writes JSON.

Never: asserts thresholds, or measures anything in the services' own processes but their metrics.
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from .errors import InvalidArgument


def levels(text: str) -> list:
    """'1,4,8,16' -> [1, 4, 8, 16] (each in [1, 256])."""
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InvalidArgument(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not out or out[0] < 1 or out[-1] > 256:
        raise InvalidArgument(f"--concurrency levels must be in [1, 256], got {text!r}")
    return out


def _pct(xs: list, q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def scrape_batches(url: Optional[str]) -> tuple:
    """(count, sum) of the verifier's crossdraft_batch_sequences histogram; (0, 0) without a URL."""
    if not url:
        return 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    count = total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "crossdraft_batch_sequences_count":
                count += s.value
            elif s.name == "crossdraft_batch_sequences_sum":
                total += s.value
    return count, total


def _session(client, prompt: str, args, algorithm: str, drafter: str) -> dict:
    """One streamed generation, timed at the client."""
    t0 = time.perf_counter()
    first = last = None
    tokens = first_tokens = rounds = candidates = 0
    for msg in client.events(prompt, args.max_new_tokens, args.temperature, args.seed, algorithm,
                             args.draft_tokens, drafter=drafter):
        if msg.WhichOneof("event") == "end":
            rounds, candidates = msg.end.stats.rounds, msg.end.stats.draft_tokens
        if msg.WhichOneof("event") != "delta" or not msg.delta.ids:
            continue
        now = time.perf_counter()
        if first is None:
            first, first_tokens = now, len(msg.delta.ids)
        last = now
        tokens += len(msg.delta.ids)
    end = time.perf_counter()
    itl = (last - first) / (tokens - first_tokens) if first is not None and tokens > first_tokens else None
    return {"tokens": tokens, "seconds": end - t0, "ttft": (first - t0) if first else None, "itl": itl,
            "rounds": rounds, "candidates": candidates, "t0": t0}


def run_level(address: str, prompts: list, args, algorithm: str, drafter: str, clients: int,
              metrics_url: Optional[str]) -> dict:
    """C clients at once, each on its own prompts; the level's figures."""
    from .client import Client

    per_client = args.requests_per_client
    jobs = [prompts[c * per_client:(c + 1) * per_client] for c in range(clients)]
    sessions, errors = [], []
    lock = threading.Lock()

    def client_loop(mine: list) -> None:
        with Client(address, timeout=600) as client:
            for p in mine:
                try:
                    rec = _session(client, p, args, algorithm, drafter)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {str(e)[:120]}")
                    continue
                with lock:
                    sessions.append(rec)

    c0, s0 = scrape_batches(metrics_url)
    threads = [threading.Thread(target=client_loop, args=(j,), daemon=True) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    c1, s1 = scrape_batches(metrics_url)
    tokens = sum(s["tokens"] for s in sessions)
    ttft = [s["ttft"] for s in sessions if s["ttft"] is not None]
    itl = [s["itl"] for s in sessions if s["itl"] is not None]
    rounds = sum(s["rounds"] for s in sessions)
    return {"clients": clients, "sessions": len(sessions), "errors": errors, "tokens": tokens,
            "seconds": round(wall, 4), "tokens_per_second": round(tokens / wall, 2) if wall else None,
            "session_tokens_per_second": round(statistics.mean(s["tokens"] / s["seconds"] for s in sessions), 2)
            if sessions else None,
            "ttft_p50_ms": _ms(_pct(ttft, 0.5)), "ttft_p95_ms": _ms(_pct(ttft, 0.95)),
            "itl_p50_ms": _ms(_pct(itl, 0.5)), "itl_p95_ms": _ms(_pct(itl, 0.95)),
            "verifier_batch": round((s1 - s0) / (c1 - c0), 2) if c1 > c0 else None,
            # speculation as it ran: tokens committed and candidates verified per round (1 and 0: the
            # target's own steps, where the load cap or auto's arm `none` stopped drafting)
            "tokens_per_round": round(tokens / rounds, 2) if rounds else None,
            "candidates_per_round": round(sum(s["candidates"] for s in sessions) / rounds, 2) if rounds else None,
            "per_session": _per_session(sessions, t0)}


def _per_session(sessions: list, t0: float) -> list:
    """Each session's start (ms after the level's), time to first token, inter-token latency and tokens,
    in the order they started: where a latency percentile comes from (a session whose first token comes
    before other sessions' prefills carries them in its inter-token latency; docs/benchmarks.md)."""
    return [{"start_ms": _ms(s["t0"] - t0), "ttft_ms": _ms(s["ttft"]), "itl_ms": _ms(s["itl"]), "tokens": s["tokens"]}
            for s in sorted(sessions, key=lambda s: s["t0"])]


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x * 1e3, 2)


def hf_batched(target: str, prompts: list, args, clients: int) -> dict:
    """Hugging Face `generate()` of the target on a left-padded batch of `clients` prompts, one torch
    thread, greedy (or sampled at --temperature); `--requests-per-client` batches in a row, as the
    services' clients do. Aggregate tokens/s over the batches' wall time (prompt encoding included)."""
    import torch

    from .vocab import Vocab

    model = _hf_model(target)
    tok = Vocab.load(target).hf
    tok.padding_side = "left"
    if tok.pad_token is None:  # (the zoo's target pads with its EOS, as its generation config says)
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    tokens, t0 = 0, time.perf_counter()
    try:
        for r in range(args.requests_per_client):
            batch = [prompts[c * args.requests_per_client + r] for c in range(clients)]
            enc = tok(batch, return_tensors="pt", padding=True)
            gen = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, pad_token_id=pad)
            if args.temperature > 0:
                torch.manual_seed(args.seed + r)
                gen.update(do_sample=True, temperature=args.temperature)
            else:
                gen.update(do_sample=False)
            with torch.inference_mode():
                out = model.generate(**enc, **gen)
            tokens += out[:, enc["input_ids"].shape[1]:].numel()  # (min_new_tokens: every row runs to the end)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    return {"clients": clients, "tokens": tokens, "seconds": round(wall, 4),
            "tokens_per_second": round(tokens / wall, 2)}


_HF: dict = {}


def _hf_model(target: str):
    if target not in _HF:
        from .runner import load_model

        _HF[target] = load_model(target, "cpu")
    return _HF[target]


def _configs(args) -> list:
    """[(label, algorithm, drafter name)]: the target alone, then each algorithm with each drafter."""
    algos = [a.strip() for a in (args.algorithms or "auto").split(",") if a.strip() and a.strip() != "none"]
    names = [Path(d).name for d in args._drafter_dirs]
    return [("target alone", "none", names[0] if names else "")] + \
        [(f"{a} {n}", a, n) for n in names for a in algos]


def _start(args, log) -> tuple:
    """(gateway address, verifier /metrics URL or None, the cluster to stop or None)."""
    if args.gateway:
        return args.gateway, args.verifier_metrics, None
    from .local_cluster import LocalCluster

    threads = args.threads or 1
    log(f"starting redis-server, a verifier, {len(args._drafter_dirs)} drafter(s) and a gateway "
        f"({threads} torch thread(s) each) ...")
    cluster = LocalCluster(args.target, list(args._drafter_dirs), threads=threads, pin=args.pin_cpus,
                           metrics=True, model_args=("--max-sessions", str(max(16, max(args._levels))),
                                                       "--kv-dtype", getattr(args, "kv_dtype", "auto"))).start()
    cluster.pin_caller()
    return cluster.gateway, cluster.metrics.get("verifier"), cluster


def run_concurrency(args) -> int:
    from .bench import resolve_drafters
    from .prompts import read_prompts

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args._levels = levels(args.concurrency)
    if args.requests_per_client < 1:
        raise InvalidArgument(f"--requests-per-client must be >= 1, got {args.requests_per_client}")
    need = max(args._levels) * args.requests_per_client
    prompts = read_prompts(args.prompts_file, chars=args.prompt_chars, limit=need, min_chars=args.min_chars)
    if len(prompts) < need:
        raise InvalidArgument(f"{args.prompts_file}: {len(prompts)} prompts of at least {args.min_chars} characters, "
                              f"need {need} ({max(args._levels)} clients x {args.requests_per_client})")
    args._drafter_dirs = resolve_drafters(args.target, args.drafters if args.drafters is not None
                                          else ["drafter-spm4k"])
    configs = _configs(args)
    address, metrics_url, cluster = _start(args, log)
    rows = []
    try:
        from .client import Client

        with Client(address, timeout=600) as c:  # warm-up: every configuration once, briefly
            for _, algo, drafter in configs:
                c.generate(prompts[0], 8, args.temperature, args.seed, algo, args.draft_tokens, drafter=drafter)
        for n in args._levels:
            if not args.no_hf:
                rows.append(dict(config="HF generate() batched", **hf_batched(args.target, prompts, args, n)))
                log(f"C={n}: HF generate() {rows[-1]['tokens_per_second']} tok/s")
            for label, algo, drafter in configs:
                row = dict(config=label, algorithm=algo, drafter=drafter,
                           **run_level(address, prompts, args, algo, drafter, n, metrics_url))
                rows.append(row)
                log(f"C={n}: {label} {row['tokens_per_second']} tok/s (batch {row['verifier_batch']}, "
                    f"{len(row['errors'])} errors)")
    finally:
        if cluster is not None:
            cluster.stop()
    _ratios(rows)
    _print(rows, args)
    meta = {"levels": args._levels, "requests_per_client": args.requests_per_client, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed, "prompt_chars": args.prompt_chars,
            "threads": args.threads or 1, "target": args.target, "drafters": [str(d) for d in args._drafter_dirs],
            "pinned": bool(args.pin_cpus), "gateway": args.gateway or None, "kv_dtype": getattr(args, "kv_dtype", "auto")}
    with open(args.json_out, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=2)
    print(f"\nwrote {args.json_out}")
    return 0


def _ratios(rows: list) -> None:
    """Each row against the target alone and Hugging Face's batched generate() at the same level."""
    by = {(r["config"], r["clients"]): r for r in rows}
    for r in rows:
        for key, ref in (("vs_target_alone", "target alone"), ("vs_hf", "HF generate() batched")):
            base = by.get((ref, r["clients"]))
            if r["config"].startswith("HF"):
                continue
            if base and base is not r and base.get("tokens_per_second") and r.get("tokens_per_second"):
                r[key] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)


def _print(rows: list, args) -> None:
    f = lambda v, fmt: (fmt % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
    print(f"\ncrossdraft bench --concurrency: {args.max_new_tokens} new tokens per request, "
          f"{args.requests_per_client} request(s) per client, {'greedy' if args.temperature <= 0 else 'T=%g' % args.temperature}, "
          f"{args.threads or 1} torch thread(s) per process"
          + (f", KV caches {args.kv_dtype}" if getattr(args, "kv_dtype", "auto") != "auto" else ""))
    hdr = (f"{'C':>3s} {'config':26s} {'agg tok/s':>9s} {'sess tok/s':>10s} {'ttft p50':>8s} {'ttft p95':>8s} "
           f"{'itl p50':>7s} {'itl p95':>7s} {'batch':>5s} {'tok/rnd':>7s} {'cand/rnd':>8s} {'vs alone':>8s} "
           f"{'vs HF':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        r.setdefault("session_tokens_per_second", None)
        err = f"  ({len(r['errors'])} errors: {r['errors'][0]})" if r.get("errors") else ""
        print(f"{r['clients']:3d} {r['config']:26s} {f(r['tokens_per_second'], '%9.1f')} "
              f"{f(r.get('session_tokens_per_second'), '%10.1f')} {f(r.get('ttft_p50_ms'), '%8.1f')} "
              f"{f(r.get('ttft_p95_ms'), '%8.1f')} {f(r.get('itl_p50_ms'), '%7.2f')} {f(r.get('itl_p95_ms'), '%7.2f')} "
              f"{f(r.get('verifier_batch'), '%5.2f')} {f(r.get('tokens_per_round'), '%7.2f')} "
              f"{f(r.get('candidates_per_round'), '%8.2f')} {f(r.get('vs_target_alone'), '%7.2fx')} "
              f"{f(r.get('vs_hf'), '%5.2fx')}{err}")
