"""`crossdraft bench`: every algorithm with every drafter, side by side with the baselines, in one process.

Owns: the benchmark protocol. For each prompt in turn it runs every configuration (so slow drift of
the machine hits all of them alike; a drafter's configurations start one further along their list on
each prompt, so none always runs right after the same other one): the target alone through
crossdraft's runner (`none`, the reference for speedups and for exact match), each applicable
algorithm with each drafter, and
Hugging Face transformers' `generate()`: plain, with `assistant_model` (same vocabulary) and with
`assistant_tokenizer` (universal assisted generation). Prints a table, writes JSON.

Columns:
- tok/s: new tokens over generation seconds, summed over prompts.
- speedup: tok/s over the target alone's (crossdraft `none`) in the same run.
- accept: accepted candidate target tokens / candidate target tokens sent for verification.
- acc/round: accepted candidates per verification round; tok/round adds the target's own token.
- c: the drafter's cost per drafted token over the target's cost per token, measured in this run.
- ideal: tok/round / (1 + drafted per round x c): the speedup if a verification pass cost what one
  target step costs and nothing but the two models took time (Leviathan et al.'s model).
- exact: prompts whose output is identical to the target alone's (greedy).

Never: asserts thresholds; numbers are reported, not judged.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .options import check_slrs_args, kv_dtype, model_dtype
from .prompts import read_prompts
from .auto import arm_name
from .engine import Engine
from .errors import CrossdraftError, InvalidArgument, Unavailable
from .runner import load_model, make_runner
from .sampling import SamplingParams
from .vocab import Vocab


def _hf_generate(model, input_ids, max_new, params, **kw):
    import torch

    gen = dict(max_new_tokens=max_new, min_new_tokens=0, pad_token_id=kw.pop("pad_token_id", 0))
    if params.greedy:
        gen.update(do_sample=False)
    else:
        torch.manual_seed(params.seed)
        gen.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                   top_p=params.top_p)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids, **gen, **kw)
        dt = time.perf_counter() - t0
    return out[0, input_ids.shape[1]:].tolist(), dt


class Row:
    def __init__(self, name, drafter, algorithm, inproc=None):
        self.name, self.drafter, self.algorithm = name, drafter, algorithm
        self.inproc = inproc  # a distributed row: the in-process row of the same configuration
        self.auto = None  # auto: what it kept after the last prompt
        self.tokens = 0
        self.seconds = 0.0
        self.cands = self.acc = self.rounds = self.drafted = 0
        self.draft_s = 0.0
        self.prof = {}
        self.exact = 0
        self.n = 0
        self.fallbacks = self.slrs_rows = 0
        self.error = ""
        self.per_prompt = []  # [new tokens, seconds] per prompt, for scripts/auto_summary.py's intervals

    def add(self, ids, seconds, ref_ids, res=None):
        self.n += 1
        self.per_prompt.append([len(ids), round(seconds, 5)])
        self.tokens += len(ids)
        self.seconds += seconds
        self.exact += int(ref_ids is not None and ids == ref_ids)
        if res is not None:
            self.cands += res.draft_tokens
            self.acc += res.accepted_tokens
            self.rounds += res.rounds
            self.drafted += res.drafted
            self.draft_s += res.profile.get("draft_s", 0.0)
            self.fallbacks += res.slrs_fallbacks
            self.slrs_rows += res.slrs_rows
            for k, v in res.profile.items():
                self.prof[k] = self.prof.get(k, 0.0) + v

    def tps(self):
        return self.tokens / self.seconds if self.seconds else 0.0


def _distributed(client, r, prompt, max_new, p, algorithm, draft_tokens, drafter, in_process_ids):
    """One generation through the gateway; its row's exact column compares with the in-process
    output of the same configuration (greedy and sampled: same seed, same output)."""
    from types import SimpleNamespace

    t0 = time.perf_counter()
    try:
        d = client.generate(prompt, max_new, p.temperature, p.seed, algorithm, draft_tokens, p.top_k, p.top_p,
                            drafter=drafter)
    except Exception as e:  # noqa: BLE001 - reported in the table
        r.error = f"{type(e).__name__}: {str(e)[:160]}"
        return
    dt = time.perf_counter() - t0  # the client's wall time: gRPC, the gateway and Redis included
    res = SimpleNamespace(draft_tokens=d["draft_tokens"], accepted_tokens=d["accepted_tokens"], rounds=d["rounds"],
                          drafted=d["drafted"], profile=d["profile"],
                          slrs_fallbacks=0, slrs_rows=0)  # slrs's work counters stay on the drafter
    r.add(d["ids"], dt, in_process_ids, res)


def resolve_drafters(target: str, names: Optional[list]) -> list:
    """The drafter directories of a bench: every drafter-* directory next to the target when `names` is
    None; otherwise each name as a path, or else the directory of that name next to the target (so
    `--drafters drafter-bpe2k` finds the zoo's). A name that is neither is an InvalidArgument at once
    (the bench, like its target, runs local directories; trying it as a Hugging Face Hub id would retry
    for most of a minute offline)."""
    parent = Path(target).parent
    if names is None:
        return sorted(str(p) for p in parent.glob("drafter-*") if p.is_dir())
    out = []
    for name in names:
        if os.path.isdir(name):
            out.append(name)
        elif (parent / name).is_dir():
            out.append(str(parent / name))
        else:
            raise InvalidArgument(f"drafter directory not found: {name} (nor {parent / name})")
    return out


def config_order(configs: list, prompt_index: int) -> list:
    """The order a drafter's configurations run on prompt `prompt_index`: the list turned by one more
    each prompt, so that none always follows the same other one (what ran just before, an slrs tree
    pass or a fresh drafter, can leave the caches and the allocator warmer or colder)."""
    shift = prompt_index % len(configs) if configs else 0
    return configs[shift:] + configs[:shift]


def _run_prompts(args, prompts, params, pairs, base, tv, trunner, tmodel, with_hf, row, client, log) -> None:
    """Each prompt: the target alone, HF's generate, then each configuration (and, with a client, the
    same configuration through the gateway right after it)."""
    import torch

    t_start = time.perf_counter()
    for pi, prompt in enumerate(prompts):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, params.seed + pi)
        ref = base.generate(prompt, args.max_new_tokens, p, "none")
        row("target alone", "-", "none").add(ref.ids, ref.seconds, ref.ids, ref)
        ids = torch.tensor([tv.encode_prompt(prompt)], device=trunner.device)
        if with_hf:
            hf_ids, dt = _hf_generate(tmodel, ids, args.max_new_tokens, p)
            row("HF generate", "-", "hf").add(hf_ids, dt, ref.ids)
        for name, eng, applicable, dmodel, dtok in pairs:
            sweep = args.sweep_draft_tokens  # every length for each algorithm but auto (it searches lengths itself)
            configs = [(a, k) for a in applicable for k in (sweep if sweep and a != "auto" else [args.draft_tokens])]
            for a, k in config_order(configs, pi):
                label = arm_name(a, k) if sweep and a != "auto" else a
                try:
                    res = eng.generate(prompt, args.max_new_tokens, p, a, k)
                except CrossdraftError as e:
                    row(label, name, a).error = str(e)
                    continue
                r = row(label, name, a)
                r.add(res.ids, res.seconds, ref.ids if p.greedy else None, res)
                if res.auto is not None:
                    r.auto = res.auto
                if client is not None:
                    _distributed(client, row(f"{label} distributed", name, a, label), prompt,
                                 args.max_new_tokens, p, a, k, name, res.ids)
            if with_hf:
                same = "same" in applicable
                label = "HF assistant_model" if same else "HF assistant_tokenizer"
                kw = {"assistant_model": dmodel}
                if not same:
                    kw.update(tokenizer=tv.hf, assistant_tokenizer=dtok)
                try:
                    hf_ids, dt = _hf_generate(tmodel, ids, args.max_new_tokens, p, **kw)
                    row(label, name, "hf").add(hf_ids, dt, ref.ids if p.greedy else None)
                except Exception as e:  # noqa: BLE001 - HF's own failures are reported, not fatal
                    row(label, name, "hf").error = f"{type(e).__name__}: {str(e)[:120]}"
        el = time.perf_counter() - t_start
        log(f"[{pi + 1}/{len(prompts)}] target alone {ref.new_tokens / ref.seconds:.1f} tok/s; "
            f"elapsed {el:.0f}s, about {el / (pi + 1) * (len(prompts) - pi - 1):.0f}s left")


def _load(args, algos: list, log) -> tuple:
    """(target vocab, HF target model, target runner, the target-alone engine, drafter paths, pairs): pairs
    are (drafter name, engine, [applicable algorithms], HF drafter model, HF drafter tokenizer)."""
    drafters = resolve_drafters(args.target, args.drafters)
    log(f"loading target {args.target} and {len(drafters)} drafters ...")
    tv = Vocab.load(args.target)
    tmodel = load_model(args.target, args.device, model_dtype(args))
    trunner = make_runner(tmodel, fast=not args.hf_runner, kv_dtype=kv_dtype(args))
    base = Engine(trunner, tv)
    pairs = []
    for d in drafters:
        dv = Vocab.load(d)
        dmodel = load_model(d, args.device, model_dtype(args))
        eng = Engine(trunner, tv, make_runner(dmodel, fast=not args.hf_runner, kv_dtype=kv_dtype(args)), dv,
                     slrs_tau=args.slrs_tau, slrs_budget=args.slrs_budget)
        same = dv.same_as(tv)
        applicable = [a for a in algos if a == "auto" or ((a == "same") == same and a != "none")]
        pairs.append((Path(d).name, eng, applicable, dmodel, dv.hf))
    return tv, tmodel, trunner, base, drafters, pairs


def _start_cluster(args, drafters: list, pairs: list, prompt: str, params, log) -> tuple:
    """(LocalCluster, Client) for --distributed: the four processes started and warmed up, one short
    generation per configuration as in process; a failed warm-up says which status, with the services' logs."""
    from .client import Client
    from .local_cluster import LocalCluster

    threads = args.threads or 1
    log(f"starting redis-server, a verifier, {len(pairs)} drafters and a gateway "
        f"({threads} torch thread(s) each) ...")
    cluster = LocalCluster(args.target, list(drafters), threads=threads, pin=args.pin_cpus,
                           device=args.device, dtype=getattr(args, "dtype", "auto")).start()
    client = Client(cluster.gateway)
    try:
        for name, _, applicable, _, _ in pairs:
            for a in applicable:
                client.generate(prompt, 8, params.temperature, params.seed, a, args.draft_tokens, drafter=name)
    except Exception as e:  # a gRPC status: say which, with what the services logged
        client.close()
        logs = "\n".join(f"--- {n}:\n{cluster.tail(n)}" for n in cluster.names())
        cluster.stop()
        code = e.code().name if hasattr(e, "code") and callable(e.code) else type(e).__name__
        details = e.details() if hasattr(e, "details") and callable(e.details) else str(e)
        raise Unavailable(f"warm-up through the local cluster failed: {code}: {details}\n{logs}") from None
    return cluster, client


