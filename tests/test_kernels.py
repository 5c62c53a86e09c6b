"""crossdraft/kernels: the CPU kernel for x W^T + b computes what torch does (float32 tolerance), and each
row's bits depend on nothing but that row: not the rows beside it, their number, or the thread count.
So in LlamaRunner a sequence's float32 logits are the same bits whichever sequences share its pass.
Where the kernel cannot be used, the runner keeps torch's kernels (checked in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from crossdraft import kernels
from crossdraft.runner import LlamaRunner, Step
from helpers import tiny_llama

# In CI (CI set, a machine with g++) these fail rather than skip when the kernel cannot be built.
pytestmark = pytest.mark.skipif(not kernels.load() and not os.environ.get("CI"),
                                reason=f"the CPU kernel is not in use here: {kernels.why_not()}")
ops = torch.ops.crossdraft


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k", [(32, 64), (45, 37), (100, 512), (1, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_equals_torch(n, k, bias):
    w, b = _rand(n, k, seed=1), (_rand(n, seed=2) if bias else None)
    packed = ops.rows_pack(w)
    for m in (1, 2, 5, 8, 9, 17, 40):
        x = _rand(m, k, seed=m)
        want = x.double() @ w.double().t() + (b.double() if bias else 0)
        got = ops.rows_linear(x, packed, n, b)
        assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)  # sums of up to 512 unit terms


def test_each_row_is_the_same_bits_whatever_shares_its_call():
    """Row i of a call equals that row alone, and with its neighbours replaced, and with two threads: bitwise.
    (Torch's own kernels round a row differently for different numbers of rows; tests/test_runner.py
    holds those to a tolerance.)"""
    n, k = 200, 300
    w, b = _rand(n, k, seed=3), _rand(n, seed=4)
    packed = ops.rows_pack(w)
    x = _rand(13, k, seed=5)
    full = ops.rows_linear(x, packed, n, b)
    for i in range(13):
        assert torch.equal(ops.rows_linear(x[i:i + 1], packed, n, b)[0], full[i])
    other = x.clone()
    other[::2] = _rand(7, k, seed=6)
    assert torch.equal(ops.rows_linear(other, packed, n, b)[1::2], full[1::2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(ops.rows_linear(x, packed, n, b), full)
    finally:
        torch.set_num_threads(threads)


def test_bad_shapes_are_refused_with_a_message():
    packed = ops.rows_pack(_rand(40, 16))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.rows_linear(_rand(2, 15), packed, 40, None)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.rows_linear(_rand(2, 16), packed, 80, None)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rows_linear(_rand(2, 16).double(), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.rows_linear(_rand(2, 16), packed, 40, _rand(39))


@pytest.mark.parametrize("n,k", [(32, 64), (45, 37), (300, 96), (1, 3)])
def test_bfloat16_panels_give_the_float32_panels_bits(n, k):
    """Weights that are bfloat16 values packed in bfloat16 (rows_pack_bf16, each panel row's columns in the
    order the kernel unpacks them): every output equals the float32 panels' bitwise, any rows, with or
    without bias. Weights that are not bfloat16 values are refused."""
    w, b = _rand(n, k, seed=7).to(torch.bfloat16).float(), _rand(n, seed=8)
    f32, bf16 = ops.rows_pack(w), ops.rows_pack_bf16(w)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == f32.shape
    assert torch.equal(bf16.float().sort(dim=2).values, f32.sort(dim=2).values)  # each row's weights, reordered
    assert n == 1 or not torch.equal(bf16.float(), f32)
    for m in (1, 2, 3, 5, 8, 9, 17, 40):
        x = _rand(m, k, seed=m)
        for bias in (None, b):
            assert torch.equal(ops.rows_linear(x, bf16, n, bias), ops.rows_linear(x, f32, n, bias)), (m, bias is None)
    with pytest.raises(RuntimeError, match="not all bfloat16 values"):
        ops.rows_pack_bf16(_rand(n, k, seed=9))
    with pytest.raises(RuntimeError, match="float32 .rows_pack. or bfloat16"):
        ops.rows_linear(_rand(2, k), f32.half(), n, None)


def test_the_runner_with_bfloat16_panels_gives_the_same_logits(monkeypatch):
    """CROSSDRAFT_BF16_PANELS=1: a model whose weights are bfloat16 values (as a bfloat16 checkpoint loads)
    keeps its panels in bfloat16 and gives the float32 panels' logits bitwise (prefill, steps, a batch, a
    pruned head); a model whose weights are not keeps float32 panels (the negative control)."""
    model = tiny_llama(300, seed=12, hidden=96, kv_heads=2, bias=True).to(torch.bfloat16).float()
    a = [int(t) for t in torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(2))]

    def logits(runner):
        c, d = runner.new_cache(), runner.new_cache()
        out = runner.forward_batch([Step(c, a[:20]), Step(d, a[5:9])])
        out += runner.forward_batch([Step(c, a[20:21]), Step(d, a[9:14])])
        out += runner.forward_batch([Step(c, a[21:22], rows=torch.tensor([3, 299, 17]))])
        return out
    monkeypatch.setenv("CROSSDRAFT_BF16_PANELS", "0")
    want = logits(LlamaRunner(model, 128))
    monkeypatch.setenv("CROSSDRAFT_BF16_PANELS", "1")
    runner = LlamaRunner(model, 128)
    assert runner.lm_head.rp.dtype == torch.bfloat16 and runner.layers[0][1].rp.dtype == torch.bfloat16
    got = logits(runner)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    plain = LlamaRunner(tiny_llama(300, seed=12, hidden=96, kv_heads=2, bias=True).float(), 128)
    assert plain.lm_head.rp.dtype == torch.float32  # (random float32 weights are not bfloat16 values)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv,d", [(4, 2, 64), (3, 3, 20), (8, 1, 16)])
def test_decode_attend_equals_torch_and_writes_each_cache(heads, kv, d, kv_dtype):
    """Decoding steps' attention (blocks of 1, 3 and 2 rows; GQA; a head size that is not a multiple of
    the vector width; float32 and bfloat16 caches): the same as torch's within float32 rounding, each
    row's key and value written at its position (rounded as torch rounds them), and each row the same
    bits as that token alone, as a one-token step."""
    starts, ns, layer, scale = [0, 5, 29], [1, 3, 2], 1, d ** -0.5
    q, k, v = _rand(6, heads, d, seed=1), _rand(6, kv, d, seed=2), _rand(6, kv, d, seed=3)
    kcs = [_rand(2, kv, 32, d, seed=10 + i).to(kv_dtype) for i in range(3)]
    vcs = [_rand(2, kv, 32, d, seed=20 + i).to(kv_dtype) for i in range(3)]
    ref_k, ref_v = [c.clone() for c in kcs], [c.clone() for c in vcs]
    want = kernels.reference_decode_attend(q, k, v, ref_k, ref_v, layer, starts, ns, scale)
    got = ops.decode_attend(q, k, v, kcs, vcs, layer, starts, ns, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(kcs + vcs, ref_k + ref_v):
        assert torch.equal(a, b)
    row = 0
    for i in range(3):
        for r in range(ns[i]):  # row r of block i, as a one-token step at its position (cache already holds
            alone = ops.decode_attend(q[row:row + 1], k[row:row + 1], v[row:row + 1], [kcs[i]], [vcs[i]],
                                      layer, [starts[i] + r], [1], scale)  # the rows before it)
            assert torch.equal(alone[0], got[row])
            row += 1
    with pytest.raises(RuntimeError, match="room for its rows"):
        ops.decode_attend(q[:2], k[:2], v[:2], [kcs[0]], [vcs[0]], layer, [31], [2], scale)
    with pytest.raises(RuntimeError, match="in order"):
        ops.decode_attend(q, k, v, kcs, vcs, layer, starts, [1, 1, 1], scale)
    other = torch.bfloat16 if kv_dtype == torch.float32 else torch.float32
    with pytest.raises(RuntimeError, match="first cache's dtype"):
        ops.decode_attend(q, k, v, kcs[:2] + [kcs[2].to(other)], vcs[:2] + [vcs[2].to(other)], layer, starts, ns,
                          scale)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attend_a_sibling_row_gives_the_bits_of_that_token_in_a_causal_block(kv_dtype):
    """`seen`: a block [root, c1, c2, s] whose last row s sees the cache and rows 0..1 only (a sibling of
    c2, as a verification with alternatives runs it): s gives the same bits as the block [root, c1, s],
    and the chain's rows the bits they give without it; the reference agrees within float32 rounding."""
    heads, kv, d, start, layer, scale = 4, 2, 16, 9, 0, 16 ** -0.5
    q, k, v = _rand(4, heads, d, seed=1), _rand(4, kv, d, seed=2), _rand(4, kv, d, seed=3)
    cache = lambda seed: _rand(1, kv, 32, d, seed=seed).to(kv_dtype)  # noqa: E731
    kc, vc = cache(10), cache(11)
    seen = [start, start + 1, start + 2, start + 2]
    got = ops.decode_attend(q, k, v, [kc], [vc], layer, [start], [4], scale, seen)
    kc2, vc2 = cache(10), cache(11)
    chain = ops.decode_attend(q[:3], k[:3], v[:3], [kc2], [vc2], layer, [start], [3], scale)
    assert torch.equal(got[:3], chain)
    kc3, vc3 = cache(10), cache(11)
    pick = torch.tensor([0, 1, 3])
    alt = ops.decode_attend(q[pick], k[pick], v[pick], [kc3], [vc3], layer, [start], [3], scale)
    assert torch.equal(got[3], alt[2])
    ref = kernels.reference_decode_attend(q, k, v, [cache(10)], [cache(11)], layer, [start], [4], scale, seen)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    wrong = ops.decode_attend(q, k, v, [cache(10)], [cache(11)], layer, [start], [4], scale)  # (negative control)
    assert not torch.equal(wrong[3], alt[2])
    with pytest.raises(RuntimeError, match="before its own"):
        ops.decode_attend(q, k, v, [cache(10)], [cache(11)], layer, [start], [4], scale, [start, start + 2, 0, 0])
    with pytest.raises(RuntimeError, match="one entry per row"):
        ops.decode_attend(q, k, v, [cache(10)], [cache(11)], layer, [start], [4], scale, [start])


