"""The decoder layers of `LlamaRunner`'s batched pass, as one TorchScript function run without the GIL.

Owns: `_layers`, the decoder layers of `LlamaRunner.forward_batch` (norms, projections, RoPE, each
sequence's attention over its own cache, MLP), written once; `layer_stack()`, that function compiled
once per process with `torch.jit.script`; `weights()`, a runner's layers in the flat form it takes; and
`linear`, a layer's matrix product by whichever kernel its weights are laid out for (crossdraft/kernels).

Why. In eager PyTorch every operator releases the GIL and takes it back when it returns, a few thousand
times in one batched pass. In a model service other Python threads (gRPC's, each stream's) run beside the
scheduler, and each return may wait for one of them. Measured on the 2-core machine, target-bpe8k, 8
sequences of 250 positions, one torch thread: a pass takes 25.0 ms alone and 34.5 ms beside four Python
threads that each run 200 us every 2 ms. A TorchScript function runs in C++ from its call to its
return, so the other threads run on the other core meanwhile: the same pass takes 23.5 ms alone and
21.9 ms beside those threads. Through the services (verifier, drafter, gateway, one thread each), the
target alone at 1, 4, 8 and 16 clients made 92, 142, 178, 194 tokens/s against 86, 134, 162, 179 with
the plain function in the same session (docs/benchmarks.md).

Compiled or not, it is the same source: the runner calls the compiled function without the graph
executor's optimisations (`torch.jit.optimized_execution(False)`, for its thread only), so that no fuser
changes an operator's rounding on any device, and its logits equal the plain function's bitwise
(tests/test_runner.py). TorchScript is deprecated in favour of torch.compile, which on a CPU needs a C++
compiler at run time and still returns to Python between kernels. Where `torch.jit.script` is missing
or fails, `layer_stack()` returns the plain function, run op by op; CROSSDRAFT_FUSED=0 does too (to
compare them).

Never: allocates or grows caches, or knows sessions.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

log = logging.getLogger("crossdraft.fused")


def linear(x: Tensor, w: Optional[Tensor], wt: Optional[Tensor], packed: Optional[Tensor], rp: Optional[Tensor],
           b: Optional[Tensor], n: int, packed_from: int) -> Tensor:
    """runner._Linear.__call__: whichever of its layouts the layer holds (see runner._Linear). `rp`: W in
    crossdraft's panels (crossdraft/kernels) for its own kernel; `n`: the outputs."""
    if rp is not None:
        return torch.ops.crossdraft.rows_linear(x, rp, n, b)
    if w is not None:
        return F.linear(x, w, b)
    assert wt is not None
    if packed is not None and x.shape[0] >= packed_from:
        return torch.ops.mkldnn._linear_pointwise(
            x, packed, b, "none", torch.jit.annotate(List[Optional[Union[int, float, complex]]], []), "")
    y = torch.matmul(x, wt)
    if b is not None:
        y = y + b
    return y


def _layer_linear(lw: List[Optional[Tensor]], at: int, x: Tensor, n: int, packed_from: int) -> Tensor:
    return linear(x, lw[at], lw[at + 1], lw[at + 2], lw[at + 3], lw[at + 4], n, packed_from)