def _result(r: Row, base_row: Row, rows: dict, params, step: float) -> dict:
    """One row of the table and the JSON."""
    d = {"config": r.name, "drafter": r.drafter, "prompts": r.n, "new_tokens": r.tokens,
         "seconds": round(r.seconds, 4), "tokens_per_second": round(r.tps(), 2),
         "speedup": round(r.tps() / base_row.tps(), 3) if base_row.tps() and r.tps() else None,
         "exact_match": f"{r.exact}/{r.n}" if params.greedy or r.name.endswith(" distributed") else None,
         "error": r.error or None, "per_prompt": r.per_prompt}
    if r.name.endswith(" distributed"):  # against the same configuration in process, same run
        inproc = rows.get((r.inproc, r.drafter))
        d["vs_in_process"] = round(r.tps() / inproc.tps(), 3) if inproc and inproc.tps() and r.tps() else None
    if r.auto is not None:
        d["auto"] = r.auto
    if r.rounds and r.algorithm not in ("none", "hf"):
        c = (r.draft_s / r.drafted) / step if r.drafted else 0.0
        tpr = r.tokens / r.rounds
        d.update(acceptance=round(r.acc / r.cands, 4) if r.cands else None,
                 accepted_per_round=round(r.acc / r.rounds, 3), tokens_per_round=round(tpr, 3),
                 drafted_per_round=round(r.drafted / r.rounds, 3), cost_ratio=round(c, 4),
                 ideal_speedup=round(tpr / (1 + r.drafted / r.rounds * c), 3),
                 round_ms={k[:-2]: round(v / r.rounds * 1e3, 3) for k, v in r.prof.items()})
        if r.algorithm == "slrs":  # drafter forward rows per candidate, and positions cut by the work bound
            d.update(slrs_passes_per_candidate=round(r.drafted / r.cands, 3) if r.cands else None,
                     slrs_rows_per_candidate=round(r.slrs_rows / r.cands, 3) if r.cands else None,
                     slrs_fallbacks=r.fallbacks)
    return d