def _float32_runner():
    model = tiny_llama(300, seed=11, hidden=96, kv_heads=2, bias=True).float()  # qkv and o biases
    return model, LlamaRunner(model, 128)


@pytest.mark.parametrize("kv_dtype,tolerance", [(None, 1e-4), (torch.bfloat16, 0.05)], ids=["float32", "bf16-caches"])
def test_the_lean_runner_uses_it_and_a_sequence_s_logits_do_not_depend_on_its_batch(kv_dtype, tolerance):
    """float32 weights, float32 or bfloat16 caches (`--kv-dtype`): sequence A's logits are the same bits
    alone and beside other sequences' steps of any kind, and close to the Hugging Face model's (within
    bfloat16's rounding of the keys and values where the caches hold it)."""
    model, runner = _float32_runner()
    runner = LlamaRunner(model, 128, kv_dtype=kv_dtype)
    assert runner.lm_head.rp is not None and runner.layers[0][1].rp is not None
    a = [int(t) for t in torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(1))]
    alone = runner.new_cache()
    runner.forward_batch([Step(alone, a[:20])])
    want = runner.forward_batch([Step(alone, a[20:25])])[0]
    others = [runner.new_cache() for _ in range(3)]
    runner.forward_batch([Step(c, a[i:i + 10 + i]) for i, c in enumerate(others)])
    shared = runner.new_cache()
    runner.forward_batch([Step(shared, a[:20]), Step(others[0], [5] * 17)])
    got = runner.forward_batch([Step(others[1], [7]), Step(shared, a[20:25]), Step(others[2], [1, 2, 3], last=True)])
    assert torch.equal(got[1], want)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([a[:25]])).logits[0, 20:25]
    torch.testing.assert_close(want, ref, rtol=tolerance, atol=tolerance)
    pruned = runner.forward_batch([Step(alone, a[25:26], rows=torch.tensor([3, 299, 17]))])[0]
    torch.testing.assert_close(pruned, model(input_ids=torch.tensor([a[:26]])).logits[0, 25:, [3, 299, 17]].detach(),
                               rtol=tolerance, atol=tolerance)


