"""Distributed vs in-process: the same prompts through the four processes and through the engine, one run.

Starts redis-server, a verifier (the target), one drafter per drafter model and a gateway on loopback,
waits for them to be healthy, then for each prompt runs the in-process engine and the gateway path
(`crossdraft.client`) with the same algorithm, interleaved, and prints tokens/s of both, their ratio
and whether the outputs are identical. Stops every process it started. Writes JSON.

    .venv/bin/python scripts/bench_distributed.py [--num-prompts 4] [--max-new-tokens 128]

Not yet folded into `crossdraft bench` (issue 3 asks for a distributed column there).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


def main() -> int:
    import torch

    from crossdraft.cli import read_prompts, zoo_dir
    from crossdraft.client import Client
    from crossdraft.engine import Engine
    from crossdraft.runner import load_model, make_runner
    from crossdraft.sampling import SamplingParams
    from crossdraft.vocab import Vocab

    z = zoo_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=str(z / "target-bpe8k"))
    ap.add_argument("--pairs", default="drafter-spm4k:slem,drafter-bpe8k:same",
                    help="DRAFTER_DIR_NAME:ALGORITHM,... (drafters next to the target)")
    ap.add_argument("--prompts-file", default=str(z / "dev-prompts.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: 2 cores, 4 processes)")
    ap.add_argument("--json-out", default="bench-distributed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [p.split(":") for p in args.pairs.split(",")]
    prompts = read_prompts(args.prompts_file, chars=800, limit=args.num_prompts, min_chars=2000)
    py = sys.executable
    procs = []

    def spawn(cmd):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    try:
        rport, vport, gport = free_port(), free_port(), free_port()
        spawn(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        spawn([py, "-m", "crossdraft.cli", "serve", "verifier", "--model", args.target, "--port", str(vport),
               "--threads", str(args.threads)])
        drafters = {}
        for name, _ in pairs:
            port = free_port()
            drafters[name] = f"127.0.0.1:{port}"
            spawn([py, "-m", "crossdraft.cli", "serve", "drafter", "--model", str(Path(args.target).parent / name),
                   "--port", str(port), "--threads", str(args.threads)])
        spawn([py, "-m", "crossdraft.cli", "serve", "gateway", "--port", str(gport), "--redis",
               f"redis://127.0.0.1:{rport}/0", "--drafters", ",".join(drafters.values()),
               "--verifiers", f"127.0.0.1:{vport}"])
        for a in [f"127.0.0.1:{vport}", *drafters.values(), f"127.0.0.1:{gport}"]:
            wait_healthy(a)
        client = Client(f"127.0.0.1:{gport}")
        tv = Vocab.load(args.target)
        tr = make_runner(load_model(args.target))
        rows = []
        for name, algo in pairs:
            dpath = str(Path(args.target).parent / name)
            eng = Engine(tr, tv, make_runner(load_model(dpath)), Vocab.load(dpath))
            eng.generate(prompts[0], 8, SamplingParams(), algo)
            client.generate(prompts[0], 8, algorithm=algo, drafter=name)  # warm-up (drafters are named by directory)
            tin = tout = 0.0
            nin = nout = same = 0
            for p in prompts:
                r = eng.generate(p, args.max_new_tokens, SamplingParams(), algo)
                t0 = time.perf_counter()
                d = client.generate(p, args.max_new_tokens, algorithm=algo, drafter=name)
                dt = time.perf_counter() - t0  # client-side wall time, gRPC and Redis included
                tin += r.seconds
                nin += r.new_tokens
                tout += dt
                nout += d["new_tokens"]
                same += int(d["text"] == r.text)
                print(f"  {name} {algo}: in-process {r.new_tokens / r.seconds:6.1f} tok/s, "
                      f"distributed {d['new_tokens'] / dt:6.1f} tok/s", file=sys.stderr, flush=True)
            rows.append({"drafter": name, "algorithm": algo, "in_process_tps": round(nin / tin, 2),
                         "distributed_tps": round(nout / tout, 2), "ratio": round((nout / tout) / (nin / tin), 3),
                         "identical": f"{same}/{len(prompts)}"})
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"\n{len(prompts)} prompts x {args.max_new_tokens} tokens, greedy, {args.threads} torch thread(s) per process")
    print(f"{'drafter':18s} {'algo':5s} {'in-process':>10s} {'distributed':>11s} {'ratio':>6s} {'identical':>9s}")
    for r in rows:
        print(f"{r['drafter']:18s} {r['algorithm']:5s} {r['in_process_tps']:10.1f} {r['distributed_tps']:11.1f} "
              f"{r['ratio']:6.2f} {r['identical']:>9s}")
    with open(args.json_out, "w") as f:
        json.dump({"threads": args.threads, "max_new_tokens": args.max_new_tokens, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