def _fmt(v, fmt: str) -> str:
    return (fmt % v) if isinstance(v, (int, float)) else "-"


def _print_table(results: list, title: str, threads: Optional[int]) -> None:
    hdr = (f"{'config':24s} {'drafter':18s} {'tok/s':>7s} {'speedup':>7s} {'accept':>6s} {'acc/rnd':>7s} "
           f"{'tok/rnd':>7s} {'c':>5s} {'ideal':>5s} {'exact':>6s}")
    print(f"\n{title}")
    print(hdr)
    print("-" * len(hdr))
    f = _fmt
    for d in results:
        if d["error"]:
            print(f"{d['config']:24s} {d['drafter']:18s} error: {d['error']}")
            continue
        print(f"{d['config']:24s} {d['drafter']:18s} {f(d['tokens_per_second'], '%7.1f')} "
              f"{f(d['speedup'], '%6.2fx')} {f(d.get('acceptance'), '%6.2f')} {f(d.get('accepted_per_round'), '%7.2f')} "
              f"{f(d.get('tokens_per_round'), '%7.2f')} {f(d.get('cost_ratio'), '%5.2f')} {f(d.get('ideal_speedup'), '%4.2fx')} "
              f"{d['exact_match'] or '-':>6s}")
    dist = [d for d in results if "vs_in_process" in d]
    if dist:
        print(f"\ndistributed (redis-server, verifier, drafters, gateway: separate processes on loopback, "
              f"{threads or 1} torch thread(s) each) against the same configuration in process:")
        for d in dist:
            print(f"  {d['config']:24s} {d['drafter']:18s} {f(d['vs_in_process'], '%5.2fx')}  "
                  f"output identical to in-process {d['exact_match']}")