def test_decoding_steps_attend_through_the_kernel_and_stay_the_same_bits_in_any_batch(monkeypatch):
    """A pass of one-token steps only (every session decoding) takes the kernel's attention in one call:
    each session's logits the same bits alone and together, close to torch's attention
    (CROSSDRAFT_DECODE_KERNEL=0) and to the Hugging Face model; and a verification block's rows are the
    same bits as the same tokens decoded one by one."""
    model, runner = _float32_runner()
    assert runner.decode_kernel
    monkeypatch.setenv("CROSSDRAFT_DECODE_KERNEL", "0")
    plain = LlamaRunner(model, 128)
    assert not plain.decode_kernel
    seqs = [[int(t) for t in torch.randint(0, 300, (12 + 5 * i,), generator=torch.Generator().manual_seed(i))]
            for i in range(3)]
    out = {}
    for name, r in (("kernel", runner), ("torch", plain)):
        caches = [r.new_cache() for _ in seqs]
        r.forward_batch([Step(c, s[:-1]) for c, s in zip(caches, seqs)])
        together = r.forward_batch([Step(c, s[-1:]) for c, s in zip(caches, seqs)])
        for c in caches:
            c.truncate(c.length - 1)
        alone = [r.forward_batch([Step(c, s[-1:])])[0] for c, s in zip(caches, seqs)]
        out[name] = (together, alone)
    for t, a in zip(*out["kernel"]):
        assert torch.equal(t, a)
    for t, a in zip(out["kernel"][0], out["torch"][0]):
        torch.testing.assert_close(t, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([seqs[2]])).logits[0, -1:]
    torch.testing.assert_close(out["kernel"][0][2], ref, rtol=1e-4, atol=1e-4)
    block, steps = runner.new_cache(), runner.new_cache()
    for c in (block, steps):
        runner.forward_batch([Step(c, seqs[2][:10])])
    as_block = runner.forward_batch([Step(block, seqs[2][10:15])])[0]
    one_by_one = torch.cat([runner.forward_batch([Step(steps, [t])])[0] for t in seqs[2][10:15]])
    assert torch.equal(as_block, one_by_one)


