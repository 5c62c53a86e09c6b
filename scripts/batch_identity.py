"""How many of the zoo's held-out prompts give byte-identical greedy text at batch 1 and at batch N.

With torch's kernels, batched matrix products round differently in the last bits from one sequence alone
(crossdraft/runner.py, `_Linear`), so a near-tie between two tokens can flip when a session shares its
passes; crossdraft's CPU kernel (crossdraft/kernels) computes each row the same whatever shares its pass,
and a verification block's attention may still round differently from one-token steps'. This counts how
often outputs differ on real prompts: the target alone (`--algorithm none`) one prompt at a time
(`Engine.generate`), then the same prompts N at a time through the scheduler (`Engine.generate_batch`),
and the same with a drafter (default: slem with drafter-spm4k), whose batched output is compared with
the target alone at batch 1. Prints a table; writes JSON with --json-out.

    .venv/bin/python scripts/batch_identity.py --num-prompts 24 --batch-size 8 --json-out docs/bench/batch-identity.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    zoo = os.environ.get("CROSSDRAFT_ZOO", os.path.join(here, "..", "..", "shared", "zoo"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=os.path.join(zoo, "target-bpe8k"))
    ap.add_argument("--drafter", default=os.path.join(zoo, "drafter-spm4k"))
    ap.add_argument("--algorithm", default="slem", help="the speculative configuration also checked (default: slem)")
    ap.add_argument("--prompts-file", default=os.path.join(zoo, "dev-prompts.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtype", choices=("auto", "bfloat16"), default="auto", help="what the KV caches hold")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(here, ".."))
    from crossdraft.engine import Engine
    from crossdraft.prompts import read_prompts
    from crossdraft.sampling import SamplingParams

    prompts = read_prompts(args.prompts_file, chars=800, limit=args.num_prompts)
    engine = Engine.load(args.target, args.drafter, device="cpu", dtype=torch.float32,
                         kv_dtype=None if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype))
    greedy = SamplingParams()
    t0 = time.perf_counter()
    alone = [engine.generate(p, args.max_new_tokens, greedy, "none") for p in prompts]
    rows = {"target alone, batch 1": (alone, time.perf_counter() - t0)}
    for algo in ("none", args.algorithm):
        t0 = time.perf_counter()
        got = engine.generate_batch(prompts, args.max_new_tokens, greedy, algo, concurrency=args.batch_size)
        rows[f"{algo}, batch {args.batch_size}"] = (got, time.perf_counter() - t0)
    out = {"target": args.target, "drafter": args.drafter, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "dtype": "float32", "kv_dtype": args.kv_dtype, "rows": []}
    print(f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, greedy, float32, KV caches "
          f"{'float32' if args.kv_dtype == 'auto' else args.kv_dtype}, CPU")
    print(f"{'configuration':24s} {'identical to batch 1':>20s} {'tok/s':>8s}")
    for name, (results, seconds) in rows.items():
        same = sum(r.text == a.text for r, a in zip(results, alone))
        tokens = sum(r.new_tokens for r in results)
        print(f"{name:24s} {f'{same}/{len(prompts)}':>20s} {tokens / seconds:8.1f}")
        out["rows"].append({"configuration": name, "identical": same, "of": len(prompts),
                            "tokens_per_second": round(tokens / seconds, 2),
                            "differ": [i for i, (r, a) in enumerate(zip(results, alone)) if r.text != a.text]})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