def _print_auto(results: list) -> None:
    """auto against the best fixed configuration of its drafter; adds vs_best_fixed and best_fixed to its row."""
    autos = [d for d in results if d["config"] == "auto" and d["tokens_per_second"]]
    if autos:
        print("\nauto against the best fixed configuration in this run (same prompts, same process):")
    for d in autos:
        fixed = [x for x in results if x["drafter"] == d["drafter"] and x["config"] != "auto" and not x["error"]
                 and not x["config"].endswith(" distributed") and not x["config"].startswith("HF")
                 and x["tokens_per_second"]]
        if not fixed:
            continue
        best = max(fixed, key=lambda x: x["tokens_per_second"])
        d["vs_best_fixed"] = round(d["tokens_per_second"] / best["tokens_per_second"], 3)
        d["best_fixed"] = best["config"]
        keeps = (d.get("auto") or {}).get("keeps", "?")
        print(f"  {d['drafter']:18s} auto {d['tokens_per_second']:6.1f} tok/s (keeps {keeps})  best fixed "
              f"{best['config']} {best['tokens_per_second']:6.1f} tok/s  ->  {d['vs_best_fixed']:.2f}x")


def _print_profile(results: list, step: float) -> None:
    print("\nwhere a round's time goes (ms per round; bridge is part of verify):")
    for d in results:
        if not d.get("round_ms"):
            continue
        rm = d["round_ms"]
        rest = (f"network {rm['network']:5.2f} (prefill included)" if "network" in rm else
                f"bookkeeping {rm.get('other', 0):5.2f}  prefill {rm.get('prefill', 0):5.2f}")
        print(f"  {d['config']:18s} {d['drafter']:18s} draft {rm.get('draft', 0):6.2f}  verify {rm.get('verify', 0):6.2f}"
              f"  (bridge {rm.get('bridge', 0):5.2f})  {rest}"
              f"  | target alone {step * 1e3:5.2f} ms/token")
        if "psi" in rm:
            print(f"         of draft, psi (computing r): {rm['psi']:6.2f}, of which drafter forwards "
                  f"{rm.get('psi_forward', 0):6.2f} and tree bookkeeping {rm['psi'] - rm.get('psi_forward', 0):6.2f};"
                  f" per candidate {d.get('slrs_passes_per_candidate')} drafter passes of "
                  f"{d.get('slrs_rows_per_candidate')} rows in all; {d.get('slrs_fallbacks')} positions cut by the work bound")


