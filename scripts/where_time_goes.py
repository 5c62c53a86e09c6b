"""Where a concurrency level's time goes, through the services: per level, the aggregate tokens/s and
latencies (`loadbench.run_level`), the verifier's forward seconds and passes (its /metrics), and the CPU
seconds each process used (/proc, Linux). What docs/benchmarks.md's back-to-back comparisons were made
with: run it in two checkouts in turn (`--root`), alternating, and compare within the pair.

    .venv/bin/python scripts/where_time_goes.py --algorithm none --levels 1,4,8
    git worktree add /tmp/old HEAD~1 && (cd /tmp/old && PYTHONPATH=/tmp/old \\
        /work/main/.venv/bin/python /work/main/scripts/where_time_goes.py --root /tmp/old)

Prints one block per level and writes JSON (--json-out). Never asserts anything about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types
import urllib.request


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram(url: str, name: str) -> tuple:
    """(sum, count) of a Prometheus histogram over all its label sets."""
    total = count = 0.0
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count += float(line.split()[-1])
    return total, count


def level(cl, loadbench, prompts, args, n: int, algorithm: str) -> dict:
    before = {name: cpu_seconds(p.pid) for name, p, _ in cl.procs}
    me = sum(os.times()[:2])
    f0 = histogram(cl.metrics["verifier"], "crossdraft_forward_seconds")
    d0 = drafter_rounds(cl)
    r = loadbench.run_level(cl.gateway, prompts, args, algorithm, args.drafter, n, cl.metrics["verifier"])
    f1 = histogram(cl.metrics["verifier"], "crossdraft_forward_seconds")
    d1 = drafter_rounds(cl)
    cpu = {name: round(cpu_seconds(p.pid) - before[name], 2) for name, p, _ in cl.procs}
    cpu["client"] = round(sum(os.times()[:2]) - me, 2)
    rounds = d1["rounds"] - d0["rounds"]
    per_round = {k: round((d1[k] - d0[k]) / rounds * 1e3, 3) for k in ROUND_PARTS} if rounds else {}
    return dict(r, forward_s=round(f1[0] - f0[0], 3), passes=int(f1[1] - f0[1]), cpu_s=cpu,
                drafter_rounds=int(rounds), drafter_round_ms=per_round)


ROUND_PARTS = {"draft": "crossdraft_round_draft_seconds", "verify": "crossdraft_round_verify_seconds",
               "network": "crossdraft_round_network_seconds", "round": "crossdraft_round_seconds"}


def drafter_rounds(cl) -> dict:
    """The drafters' round histograms (their /metrics), summed: seconds per part, and the rounds."""
    out = dict.fromkeys(ROUND_PARTS, 0.0)
    out["rounds"] = 0.0
    for name, url in cl.metrics.items():
        if name.startswith("drafter"):
            for part, metric in ROUND_PARTS.items():
                total, count = histogram(url, metric)
                out[part] += total
                out["rounds"] += count if part == "round" else 0
    return out


