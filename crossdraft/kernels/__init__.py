"""crossdraft's own CPU kernels: y = x W^T + b as fast for 1-8 rows as for one (`rows.cpp`), and the
attention of decoding steps and verifications (`attend.cpp`), float32 (over float32 or bfloat16 caches:
`--kv-dtype`).

Owns: building them once per machine with the C++ compiler against this torch (`load()`), and the
operators they register: `torch.ops.crossdraft.rows_pack(w)` (W [N, K] laid out in panels),
`rows_pack_bf16(w)` (the same in bfloat16, for weights that are bfloat16 values: the same outputs bit
for bit, half the bytes a step reads), `rows_linear(x, packed, n, b)`, and `decode_attend(q, k, v, kcaches, vcaches, layer, starts, ns, scaling)`.
`LlamaRunner` uses them on a CPU in float32: every linear layer for every number of rows (runner._Linear),
and the attention of every short causal block (a step, a verification: runner.DECODE_ROWS;
fused._attend). The reference functions here compute the same in torch; where the kernels are not built,
they stand behind the operators' names, so that code naming them still compiles (the runner does not
call them then).

Why. A decoding pass reads every weight once; what matters is how many rows ride on each read. Torch's
kernels (MKL's x @ W^T, oneDNN's prepacked linear) spend about as long on 5 or 8 rows as two or three
single-row steps. `rows_linear` streams each panel of W once for all rows, so on the 2-core machine
(target-bpe8k's 94 MB of weights, one thread) one row takes 3.7 ms against MKL's 6.2, and 8 rows 4.3 ms
against oneDNN's 7.1. A decoding step's attention in torch is about ten operators per sequence and layer;
`decode_attend` is one call per layer for all of them, and a pass of 8 sequences' steps (250 positions
cached) went from 10.9 to 7.5 ms (docs/benchmarks.md). Neither kernel's rounding depends on anything but
the row (and head) it computes: not the rows beside it, the block it came in, the thread count or the
instruction set (each linear output is one FMA chain over k, each attention row over its own positions).
So a session's logits are the same bits whichever sessions share its pass, and a verification's rows the
same bits as its tokens decoded one by one.

Built with `-march=native` into CROSSDRAFT_KERNEL_CACHE (default ~/.cache/crossdraft/kernels), named by
a hash of the sources, torch's version and this CPU's flags; about twenty seconds the first time, then a
load. Or built ahead, for any x86-64 CPU with AVX2 and FMA (and one with AVX-512 too), where a compiler
is at hand and the machines that run them have none (the container image: docker/Dockerfile):
`python -m crossdraft.kernels --prebuild [DIR]` writes both into DIR (default CROSSDRAFT_KERNEL_PREBUILT,
else share/crossdraft/kernels under the Python environment's prefix), and `load()` takes the one this CPU
can run from there before it builds anything. Where they cannot be (no compiler, not x86-64 with AVX2
and FMA, CROSSDRAFT_KERNELS=0) `load()`
says why once in the log and returns False, and the runner keeps torch's kernels
(CROSSDRAFT_DECODE_KERNEL=0 keeps torch's attention alone, to compare). `python -m crossdraft.kernels`
builds them and checks them against torch (scripts/setup.sh runs it).

Never: changes what a model computes beyond float32 rounding (and the caches' own, where they hold
bfloat16), or runs on anything but a CPU.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("crossdraft.kernels")

HERE = Path(__file__).parent
SOURCES = [HERE / "rows.cpp", HERE / "attend.cpp"]  # and the header they share, vec.h
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# built ahead (`prebuild`): the instruction sets a CPU must have for each, the best first
PREBUILT = {"avx512": (["-O3", "-mavx512f", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"],
                       {"avx512f", "avx2", "fma"}),
            "avx2": (["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"], {"avx2", "fma"})}
_state: dict = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the kernels are loaded (load() them first)."""
    return bool(_state.get("ok"))


def why_not() -> Optional[str]:
    """Why the kernels are not in use, once load() has tried."""
    return _state.get("why")


def load() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason logged once, where they cannot
    be. Either way the operators exist afterwards (TorchScript code that names them compiles): where the
    kernels are not in use, the reference functions stand behind their names (the runner does not call them)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["why"] = _load()
            if not _state["ok"]:
                log.warning("crossdraft's CPU kernels are not in use (%s): the runner uses torch's kernels",
                            _state["why"])
                _define_reference()
        return _state["ok"]


COLS = 32  # outputs per panel in the reference layout


def reference_rows_pack(w):
    """`rows_pack` in torch: W [N, K] -> [ceil(N / COLS), K, COLS], zero-padded."""
    n, k = w.shape
    panels = -(-n // COLS)
    padded = torch.zeros(panels * COLS, k, dtype=w.dtype, device=w.device)
    padded[:n] = w
    return padded.view(panels, COLS, k).transpose(1, 2).contiguous()


def reference_rows_linear(x, packed, n, b):
    """`rows_linear` in torch (F.linear's rounding, not the kernel's)."""
    w = packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]
    return torch.nn.functional.linear(x, w, b)


