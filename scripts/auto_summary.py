"""`auto` against the best fixed configuration, over several runs of scripts/bench_auto.sh.

One run's "best fixed" is the fastest of 5-15 configurations measured once each, so it is biased
upwards by the noise (the maximum of several noisy numbers): on this machine configurations 3-5% apart
swap places from run to run. Pooling runs removes most of that bias: each configuration's tokens/s is
summed over the runs (total tokens over total seconds), and auto is compared with the best pooled
configuration. Under sampling, runs of different seeds (`--seed`, in each file's meta; shown as sN) also
average over the sampled texts, on which acceptance depends as much as on the configuration. Prints one
row per drafter and decoding mode: each run's ratio, and the pooled one.

    python3 scripts/auto_summary.py docs/bench/cpu-auto-greedy-run*.json docs/bench/cpu-auto-t1-run*.json
"""
import json
import sys
from collections import defaultdict


def main(paths) -> int:
    runs = defaultdict(list)  # (mode, drafter) -> [(file, {config: (tokens, seconds)})]
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        mode = "greedy" if not doc["meta"]["temperature"] else f"T={doc['meta']['temperature']:g}"
        per = defaultdict(dict)
        for r in doc["results"]:
            if r.get("error") or not r.get("seconds") or r["config"] == "target alone":
                continue
            per[r["drafter"]][r["config"]] = (r["new_tokens"], r["seconds"])
        for drafter, configs in per.items():
            runs[(mode, drafter)].append((doc["meta"].get("seed", 0), configs))
    print(f"{'mode':7s} {'drafter':18s} {'per run: auto / best fixed of that run':42s} pooled  (best pooled fixed)")
    for (mode, drafter), rs in sorted(runs.items()):
        ratios = []
        pooled = defaultdict(lambda: [0, 0.0])
        for seed, configs in rs:
            fixed = {c: v[0] / v[1] for c, v in configs.items() if c != "auto"}
            if "auto" in configs and fixed:
                r = configs["auto"][0] / configs["auto"][1] / max(fixed.values())
                ratios.append(f"{r:.2f}" + (f"(s{seed})" if mode != "greedy" else ""))
            for c, (tok, sec) in configs.items():
                pooled[c][0] += tok
                pooled[c][1] += sec
        rate = {c: tok / sec for c, (tok, sec) in pooled.items()}
        best = max((c for c in rate if c != "auto"), key=rate.get)
        ratio = rate["auto"] / rate[best] if "auto" in rate else float("nan")
        print(f"{mode:7s} {drafter:18s} {' '.join(ratios):42s} {ratio:.2f}    "
              f"({best} {rate[best]:.1f} tok/s, auto {rate.get('auto', 0):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
