"""Command-line option groups shared by several commands (generate, bench, serve), and their checks.

Owns: the flags of a model (device, dtype, threads, runner), of slrs, of TLS, and the argument types
(positive token counts, draft length lists); how a flag becomes a value (`model_dtype`, `setup_torch`).

Never: runs anything; the commands live in cli.py (and bench.py for `bench`).
"""
from __future__ import annotations

import argparse
from typing import Optional

from .errors import InvalidArgument

MAX_NEW_TOKENS_LIMIT = 100_000


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1 or v > MAX_NEW_TOKENS_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {v}")
    return v


def _torch_dtype(name: Optional[str]):
    if name in (None, "auto"):
        return None
    import torch

    return getattr(torch, name)


def model_dtype(args):
    """--dtype as a torch dtype; None lets the runner pick by device."""
    return _torch_dtype(getattr(args, "dtype", "auto"))


def kv_dtype(args):
    """--kv-dtype as a torch dtype; None: the caches hold the model's own dtype."""
    return _torch_dtype(getattr(args, "kv_dtype", "auto"))


def add_slrs_args(p: argparse.ArgumentParser) -> None:
    from .slrs import DEFAULT_BUDGET, DEFAULT_TAU

    p.add_argument("--slrs-budget", type=int, default=DEFAULT_BUDGET,
                   help=f"slrs: drafter forward rows per candidate position, the work bound (default: {DEFAULT_BUDGET})")
    p.add_argument("--slrs-tau", type=float, default=DEFAULT_TAU,
                   help=f"slrs: drafter paths of at least this probability are followed one by one (default: {DEFAULT_TAU})")


def add_alternatives_arg(p: argparse.ArgumentParser) -> None:
    from .drafter import ALTERNATIVES
    from .protocol import MAX_ALTERNATIVES

    p.add_argument("--draft-alternatives", type=_alternatives, default=ALTERNATIVES, metavar="N",
                   help="same and tli, greedy: where a draft stops at a guess the drafter is unsure of, send its next "
                        f"N guesses too, verified in the same pass (0-{MAX_ALTERNATIVES}, default: {ALTERNATIVES}); "
                        "the verifier then "
                        "commits one token more where the target's token is one of them. Each costs a row in the "
                        "verifier's pass: sent only while that pass is not shared (docs/serving.md)")


def _alternatives(text: str) -> int:
    from .protocol import MAX_ALTERNATIVES  # (what a proposal may carry)

    n = int(text)
    if not 0 <= n <= MAX_ALTERNATIVES:
        raise argparse.ArgumentTypeError(f"must be in 0-{MAX_ALTERNATIVES}, got {n}")
    return n


def check_slrs_args(args) -> None:
    if args.slrs_budget < 0:
        raise InvalidArgument(f"--slrs-budget must be >= 0, got {args.slrs_budget}")
    if not 0.0 < args.slrs_tau <= 1.0:
        raise InvalidArgument(f"--slrs-tau must be in (0, 1], got {args.slrs_tau}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "float64"), default="auto",
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA; float64 for tests "
                        "that must rule out rounding)")
    p.add_argument("--kv-dtype", choices=("auto", "bfloat16"), default="auto",
                   help="what the KV caches hold (default: the model's dtype). bfloat16 under float32 weights: half "
                        "the cache memory (a KV budget holds twice the positions) and half what attention reads; "
                        "the model's numbers change a little, the output stays identical to the target alone served "
                        "the same way (lean Llama runner only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: all cores)")
    p.add_argument("--hf-runner", action="store_true",
                   help="run models through Hugging Face's own forward instead of the lean Llama runner")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")


def add_tls_args(p, gateway: bool = False) -> None:
    """--tls-cert, --tls-key, --tls-ca, --tls-server-name, --insecure (and --tls-client-ca for a gateway):
    the flags are defined here, their meaning in crossdraft/serving/channels.py (`TLS`)."""
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="certificate (chain) of this service, PEM: listen with TLS; also its client certificate "
                        "towards the services it calls")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert, PEM")
    if gateway:
        p.add_argument("--tls-ca", default=None, metavar="PEM",
                       help="CA of the drafters and verifiers, PEM: call them with TLS, verified with it, presenting "
                            "--tls-cert (mutual TLS); not used by `all`, whose hops stay in-process on loopback")
        p.add_argument("--tls-client-ca", default=None, metavar="PEM",
                       help="require clients of the gateway to present a certificate signed by this CA (default: "
                            "no client certificates; clients are identified by --api-keys)")
    else:
        p.add_argument("--tls-ca", default=None, metavar="PEM",
                       help="CA of the peers, PEM: require client certificates signed by it (mutual TLS) and "
                            "verify the services this one calls with it")
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name the certificates of called services are checked against (default: the host of "
                        "each address)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext gRPC off loopback; without TLS flags, plaintext is allowed only on "
                        "loopback (127.0.0.1, ::1, localhost), always with a warning in the log")


def draft_lengths(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "adaptive":
            out.append(None)
            continue
        try:
            k = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"draft lengths are integers or 'adaptive', got {part!r}") from None
        if not 1 <= k <= 64:
            raise argparse.ArgumentTypeError(f"draft lengths must be in [1, 64], got {k}")
        out.append(k)
    if not out:
        raise argparse.ArgumentTypeError("no draft lengths given")
    return out


def setup_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """A model service's batching and KV memory (crossdraft/batched.py, kvbudget.py, scheduler.py)."""
    p.add_argument("--max-model-len", type=int, default=0,
                   help="context one session may use, in this model's tokens (default: 0, the model's own)")
    p.add_argument("--kv-budget-mb", type=float, default=0.0,
                   help="KV cache memory all sessions may reserve, MiB; a session reserves what it can use at "
                        "most and waits for room, then gets RESOURCE_EXHAUSTED (default: 0, enough for "
                        "--max-sessions sessions of --max-model-len)")
    p.add_argument("--kv-wait-seconds", type=float, default=10.0,
                   help="how long a new session waits for room in the KV budget (default: 10)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens in one batched forward pass; a longer prompt's prefill runs in chunks of what "
                        "is left after the running sessions' rounds (default: 512)")
    p.add_argument("--pass-log", default="", metavar="FILE",
                   help="a diagnostic: append one JSON line per forward pass to FILE (when it started, the tokens "
                        "of each step and prefill chunk in it, milliseconds of the forward and of the bookkeeping "
                        "after it), at most 64 MB a model; see docs/serving.md")


def check_batching_args(args) -> None:
    from .batched import Limits

    if args.max_model_len and args.max_model_len < 2:
        raise InvalidArgument(f"--max-model-len must be >= 2 (or 0: the model's own), got {args.max_model_len}")
    Limits.from_args(args)