def reference_decode_attend(q, k, v, kcs, vcs, layer, starts, ns, scaling, seen=()):
    """`decode_attend` in torch: each sequence's ns[b] rows' keys and values written at positions
    starts[b].. (rounded to the caches' dtype: float32 or bfloat16), then each row's attention over its
    cache up to its own position, every head (kv head h // (H / KV)). `seen` (empty, or one per row): the
    positions before its own a row sees instead (its block's first rows: a sibling of an earlier row)."""
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[1]
    row = 0
    for kc, vc, start, n in zip(kcs, vcs, starts, ns):
        kc[layer, :, start:start + n] = k[row:row + n].transpose(0, 1)
        vc[layer, :, start:start + n] = v[row:row + n].transpose(0, 1)
        for r in range(n):
            sees = list(range(seen[row + r] if seen else start + r)) + [start + r]
            keys = kc[layer, :, sees].float().repeat_interleave(g, 0)  # [H, end, D]
            vals = vc[layer, :, sees].float().repeat_interleave(g, 0)
            p = torch.softmax((keys @ q[row + r].unsqueeze(-1)).squeeze(-1) * scaling, dim=-1)  # [H, end]
            out[row + r] = (p.unsqueeze(1) @ vals).squeeze(1)
        row += n
    return out


def _define_reference() -> None:
    """The operators in Python (the reference functions above), where the C++ kernels are not loaded."""
    if hasattr(torch.ops, "crossdraft") and hasattr(torch.ops.crossdraft, "rows_linear"):
        return
    lib = torch.library.Library("crossdraft", "DEF")
    lib.define("rows_pack(Tensor w) -> Tensor")
    lib.define("rows_linear(Tensor x, Tensor packed, int n, Tensor? b) -> Tensor")
    lib.define("decode_attend(Tensor q, Tensor k, Tensor v, Tensor(a!)[] kcs, Tensor(b!)[] vcs, int layer, "
               "int[] starts, int[] ns, float scaling, int[] seen=[]) -> Tensor")
    lib.impl("rows_pack", reference_rows_pack, "CompositeExplicitAutograd")
    lib.impl("rows_linear", reference_rows_linear, "CompositeExplicitAutograd")
    lib.impl("decode_attend", reference_decode_attend, "CompositeExplicitAutograd")
    _state["reference_lib"] = lib  # a Library is unregistered when collected


def _load() -> tuple:
    if os.environ.get("CROSSDRAFT_KERNELS", "1") == "0":
        return False, "CROSSDRAFT_KERNELS=0"
    if hasattr(torch.ops, "crossdraft") and hasattr(torch.ops.crossdraft, "rows_linear"):
        return True, None  # loaded in this process already
    if not _cpu_ok():
        return False, "this CPU is not x86-64 with AVX2 and FMA"
    try:
        lib = _prebuilt()
        try:
            torch.ops.load_library(str(lib or _build()))
        except OSError as e:  # a library built ahead this system cannot load: build one here instead
            if lib is None:
                raise
            log.warning("crossdraft's CPU kernels built ahead do not load here (%s): building them", e)
            torch.ops.load_library(str(_build()))
        _check()
    except Exception as e:  # noqa: BLE001 - any failure leaves torch's kernels, said once
        return False, f"{type(e).__name__}: {str(e).strip()[-400:]}"
    return True, None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_ok() -> bool:
    flags = set(_cpu_flags().split())
    return {"avx2", "fma"} <= flags


def _cache_dir() -> Path:
    base = os.environ.get("CROSSDRAFT_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crossdraft",
                                                                     "kernels")
    return Path(base)


def _prebuilt_dir() -> Path:
    return Path(os.environ.get("CROSSDRAFT_KERNEL_PREBUILT") or os.path.join(sys.prefix, "share", "crossdraft",
                                                                             "kernels"))


def _key(flags: list, cpu: str) -> str:
    """What a built library depends on: the sources, torch, Python, the flags (and, built here, the CPU)."""
    sources = [p.read_bytes() for p in SOURCES + [HERE / "vec.h"]]
    return hashlib.sha256(b"\0".join([*sources, torch.__version__.encode(), cpu.encode(), " ".join(flags).encode(),
                                      sys.version.encode()])).hexdigest()[:16]


def _prebuilt_path(name: str, out_dir: Optional[Path] = None) -> Path:
    """Where the library built ahead for `PREBUILT[name]` is (or goes)."""
    return (out_dir or _prebuilt_dir()) / f"crossdraft_rows_{name}_{_key(PREBUILT[name][0], '')}.so"


