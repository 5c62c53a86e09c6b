"""`auto` against the best fixed configuration, over several runs of scripts/bench_auto.sh.

One run's "best fixed" is the fastest of 5-15 configurations measured once each, so it is biased
upwards by the noise (the maximum of several noisy numbers): on this machine configurations 3-5% apart
swap places from run to run. Pooling runs removes most of that bias: each configuration's tokens/s is
summed over the runs (total tokens over total seconds), and auto is compared with the best pooled
configuration. Under sampling, runs of different seeds (`--seed`, in each file's meta; shown as sN) also
average over the sampled texts, on which acceptance depends as much as on the configuration. Prints one
row per drafter and decoding mode: each run's ratio, and the pooled one.

Where the files carry per-prompt figures (bench JSON since it writes `per_prompt`), it also prints a
bootstrap interval for the pooled ratio: prompts (of every run) are drawn with replacement, and for each
draw the pooled ratio is computed again, best fixed configuration re-chosen included. The interval says
how far the ratio could move with other texts of the same kind; it is not a correction of the bias above.

The target alone counts as a configuration (`none` is one of auto's arms, and issue 13's goal is auto
against the better of the target alone and the best fixed algorithm); `--fixed-only` leaves it out, as the
summaries written before `none` was an arm did (docs/bench/cpu-auto-summary.txt).

    python3 scripts/auto_summary.py docs/bench/cpu-auto-greedy-run*.json docs/bench/cpu-auto-t1-run*.json
"""
import argparse
import json
import random
import sys
from collections import defaultdict

DRAWS = 2000


def _rates(units) -> dict:
    """{config: tokens/s} pooled over `units` ({config: (tokens, seconds)} each: a run, or a prompt)."""
    tok, sec = defaultdict(int), defaultdict(float)
    for u in units:
        for c, (t, s) in u.items():
            tok[c] += t
            sec[c] += s
    return {c: tok[c] / sec[c] for c in tok if sec[c] > 0}


def _vs_best(rate: dict) -> tuple:
    """(the best fixed configuration, auto's rate over its rate)."""
    best = max((c for c in rate if c != "auto"), key=rate.get, default=None)
    return best, (rate["auto"] / rate[best] if "auto" in rate and best else float("nan"))


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"auto_summary: cannot read {path}: {e}")
    if not isinstance(doc, dict) or "meta" not in doc or "results" not in doc:
        raise SystemExit(f"auto_summary: {path} is not a `crossdraft bench --json-out` file")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("files", nargs="+", help="`crossdraft bench --json-out` files (runs of scripts/bench_auto.sh)")
    ap.add_argument("--fixed-only", action="store_true",
                    help="compare auto with the fixed algorithms only, not with the target alone")
    args = ap.parse_args(argv)
    runs = defaultdict(list)  # (mode, drafter) -> [(seed, {config: (tokens, seconds)}, [per prompt units] or None)]
    alone = {}  # file -> the target alone's row, a configuration of every drafter in that file
    for p in args.files:
        doc = _read(p)
        mode = "greedy" if not doc["meta"]["temperature"] else f"T={doc['meta']['temperature']:g}"
        per = defaultdict(dict)
        prompts = defaultdict(dict)  # drafter -> config -> [[tokens, seconds] per prompt]
        rows = [r for r in doc["results"] if not r.get("error") and r.get("seconds")]
        alone[p] = next((r for r in rows if r["config"] == "target alone"), None)
        for r in rows:
            if r["config"] == "target alone":
                continue
            per[r["drafter"]][r["config"]] = (r["new_tokens"], r["seconds"])
            if r.get("per_prompt"):
                prompts[r["drafter"]][r["config"]] = r["per_prompt"]
        if alone[p] is not None and not args.fixed_only:
            for drafter in per:
                per[drafter]["target alone"] = (alone[p]["new_tokens"], alone[p]["seconds"])
                if alone[p].get("per_prompt") and drafter in prompts:
                    prompts[drafter]["target alone"] = alone[p]["per_prompt"]
        for drafter, configs in per.items():
            pp = prompts.get(drafter)
            units = None
            if pp and len(pp) == len(configs) and len({len(v) for v in pp.values()}) == 1:
                n = len(next(iter(pp.values())))
                units = [{c: tuple(v[i]) for c, v in pp.items()} for i in range(n)]
            runs[(mode, drafter)].append((doc["meta"].get("seed", 0), configs, units))
    print(f"{'mode':7s} {'drafter':18s} {'per run: auto / best fixed of that run':42s} pooled  "
          f"[95% bootstrap over prompts]  (best pooled fixed)")
    rng = random.Random(0)
    for (mode, drafter), rs in sorted(runs.items()):
        ratios = []
        for seed, configs, _ in rs:
            if "auto" in configs and len(configs) > 1:
                ratios.append(f"{_vs_best(_rates([configs]))[1]:.2f}" + (f"(s{seed})" if mode != "greedy" else ""))
        rate = _rates([configs for _, configs, _ in rs])
        best, ratio = _vs_best(rate)
        interval = "-"
        units = [u for _, _, us in rs if us for u in us]
        if all(us for _, _, us in rs) and len(units) >= 2:
            draws = sorted(_vs_best(_rates([rng.choice(units) for _ in units]))[1] for _ in range(DRAWS))
            interval = f"[{draws[int(0.025 * DRAWS)]:.2f}, {draws[int(0.975 * DRAWS) - 1]:.2f}]"
        print(f"{mode:7s} {drafter:18s} {' '.join(ratios):42s} {ratio:.3f}   {interval:27s}  "
              f"({best} {rate[best]:.1f} tok/s, auto {rate.get('auto', 0):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