SCRIPT = r"""
import json, torch
from crossdraft import kernels
from crossdraft.runner import LlamaRunner
from helpers import tiny_llama
model = tiny_llama(300, seed=11, hidden=96, kv_heads=2, bias=True).float()
runner = LlamaRunner(model, 128)
logits = runner.forward(list(range(1, 21)))
with torch.no_grad():
    ref = model(input_ids=torch.tensor([list(range(1, 21))])).logits[0]
print(json.dumps({"available": kernels.available(), "why": kernels.why_not(), "rp": runner.lm_head.rp is not None,
                  "scripted": runner._stack is not __import__("crossdraft.fused").fused._layers,
                  "close": bool(torch.allclose(logits, ref, rtol=1e-4, atol=1e-4))}))
"""


def test_without_the_kernel_the_runner_keeps_torch_s_kernels():
    env = dict(os.environ, CROSSDRAFT_KERNELS="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"available": False, "why": "CROSSDRAFT_KERNELS=0", "rp": False, "scripted": True, "close": True}
    assert "not in use (CROSSDRAFT_KERNELS=0)" in out.stderr


def test_python_m_crossdraft_kernels_builds_and_checks_it():
    out = subprocess.run([sys.executable, "-m", "crossdraft.kernels"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "in use" in out.stdout, out.stdout + out.stderr


def test_kernels_built_ahead_load_where_no_compiler_is(tmp_path):
    """`--prebuild DIR` (what the container image does while it has a compiler) writes libraries that a
    process with no compiler (CXX=false) and an empty cache loads and checks; without them the same process
    cannot build and keeps torch's kernels (the negative control)."""
    ahead, cache = tmp_path / "ahead", tmp_path / "cache"
    built = subprocess.run([sys.executable, "-m", "crossdraft.kernels", "--prebuild", str(ahead)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    libs = sorted(ahead.glob("*.so"))
    assert sorted(p.name.split("_")[2] for p in libs) == ["avx2", "avx512"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in libs)  # others (a container's user) may load them
    no_compiler = dict(os.environ, CXX="false", CROSSDRAFT_KERNEL_CACHE=str(cache))
    for prebuilt, code, said in ((str(ahead), 0, "in use"), (str(tmp_path / "none"), 1, "not in use")):
        out = subprocess.run([sys.executable, "-m", "crossdraft.kernels"], capture_output=True, text=True,
                             timeout=300, env=dict(no_compiler, CROSSDRAFT_KERNEL_PREBUILT=prebuilt))
        assert out.returncode == code and said in out.stdout, out.stdout + out.stderr
    assert not list(cache.glob("*.so"))  # nothing was built here


def test_a_step_that_wants_its_last_row_only_gives_the_same_bits_and_the_same_cache():
    """A prompt's prefill (`last`) skips the final layer's output projection and MLP for every row but its
    last (runner._wanted): its logits and its cache entries are the same bits as a pass over every row."""
    _, runner = _float32_runner()
    ids = [int(t) for t in torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(2))]
    full, last = runner.new_cache(), runner.new_cache()
    every = runner.forward_batch([Step(full, ids)])[0]
    only = runner.forward_batch([Step(last, ids, last=True)])[0]
    assert only.shape == (1, 300) and torch.equal(only[0], every[-1])
    assert torch.equal(full.data[0][:, :, :37], last.data[0][:, :, :37])
    assert torch.equal(full.data[1][:, :, :37], last.data[1][:, :, :37])
    # and beside other steps: a one-token step, a pruned last row, a whole block
    others = [runner.new_cache() for _ in range(2)]
    runner.forward_batch([Step(c, ids[:9]) for c in others])
    rows = torch.tensor([299, 4])
    mixed = runner.forward_batch([Step(others[0], ids[9:10]), Step(runner.new_cache(), ids, last=True),
                                  Step(others[1], ids[9:14], last=True, rows=rows), Step(runner.new_cache(), ids[:6])])
    assert torch.equal(mixed[1][0], every[-1])  # the same sequence in the same blocks: the same bits
    assert mixed[0].shape == (1, 300) and mixed[2].shape == (1, 2) and mixed[3].shape == (6, 300)
    # other blocks of the same tokens: attention's matrix products (torch's) may round differently
    torch.testing.assert_close(mixed[3], every[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2][0], every[13, rows], rtol=1e-5, atol=1e-5)