def pass_shapes(path: str) -> list:
    """The verifier's --pass-log by shape: passes of n whole steps of the same size and no prefill chunk
    ("8 x 1": eight target steps), and those with prefill chunks ("with prefill") apart; medians."""
    groups: dict = {}
    with open(path) as fh:
        for line in fh:
            p = json.loads(line)
            if p.get("model") != "verifier":
                continue
            if p["chunks"]:
                key = "with prefill"
            elif len(set(p["steps"])) == 1:
                key = f"{len(p['steps'])} x {p['steps'][0]}"
            else:
                key = "mixed steps"
            groups.setdefault(key, []).append(p)
    return [{"shape": k, "passes": len(v), "forward_ms": round(statistics.median(p["forward_ms"] for p in v), 2),
             "after_ms": round(statistics.median(p["after_ms"] for p in v), 2)}
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the checkout to measure (its crossdraft package is imported; default: this one)")
    ap.add_argument("--zoo", default=os.environ.get("CROSSDRAFT_ZOO", "/work/shared/zoo"))
    ap.add_argument("--algorithm", default="none",
                    help="the sessions' algorithm, or several comma-separated, run in turn at each level (default: none)")
    ap.add_argument("--drafter", default="drafter-spm4k")
    ap.add_argument("--levels", default="1,8", help="client counts, comma-separated (default: 1,8)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--pin-cpus", action="store_true",
                    help="the other services and this process on the last core, the verifier on any (as bench --pin-cpus)")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="a fixed draft length for the speculative sessions (default: adaptive, under the load cap)")
    ap.add_argument("--repeat", type=int, default=1, help="run the levels this many times in turn (default 1)")
    ap.add_argument("--json-out", default="", help="write the figures here too")
    ap.add_argument("--model-args", default="",
                    help="more flags for the verifier and the drafter, space-separated (e.g. --kv-dtype bfloat16)")
    ap.add_argument("--drafter-args", default="", help="more flags for the drafter, space-separated (e.g. --draft-ahead)")
    ap.add_argument("--pass-log", default="", metavar="FILE",
                    help="the verifier's --pass-log (one JSON line per pass), summarised at the end by pass shape")
    args = ap.parse_args()
    sys.path.insert(0, args.root)
    from crossdraft import loadbench
    from crossdraft.client import Client
    from crossdraft.local_cluster import LocalCluster
    from crossdraft.prompts import read_prompts

    levels = [int(x) for x in args.levels.split(",")]
    algorithms = args.algorithm.split(",")
    prompts = read_prompts(os.path.join(args.zoo, "dev-prompts.jsonl"), chars=800,
                           limit=max(levels) * args.requests_per_client, min_chars=2000)
    run_args = types.SimpleNamespace(requests_per_client=args.requests_per_client, algorithm=args.algorithm,
                                     drafter=args.drafter, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                     seed=0, draft_tokens=args.draft_tokens)
    cl = LocalCluster(os.path.join(args.zoo, "target-bpe8k"), [os.path.join(args.zoo, args.drafter)], threads=1,
                      metrics=True, pin=args.pin_cpus, model_args=("--max-sessions", str(max(16, max(levels))), *args.model_args.split()),
                      drafter_args=tuple(args.drafter_args.split()),
                      verifier_args=("--pass-log", args.pass_log) if args.pass_log else ()).start()
    cl.pin_caller()
    rows = []
    try:
        with Client(cl.gateway, timeout=600) as c:  # warm-up
            for a in algorithms:
                c.generate(prompts[0], 8, 0.0, 0, a, None, drafter=args.drafter)
        for n, a in [(n, a) for n in levels * max(1, args.repeat) for a in algorithms]:
            r = dict(level(cl, loadbench, prompts, run_args, n, a), algorithm=a)
            rows.append(r)
            print(f"C={n} {a}: {r['tokens_per_second']} tok/s in {r['seconds']} s, itl p50/p95 "
                  f"{r['itl_p50_ms']}/{r['itl_p95_ms']} ms, batch {r['verifier_batch']}, tok/rnd {r['tokens_per_round']}")
            print(f"    verifier forward {r['forward_s']} s in {r['passes']} passes; CPU s: "
                  + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()), flush=True)
            if r["drafter_rounds"]:
                print(f"    drafter: {r['drafter_rounds']} rounds, ms per round: "
                      + ", ".join(f"{k} {v}" for k, v in r["drafter_round_ms"].items()), flush=True)
    finally:
        cl.stop()
    shapes = pass_shapes(args.pass_log) if args.pass_log else []
    for r in shapes:
        print(f"passes {r['shape']}: {r['passes']}, forward {r['forward_ms']} ms, after it {r['after_ms']} ms "
              f"(medians)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"root": args.root, "algorithm": args.algorithm, "drafter": args.drafter,
                       "drafter_args": args.drafter_args, "model_args": args.model_args, "draft_tokens": args.draft_tokens,
                       "results": rows, "pass_shapes": shapes}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