def _meta(args, prompts: list, params, trunner) -> dict:
    import torch

    return {"prompts_file": args.prompts_file, "num_prompts": len(prompts), "prompt_chars": args.prompt_chars,
            "min_chars": args.min_chars, "max_new_tokens": args.max_new_tokens, "temperature": params.temperature,
            "seed": params.seed, "device": str(trunner.device), "dtype": str(trunner.dtype),
            "threads": torch.get_num_threads(), "draft_tokens": args.draft_tokens,
            "sweep_draft_tokens": args.sweep_draft_tokens, "torch": torch.__version__,
            "distributed_threads": (args.threads or 1) if args.distributed else None,
            "distributed_pinned": bool(args.distributed and args.pin_cpus),
            "slrs_budget": args.slrs_budget, "slrs_tau": args.slrs_tau}


def run_bench(args) -> int:
    import torch

    params = SamplingParams(temperature=args.temperature, seed=args.seed).validate()
    check_slrs_args(args)
    if not os.path.isdir(args.target):
        raise InvalidArgument(f"target directory not found: {args.target} (the zoo lives in ../shared/zoo)")
    prompts = read_prompts(args.prompts_file, chars=args.prompt_chars, limit=args.num_prompts, min_chars=args.min_chars)
    algos = [a.strip() for a in (args.algorithms or "same,tli,slem").split(",") if a.strip()]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    tv, tmodel, trunner, base, drafters, pairs = _load(args, algos, log)
    rows = {}

    def row(name, drafter, algorithm, inproc=None):
        key = (name, drafter)
        if key not in rows:
            rows[key] = Row(name, drafter, algorithm, inproc)
        return rows[key]

    mode = "greedy" if params.greedy else f"sampling T={params.temperature}"
    log(f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, {mode}")
    for _, eng, applicable, _, _ in pairs:  # warm-up: one short generation per configuration
        for a in applicable:
            eng.generate(prompts[0], 8, params, a, args.draft_tokens)
    base.generate(prompts[0], 8, params, "none")
    cluster = client = None
    if args.distributed:
        cluster, client = _start_cluster(args, drafters, pairs, prompts[0], params, log)
    try:
        _run_prompts(args, prompts, params, pairs, base, tv, trunner, tmodel, not args.no_hf, row, client, log)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()

    base_row = rows[("target alone", "-")]
    step = base_row.seconds / max(base_row.tokens, 1)  # target seconds per token, alone
    results = [_result(r, base_row, rows, params, step) for r in rows.values()]
    _print_table(results, f"crossdraft bench: {len(prompts)} prompts, {args.max_new_tokens} new tokens, {mode}, "
                 f"device {trunner.device} {str(trunner.dtype).replace('torch.', '')}, torch threads "
                 f"{torch.get_num_threads()}", args.threads)
    _print_auto(results)
    _print_profile(results, step)
    with open(args.json_out, "w") as fh:
        json.dump({"meta": _meta(args, prompts, params, trunner), "results": results}, fh, indent=2)
    print(f"\nwrote {args.json_out}")
    return 0