def _prebuilt() -> Optional[Path]:
    """The library built ahead for these sources and torch that this CPU can run, if there is one."""
    have = set(_cpu_flags().split())
    for name, (_, needs) in PREBUILT.items():
        lib = _prebuilt_path(name)
        if needs <= have and lib.exists():
            log.info("crossdraft's CPU kernels, built ahead: %s", lib)
            return lib
    return None


def _build() -> Path:
    """The shared library for these sources, torch and CPU, built here if missing (`_compile`)."""
    lib = _cache_dir() / f"crossdraft_rows_{_key(FLAGS, _cpu_flags())}.so"
    if not lib.exists():
        log.info("building crossdraft's CPU kernels (once per machine): %s", lib)
        _compile(FLAGS, lib)
    return lib


def _compile(flags: list, lib: Path) -> None:
    """Compile the sources into `lib` (atomically: concurrent builders each write their own file, the last
    rename wins, all identical)."""
    from torch.utils import cpp_extension

    lib.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libdirs = cpp_extension.library_paths()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *map(str, SOURCES), "-o", tmp,
           *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu", "-ltorch"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-400:]}")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o755 & ~mask)  # as a linker leaves it (mkstemp made it 0600): others load it too
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prebuild(out_dir: Optional[str] = None) -> list:
    """Build the libraries of `PREBUILT` into `out_dir` (default: where `load()` looks for them), for
    machines without a compiler; -> their paths. Needs a compiler, not the CPUs they are for."""
    out = Path(out_dir) if out_dir else _prebuilt_dir()
    libs = []
    for name, (flags, _) in PREBUILT.items():
        lib = _prebuilt_path(name, out)
        log.info("building crossdraft's CPU kernels for %s CPUs: %s", name, lib)
        _compile(flags, lib)
        libs.append(lib)
    return libs


def _check() -> None:
    """The loaded kernels against the reference functions on a few shapes (float32 tolerance)."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 40, 24), (9, 96, 33), (3, 64, 128)):
        x, w, b = (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g))
        y = torch.ops.crossdraft.rows_linear(x, torch.ops.crossdraft.rows_pack(w), n, b)
        if not torch.allclose(y, x @ w.t() + b, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the built kernel disagrees with torch on [{m}x{k}] x [{n}x{k}]^T")
        wb = w.to(torch.bfloat16).float()
        f32, bf16 = torch.ops.crossdraft.rows_pack(wb), torch.ops.crossdraft.rows_pack_bf16(wb)
        if not torch.equal(torch.ops.crossdraft.rows_linear(x, bf16, n, b), torch.ops.crossdraft.rows_linear(x, f32, n, b)):
            raise RuntimeError(f"the built kernel's bfloat16 panels differ from its float32 ones on [{m}x{k}]")
    q, k, v = torch.randn(2, 4, 24, generator=g), torch.randn(2, 2, 24, generator=g), torch.randn(2, 2, 24, generator=g)
    caches = [torch.randn(2, 2, 2, 9, 24, generator=g) for _ in range(2)]  # [k or v][layers, KV, capacity, D]
    q, k, v = torch.cat([q, q[:1]]), torch.cat([k, k[:1]]), torch.cat([v, v[:1]])  # 1 row, then 2
    args = (q, k, v), 1, [3, 6], [1, 2], 0.2
    got = torch.ops.crossdraft.decode_attend(*args[0], [c[0] for c in caches], [c[1] for c in caches], *args[1:])
    want = reference_decode_attend(*args[0], [c[0].clone() for c in caches], [c[1].clone() for c in caches],
                                   *args[1:])
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the built decode_attend disagrees with torch")


def main(argv: Optional[list] = None) -> int:
    """`python -m crossdraft.kernels [--prebuild [DIR]]`: build, load and check the kernels, exit 0 when in
    use and 1 when not; with --prebuild, build them ahead into DIR (see the package docstring), exit 0 once
    built, and say whether they run here."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m crossdraft.kernels", description="Build, load and check "
                                 "crossdraft's CPU kernels (exit 0: in use, 1: torch's kernels serve instead), "
                                 "or build them ahead for machines without a compiler.")
    ap.add_argument("--prebuild", nargs="?", const="", metavar="DIR", default=None,
                    help="first build them ahead for any x86-64 CPU with AVX2 and FMA (and with AVX-512) into DIR "
                         f"(default: $CROSSDRAFT_KERNEL_PREBUILT, else {_prebuilt_dir()}), for machines "
                         "without a compiler")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.prebuild is not None:
        if args.prebuild:
            os.environ["CROSSDRAFT_KERNEL_PREBUILT"] = args.prebuild
        for lib in prebuild():
            print(f"built ahead: {lib}")
        # built; whether this machine can run them is only said (it may build for other CPUs)
        print("crossdraft CPU kernels on this machine: " + ("in use" if load() else f"not in use ({why_not()})"))
        return 0
    if load():
        print("crossdraft CPU kernels: in use")
        return 0
    print(f"crossdraft CPU kernels: not in use ({why_not()}); torch's kernels serve instead")
    return 1
