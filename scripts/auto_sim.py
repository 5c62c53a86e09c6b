#!/usr/bin/env python3
"""Simulate `auto`'s search (crossdraft/auto.py) on synthetic arms, to compare search rules quickly.

What it models, per round of an arm: a wall time (the arm's round time, times the prompt's context factor,
times lognormal noise of `--time-noise`), and the tokens committed (1, plus drafted tokens accepted one
after another with the arm's acceptance, times the prompt's text factor for that arm). The first round of
a drafter after another arm pays a catch-up (1 ms + 0.05 ms per token it missed) and is not measured, as
in `rounds.run_rounds`. Each scenario sets the arms' rates as measured on the zoo's CPU (docs/benchmarks.md,
"auto's search at temperature 1"): with float32 panels at T=1 (the target's own step 3.85 ms a token, tli
rounds 5.7 ms: `none_best`, `close`, `tli_best`), and with bfloat16 panels, where no drafter pays (the step
2.33-2.42 ms: `bf16_*`, at T=1 and greedy, the greedy rule's order, and a same-tokenizer pair). The
figure printed is auto's tokens/s over the best fixed arm's on the same seeds (prompts x tokens, as
`crossdraft bench --num-prompts 6 --max-new-tokens 128`).

What it is for: a rule of the search can be judged on 100 seeds in seconds, where one real bench run takes
30 s and moves by 10% on this machine. What it is not: a measurement of crossdraft. A rule it favours
is checked with the real bench before it is kept.

    .venv/bin/python scripts/auto_sim.py                          # the search as it is
    git show HEAD~1:crossdraft/auto.py > /tmp/auto_old.py
    .venv/bin/python scripts/auto_sim.py --auto-file /tmp/auto_old.py   # an older version, same seeds
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# arm -> (round ms, drafted tokens, acceptance of each); the target's own step drafts nothing. "none_ms":
# the target's own step; "order": the algorithms auto is given, the rule's pick first (the T=1 rule's).
_DRAFTERS = ("tli", "slem", "slrs")
_T1 = ["tli", "none", "slem", "slrs"]
SCENARIOS = {
    # float32 panels, drafter-spm4k and drafter-bpe2k at T=1 (2026-12-08)
    "none_best": {"tli": (5.7, 2, 0.24), "slem": (5.9, 2, 0.18), "slrs": (7.0, 2, 0.20), "k3": 0.22, "k6": 0.22},
    "close": {"tli": (5.7, 2, 0.33), "slem": (5.9, 2, 0.25), "slrs": (7.0, 2, 0.20), "k3": 0.30, "k6": 0.30},
    "tli_best": {"tli": (5.7, 3, 0.45), "slem": (5.9, 3, 0.35), "slrs": (7.0, 2, 0.20), "k3": 0.45, "k6": 0.45},
    # bfloat16 panels (the main table of 2026-12-08, T=1): the target's step 2.42 ms; drafter-spm4k's tli
    # 0.70x and slem 0.63x of it, drafter-bpe6k-alt's 0.74x and 0.70x
    "bf16_spm4k": {"none_ms": 2.42, "tli": (4.56, 2, 0.26), "slem": (4.33, 2, 0.12), "slrs": (6.5, 2, 0.25),
                   "k3": 0.26, "k6": 0.26},
    "bf16_bpe6k": {"none_ms": 2.42, "tli": (5.29, 2, 0.42), "slem": (4.21, 2, 0.19), "slrs": (7.0, 2, 0.40),
                   "k3": 0.42, "k6": 0.42},
    # bfloat16 panels, greedy: drafter-bpe2k's slem 0.88x and tli 0.83x; drafter-bpe8k's same 0.93x
    "bf16_greedy": {"none_ms": 2.33, "order": ["slem", "none", "tli"], "slem": (4.9, 2, 0.55),
                    "tli": (5.47, 2, 0.59), "k3": 0.59, "k6": 0.59},
    "bf16_same": {"none_ms": 2.33, "order": ["same", "none"], "same": (6.29, 3, 0.7), "k3": 0.7, "k6": 0.7},
}
NONE_MS = 3.85  # the target's own step where a scenario does not say (float32 panels)


def arms_of(scenario: str) -> dict:
    s = SCENARIOS[scenario]
    arms = {("none", None): (s.get("none_ms", NONE_MS), 0, 0.0)}
    for a in s.get("order", _T1):
        if a == "none":
            continue
        arms[(a, None)] = s[a]
        ms, _, acc = s[a]
        arms[(a, 3)] = (ms + 0.6, 3, s["k3"] if a == "tli" else acc)
        arms[(a, 6)] = (ms + 1.8, 6, s["k6"] if a == "tli" else acc)
    return arms


class Fixed:
    """One arm every round: the baseline auto is compared with."""

    def __init__(self, arm):
        self.arm = arm

    def begin_session(self):
        pass

    def next_arm(self):
        return self.arm

    def record(self, *args, **kwargs):
        pass


def tokens_of(k: int, acceptance: float, rng: random.Random) -> int:
    n = 1
    for _ in range(k):
        if rng.random() >= acceptance:
            break
        n += 1
    return n


def run(arms: dict, seed: int, prompts: int, new: int, time_noise: float, policy) -> float:
    """Tokens/s of one run, `policy` (an AutoState or `Fixed`) picking each round's arm. The same seed
    gives every policy the same prompts (text and context factors)."""
    prompt_rng, rng = random.Random(seed), random.Random(seed + 1_000_003)
    total, last = 0.0, None
    for _ in range(prompts):
        policy.begin_session()
        text = {a: prompt_rng.uniform(0.8, 1.2) for a in arms}  # how this prompt suits each arm
        shared, ctx = prompt_rng.uniform(0.8, 1.2), prompt_rng.uniform(0.9, 1.15)  # ... all drafters; its context length
        done = drafter_at = 0
        while done < new:
            arm = policy.next_arm()
            ms, k, acc = arms[arm]
            n = tokens_of(k, min(0.95, acc * text[arm] * shared), rng)
            sec = ms * ctx * rng.lognormvariate(0, time_noise) / 1000
            measured = True
            if arm[0] != "none" and (last is None or last[0] != arm[0]):
                sec += (1.0 + 0.05 * (done - drafter_at)) / 1000  # the drafter catches up
                measured = False
            if arm[0] != "none":
                drafter_at = done + n
            total, done, last = total + sec, done + n, arm
            policy.record(arm, n, sec, measured=measured)
    return prompts * new / total


def compare(auto, scenario: str, seeds: int, prompts: int, new: int, time_noise: float) -> dict:
    arms = arms_of(scenario)
    ratios, kept_best = [], 0
    for seed in range(seeds):
        fixed = {a: run(arms, seed, prompts, new, time_noise, Fixed(a)) for a in arms}
        best = max(fixed, key=fixed.get)
        state = auto.AutoState(SCENARIOS[scenario].get("order", _T1), auto.LENGTHS)
        ratios.append(run(arms, seed, prompts, new, time_noise, state) / fixed[best])
        kept_best += state.best() == best
    ratios.sort()
    return {"scenario": scenario, "seeds": seeds, "mean": statistics.mean(ratios),
            "median": statistics.median(ratios), "p10": ratios[len(ratios) // 10], "kept_best": kept_best / seeds}


def load_auto(path):
    if path is None:
        from crossdraft import auto
        return auto
    spec = importlib.util.spec_from_file_location("crossdraft.auto_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100, help="runs per scenario (default 100)")
    ap.add_argument("--prompts", type=int, default=6, help="prompts per run (default 6)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    ap.add_argument("--time-noise", type=float, default=0.08, help="sigma of a round's lognormal time noise")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    ap.add_argument("--auto-file", help="an auto.py to simulate instead of crossdraft's own")
    ap.add_argument("--json-out", help="write the rows here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.prompts < 1 or args.new_tokens < 1:
        ap.error("--seeds, --prompts and --new-tokens must be at least 1")
    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    auto = load_auto(args.auto_file)
    rows = []
    print(f"{'scenario':10s} {'auto/best mean':>14s} {'median':>7s} {'p10':>6s} {'kept the best':>14s}")
    for sc in args.scenarios.split(","):
        r = compare(auto, sc, args.seeds, args.prompts, args.new_tokens, args.time_noise)
        rows.append(r)
        print(f"{sc:10s} {r['mean']:14.3f} {r['median']:7.3f} {r['p10']:6.3f} {r['kept_best']:14.0%}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