def rms_norm(x: Tensor, w: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm as Llama computes it (in float32, then back to x's dtype); also the runner's final norm.
    (torch's own `rms_norm` gives the same bits for float32 but costs more compiled: 25 against 19.5 us.)"""
    assert w is not None
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin_rot: Tensor) -> Tensor:
    """Llama's rotary embedding, x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) taken
    as roll(x) = cat(x2, x1) times `sin_rot`, sin with its first half negated (`rope_sin_rot`): the same
    products bit for bit ((-a) b = a (-b) exactly), in two operators fewer (compiled, one token: 14.4 against
    19.5 us a call, 12 calls a step)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_rot


def rope_sin_rot(sin: Tensor) -> Tensor:
    """The sine table as `_rope` takes it: [positions, head_dim], its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def _attend(li: int, q: Tensor, k: Tensor, v: Tensor, kcs: List[Tensor], vcs: List[Tensor], offs: List[int],
            ns: List[int], starts: List[int], masks: List[Optional[Tensor]], scaling: float,
            by_kernel: List[bool], seens: List[List[int]]) -> Tensor:
    """Attention of every sequence over its own cache, its block's keys and values written there first.
    q [N, H, D], k and v [N, KV, D] -> [N, H*D]. The sequences marked in `by_kernel` (short causal blocks:
    decoding steps and verifications, where crossdraft/kernels is built) go through one call for all of
    them; the others (prompts, trees) through explicit matmuls per sequence, which for short blocks cost
    half what SDPA does on a CPU. A sequence's attention never depends on the others in the batch.
    `masks[i]`: a block's causal mask, or a tree's (None: one token). `seens[i]`: for a block with siblings
    (runner.Step.depths), the positions before its own each row sees (the kernel's `seen`); empty: causal."""
    N, H, D = q.shape[0], q.shape[1], q.shape[2]
    out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
    chosen: List[int] = []
    for i in range(len(offs)):
        if by_kernel[i]:
            chosen.append(i)
    if len(chosen) == len(offs):  # all of them: rows in order
        out = torch.ops.crossdraft.decode_attend(q, k, v, kcs, vcs, li, starts, ns, scaling,
                                                 _seen(chosen, starts, ns, seens))
    elif len(chosen) > 0:
        kc1: List[Tensor] = []
        vc1: List[Tensor] = []
        st1: List[int] = []
        n1: List[int] = []
        rows: List[int] = []
        for i in chosen:
            kc1.append(kcs[i])
            vc1.append(vcs[i])
            st1.append(starts[i])
            n1.append(ns[i])
            for r in range(ns[i]):
                rows.append(offs[i] + r)
        idx = torch.tensor(rows, dtype=torch.long, device=q.device)
        got = torch.ops.crossdraft.decode_attend(q.index_select(0, idx), k.index_select(0, idx),
                                                 v.index_select(0, idx), kc1, vc1, li, st1, n1, scaling,
                                                 _seen(chosen, starts, ns, seens))
        out.index_copy_(0, idx, got)
    for i in range(len(offs)):
        if not by_kernel[i]:
            _attend_one(li, q, k, v, kcs[i], vcs[i], offs[i], ns[i], starts[i], masks[i], scaling, out)
    return out.view(N, H * D)


def _seen(chosen: List[int], starts: List[int], ns: List[int], seens: List[List[int]]) -> List[int]:
    """The kernel's `seen` for these sequences' rows: empty where every block is causal."""
    out: List[int] = []
    causal = True
    for i in chosen:
        if len(seens[i]) > 0:
            causal = False
    if causal:
        return out
    for i in chosen:
        if len(seens[i]) > 0:
            out.extend(seens[i])
        else:
            for r in range(ns[i]):
                out.append(starts[i] + r)
    return out


def _attend_one(li: int, q: Tensor, k: Tensor, v: Tensor, kcache: Tensor, vcache: Tensor, off: int, n: int,
                start: int, mask: Optional[Tensor], scaling: float, out: Tensor) -> None:
    """One sequence's block (rows off..off+n of q, k, v) into its cache and its attention into `out`, over
    the cache's entries (its own block's too: rounded to the cache's dtype as every other step sees them)."""
    H, D, KV = q.shape[1], q.shape[2], k.shape[1]
    G = H // KV
    end = start + n
    kc, vc = kcache[li], vcache[li]
    kc[:, start:end] = k[off:off + n].transpose(0, 1)
    vc[:, start:end] = v[off:off + n].transpose(0, 1)
    qs = q[off:off + n].transpose(0, 1).reshape(KV, G * n, D)  # head h uses kv head h // G
    keys, vals = kc[:, :end].to(q.dtype), vc[:, :end].to(q.dtype)  # (no copy where the caches hold q's dtype)
    scores = torch.matmul(qs, keys.transpose(1, 2)) * scaling
    if mask is not None:
        if G > 1:
            mask = mask.repeat(G, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    if scores.dtype == torch.float16 or scores.dtype == torch.bfloat16:
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    else:
        p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p, vals)  # [KV, G n, D]
    out[off:off + n] = o.view(H, n, D).transpose(0, 1)


def _layers(x: Tensor, cos: Tensor, sin: Tensor, layers: List[List[Optional[Tensor]]], kcs: List[Tensor],
            vcs: List[Tensor], offs: List[int], ns: List[int], starts: List[int], masks: List[Optional[Tensor]],
            keep: Optional[Tensor], n_heads: int, n_kv: int, head_dim: int, scaling: float, eps: float, inter: int,
            packed_from: int, by_kernel: List[bool], seens: List[List[int]]) -> Tensor:
    """x [N, hidden] after every decoder layer; sequence i is rows offs[i]..offs[i]+ns[i] of x, at cache
    positions starts[i].., its caches kcs[i], vcs[i] [layers, kv_heads, capacity, head_dim]. `inter`: the
    MLP's intermediate size. `keep`: the rows whose output is wanted (None: all), in that order; the last
    layer drops the others once their keys and values are in the caches, so a prompt's prefill skips
    that layer's output projection and MLP for every position but its last. `by_kernel[i]`: sequence i
attends through crossdraft's CPU kernel (see `_attend`); `seens[i]`, what its rows see where it has siblings."""
    N, hidden = x.shape[0], x.shape[1]
    H, KV, D = n_heads, n_kv, head_dim
    for li in range(len(layers)):
        lw = layers[li]  # indices as in `weights` (TorchScript takes no global constants)
        qkv = _layer_linear(lw, 1, rms_norm(x, lw[0], eps), (H + 2 * KV) * D, packed_from)  # [N, (H + 2 KV) D]
        q = _rope(qkv[:, : H * D].view(N, H, D), cos, sin)
        k = _rope(qkv[:, H * D: (H + KV) * D].view(N, KV, D), cos, sin)
        v = qkv[:, (H + KV) * D:].view(N, KV, D)
        attn = _attend(li, q, k, v, kcs, vcs, offs, ns, starts, masks, scaling, by_kernel, seens)
        if keep is not None and li == len(layers) - 1:
            x, attn = x.index_select(0, keep), attn.index_select(0, keep)
        x = x + _layer_linear(lw, 6, attn, hidden, packed_from)
        g, u = _layer_linear(lw, 12, rms_norm(x, lw[11], eps), 2 * inter, packed_from).chunk(2, dim=-1)
        x = x + _layer_linear(lw, 17, F.silu(g) * u, hidden, packed_from)
    return x


_compiled: dict = {}


def layer_stack():
    """`_layers` compiled, or as it is where TorchScript is not here (or CROSSDRAFT_FUSED=0)."""
    if os.environ.get("CROSSDRAFT_FUSED", "1") == "0":
        return _layers
    if "fn" not in _compiled:
        kernels.load()  # its operators must exist before the function that names them compiles
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script's DeprecationWarning (see the docstring)
                _compiled["fn"] = torch.jit.script(_layers)
        except Exception as e:  # noqa: BLE001 - any failure to compile leaves the plain function
            log.warning("TorchScript is not available here (%s: %s): the decoder layers run op by op",
                        type(e).__name__, e)
            _compiled["fn"] = _layers
    return _compiled["fn"]


def weights(layers: list) -> list:
    """A runner's layers [(input norm, qkv, o, post norm, gate_up, down)] as `_layers` takes them: per layer
    a flat list, the input norm at 0, qkv at 1-5, o at 6-10 (each `_Linear` as w, wt, packed, rp, b), the
    post-attention norm at 11, gate_up at 12-16, down at 17-21."""
    out = []
    for w_in, qkv, o, w_post, gate_up, down in layers:
        lw = [w_in]
        for lin in (qkv, o):
            lw += [lin.w, lin.wt, lin.packed, lin.rp, lin.b]
        lw.append(w_post)
        for lin in (gate_up, down):
            lw += [lin.w, lin.wt, lin.packed, lin.rp, lin.b]
        out.append(lw)
    return out
