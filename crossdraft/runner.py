"""Model runner: a causal LM run over KV caches that its callers own, many sequences in one pass.

Owns: loading a Hugging Face `AutoModelForCausalLM` (a local directory or a Hub id) and running it.
Two contracts, the second built on the first:

    cache = runner.new_cache()            a sequence's KV cache (`KVCache`); grows as it is used
    runner.forward_batch([Step, ...])     one pass over several sequences' blocks, each appended to its
                                          own cache at its own length -> each step's logits
    runner.check(step)                    ValueError if a step cannot run (context full), before a batch

    runner.length                         the installed cache (`runner.cache`): what single-sequence
    runner.forward(ids)                   callers use; append ids at positions length.., logits [n, V]
    runner.forward(ids, last_only=True)   the same, logits of the last position only [1, V]
    runner.forward(ids, pruned=True)      logits over the pruned head's rows only (TLI drafting)
    runner.truncate(n)                    forget every position >= n (rejected drafts)
    runner.forward_tree(ids, parents)     logits [n, V] of a tree of tokens after the cache (node i
                                          follows parents[i], -1: the cache's end); the cache is left as it was

Two implementations sit behind it:
- `LlamaRunner`, for Llama-family decoders (llama, qwen2, mistral) with a RoPE whose frequencies do not
  change with the length (default, linear, llama3, yarn): the weights of the loaded Hugging Face
  model, run by a lean forward. A batch's tokens go
  through every matrix product together (the weights are read once for all of them: what makes a
  batch cheaper than its sequences one by one), and each sequence attends over its own cache. On a
  CPU a small model's step is dominated by framework overhead, and this path removes most of it (see
  docs/benchmarks.md). Its decoder layers are `crossdraft/fused.py`: one TorchScript function run
  without the GIL, where this torch has TorchScript; the same source op by op in Python elsewhere.
  Numerically it is the Hugging Face computation; the tests compare logits and greedy outputs with the
  Hugging Face model, and batched logits with one-by-one logits.
- `HFRunner`, any other causal LM, through the model's own forward and a `DynamicCache` per sequence;
  a batch runs its sequences one at a time.

A model with sliding-window attention in use (mistral's `sliding_window`, qwen2's `use_sliding_window`
layers) gets a context capped below its window (`context_limit`): there every position sees every
earlier one, so the window changes nothing and both runners are exact; past it they would not be.

Never: knows about sessions, tokenizers, sampling or speculation.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import fused, kernels
from .errors import InvalidArgument, ModelLoadError

FAST_MODEL_TYPES = {"llama", "qwen2", "mistral"}
BLOCK = 64  # a KV cache grows in whole blocks of this many positions
# Blocks up to this many tokens (decoding steps, verifications) attend through crossdraft's CPU kernel,
# longer ones (a prompt's prefill) through torch's matrix products, which do a block's rows together.
DECODE_ROWS = 16
# RoPE schemes whose frequencies are fixed once the model is built: its rotary embedding holds them
# (`inv_freq`, `attention_scaling`, the scaling included), and LlamaRunner's tables are computed from
# them. "dynamic" (NTK) and "longrope" change them with the length of each forward call, which a KV
# cache cannot follow exactly: those stay on HFRunner, as Hugging Face computes them.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}

log = logging.getLogger("crossdraft.runner")


def pick_device(device: Optional[str] = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_local(name_or_path: str) -> None:
    """A name that looks like a path must be a directory; anything else is taken as a Hub id."""
    if not name_or_path:
        raise ModelLoadError("no model given")
    looks_local = os.path.sep in name_or_path.strip("/") and name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelLoadError(f"model directory not found: {name_or_path}")


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(name_or_path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """AutoModelForCausalLM from a local directory or a Hub id; errors become one-line ModelLoadError."""
    from transformers import AutoModelForCausalLM

    check_local(name_or_path)
    quiet_transformers()
    dev = pick_device(device)
    dt = dtype or default_dtype(dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt)
    except Exception as e:  # noqa: BLE001 - every loader failure is reported the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {msg}") from None
    return model.to(dev).eval()


def make_runner(model, max_length: Optional[int] = None, fast: bool = True,
                kv_dtype: Optional[torch.dtype] = None) -> "Runner":
    """The fastest runner that is exact for this model. `kv_dtype`: what its KV caches hold, where that is
    not the model's own dtype (`--kv-dtype bfloat16`: the lean runner only)."""
    limit = context_limit(model.config, max_length)
    if limit < (max_length or _max_positions(model.config)):
        log.info("%s has sliding-window attention (window %d): its context is capped at %d positions, where "
                 "the window masks nothing and the output is exact", getattr(model.config, "model_type", "the model"),
                 sliding_window(model.config), limit)
    if fast and LlamaRunner.supports(model):
        return LlamaRunner(model, max_length, kv_dtype)
    if kv_dtype is not None and kv_dtype != next(model.parameters()).dtype:
        raise InvalidArgument(f"--kv-dtype {str(kv_dtype).replace('torch.', '')} needs the lean Llama runner; "
                              f"{getattr(model.config, 'model_type', 'this model')} runs through Hugging Face's "
                              "forward here, whose caches hold the model's own dtype")
    return HFRunner(model, max_length)


def sliding_window(config) -> Optional[int]:
    """The attention window of a model that has one in use, else None: mistral's `sliding_window` (every
    layer), qwen2's when `use_sliding_window` (the layers `layer_types` marks "sliding_attention")."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def context_limit(config, max_length: Optional[int] = None) -> int:
    """Positions a runner holds: `max_length` (default: the model's max_position_embeddings), and with a
    sliding window W in use at most W - 1. A query at position i attends to keys i - W + 1 .. i, so in a
    context of at most W positions the window masks nothing; W - 1 because transformers' sliding-window
    cache (HFRunner) cannot roll back once it has held W positions."""
    limit = int(max_length or _max_positions(config))
    window = sliding_window(config)
    return limit if window is None else min(limit, window - 1)


class KVCache:
    """One sequence's KV cache, owned by its caller (a session), run by a runner.

    `length`: positions whose keys and values are in it. `data`: the runner's own representation
    (opaque to callers). `truncate(n)` forgets every position >= n (rejected drafts); entries past
    `length` are stale and overwritten before they are read. A cache grows as it is used (see
    `LlamaRunner`: in blocks, never to more than the runner's `max_length`), so an open session holds
    memory for the positions it has used, not for the model's whole context. `limit`: the positions it
    may grow to (a session's reservation under a KV budget, crossdraft/kvbudget.py); None: the runner's
    max_length."""

    __slots__ = ("data", "length", "limit")

    def __init__(self, data=None, length: int = 0, limit: Optional[int] = None):
        self.data, self.length, self.limit = data, length, limit

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


@dataclass(eq=False)
class Step:
    """One sequence's block in a batched forward (`Runner.forward_batch`).

    ids are appended to `cache` at positions cache.length.. (the cache grows by len(ids)); the result is
    their logits [n, V], or only the last position's [1, V] with `last`. `rows`: a pruned LM head, the
    logits of these vocabulary rows only [.., len(rows)] (TLI drafting); None: the whole head.
    `parents`: the ids are a token tree hung after the cache instead (node i follows node parents[i],
    -1: the cache's end; slrs): logits of every node, and the cache keeps its length. `chunk`: a long
    step (a prompt's prefill, with `last`) that a scheduler may run in pieces over several passes
    (`crossdraft.scheduler`); runners ignore it. `depths`: a causal block with siblings (a verification
    with alternatives, crossdraft/verifier.py; runners with `siblings` only): row r sees the cache, the
    block's first depths[r] rows and itself, at position cache.length + depths[r]. Rows 0..c-1 are a
    chain (depths[r] = r) and every later row a sibling of one of them (1 <= depths[r] <= c); every row is
    written, the cache grows by n as for a chain, and the caller keeps what it wants (`move`, `truncate`)."""

    cache: KVCache
    ids: list
    last: bool = False
    rows: Optional[torch.Tensor] = None
    parents: Optional[list] = None
    chunk: bool = False
    depths: Optional[list] = None

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def end(self) -> int:
        """The cache positions the step writes: a tree's nodes too are written past the end (then forgotten)."""
        return self.cache.length + len(self.ids)


def _check_depths(step: Step, supported: bool) -> None:
    """ValueError unless `step.depths` is a chain followed by siblings of its rows (see `Step`)."""
    if not supported:
        raise ValueError("this runner does not run blocks with siblings")
    d = step.depths
    chain = next((r for r, x in enumerate(d) if x != r), len(d))
    if len(d) != len(step.ids) or step.parents is not None or any(not 1 <= x <= chain for x in d[chain:]):
        raise ValueError("a block with siblings is a chain (depth r at row r), then rows of depth 1..its length")


class Runner:
    """What every runner shares: the batched contract over callers' caches, and the single-sequence
    contract of the module docstring over one installed cache (`self.cache`), built on it.

    Subclasses implement `new_cache()`, `_forward(ids, last_only, rows)` and `_forward_tree(ids,
    parents)` on the installed cache; `LlamaRunner` also overrides `forward_batch` with a real batched
    pass. The default `forward_batch` runs the steps one after the other (the generic runner's
    "one session at a time", through the same scheduler)."""

    vocab_size: int
    max_length: int
    device: torch.device
    cache: KVCache
    pruned_rows: Optional[torch.Tensor] = None
    siblings = False  # whether forward_batch takes steps with `depths`, and `move` exists (LlamaRunner)

    # --- the batched contract --------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        raise NotImplementedError

    def check(self, step: Step) -> None:
        """ValueError if the step cannot run (its cache would pass the context); checked before a batch
        so that one sequence's bad step never fails the others."""
        need = step.cache.length + len(step.ids)
        room = self.max_length if step.cache.limit is None else min(step.cache.limit, self.max_length)
        if not step.ids:
            raise ValueError("a step needs at least one token")
        if need > room:
            raise ValueError(f"context full: {step.cache.length} + {len(step.ids)} > {room} positions")
        if step.parents is not None:
            if len(step.parents) != len(step.ids) or any(not -1 <= p < i for i, p in enumerate(step.parents)):
                raise ValueError("forward_tree: every parent must come before its child")
        if step.depths is not None:
            _check_depths(step, self.siblings)

    def forward_batch(self, steps: list) -> list:
        """Logits of each step (see `Step`), in order. The default runs them one at a time."""
        out = []
        for s in steps:
            self.check(s)
            prev, self.cache = self.cache, s.cache
            try:
                if s.parents is not None:
                    out.append(self._forward_tree(s.ids, s.parents, s.rows))
                else:
                    out.append(self._forward(s.ids, s.last, s.rows))
            finally:
                self.cache = prev
        return out

    # --- the single-sequence contract over the installed cache -------------------------------------
    @property
    def length(self) -> int:
        return self.cache.length

    def prune_head(self, rows: Optional[torch.Tensor]) -> None:
        """The rows `forward(..., pruned=True)` keeps (TLI drafting)."""
        self.pruned_rows = None if rows is None else rows.to(self.device)

    def forward(self, ids, last_only: bool = False, pruned: bool = False) -> torch.Tensor:
        rows = self.pruned_rows if pruned else None
        return self.forward_batch([Step(self.cache, list(ids), last_only, rows)])[0]

    def forward_tree(self, ids, parents) -> torch.Tensor:
        """Logits [n, V] of every node of a token tree hung after the cache: node i is token ids[i]
        following node parents[i] (-1: the last cached position; parents[i] < i). The cache is as
        before afterwards."""
        return self.forward_batch([Step(self.cache, list(ids), parents=list(parents))])[0]

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    def reset(self) -> None:
        self.truncate(0)

    def _forward(self, ids, last_only: bool, rows) -> torch.Tensor:
        raise NotImplementedError

    def _forward_tree(self, ids, parents, rows=None) -> torch.Tensor:
        """Each node's chain run on its own (LlamaRunner runs the tree in one pass)."""
        base = self.cache.length
        out = []
        for i in range(len(ids)):
            chain, j = [], i
            while j >= 0:
                chain.append(ids[j])
                j = parents[j]
            self.cache.truncate(base)
            out.append(self._forward(chain[::-1], True, rows)[0])
        self.cache.truncate(base)
        return torch.stack(out)


def _bf16_values(w: torch.Tensor) -> bool:
    """Whether every float32 of `w` is a bfloat16 value (its lower 16 bits zero); in slices of about 16 MB,
    so that a large matrix needs no temporary of its size."""
    rows = max(1, (1 << 22) // max(1, w.shape[1]))
    bits = w.view(torch.int32)
    return all(bool(bits[i:i + rows].bitwise_and(0xFFFF).eq(0).all()) for i in range(0, w.shape[0], rows))


def _pack(w: torch.Tensor) -> torch.Tensor:
    """W's panels for crossdraft's kernel: bfloat16 where W holds bfloat16 values (and the loaded kernel
    packs them; CROSSDRAFT_BF16_PANELS=0: never), else float32."""
    if (os.environ.get("CROSSDRAFT_BF16_PANELS", "1") != "0" and hasattr(torch.ops.crossdraft, "rows_pack_bf16")
            and _bf16_values(w)):
        return torch.ops.crossdraft.rows_pack_bf16(w)
    return torch.ops.crossdraft.rows_pack(w)


def _bf16_columns(cols: int) -> torch.Tensor:
    """The column each word of a bfloat16 panel row holds (rows.cpp's `bf16_column`, LANES = cols / 2)."""
    return torch.tensor([(cols // 2 if p % 2 else 0) + p // 2 for p in range(cols)])


class _Linear:
    """y = x W^T + b with the kernel that is fastest for the number of rows on a CPU.

    Small-model decoding on a CPU is bound by reading the weights, and a batched pass by reading them
    and multiplying. On an x86-64 CPU with AVX2 and FMA, in float32, every number of rows goes through
    crossdraft's own kernel (crossdraft/kernels: W in panels, `rp`), which streams the weights once for
    all rows: on the 2-core machine (target-bpe8k's 94 MB of weights, one thread, milliseconds)

        rows                      1     2     5     8     64
        x @ W^T [in, out] (MKL)   6.2   8.6   12.7  13.2
        oneDNN, prepacked         6.7   7.7   5.1   7.1   30.2
        crossdraft's kernel       3.7   3.5   3.7   4.3   29.6

    and its rounding does not depend on the other rows (a session's logits are the same whichever
    sessions share its pass). A layer whose float32 weights are all bfloat16 values (a checkpoint stored
    in bfloat16, as the zoo's) keeps its panels in bfloat16 (`_pack`): the same outputs bit for bit, half
    the memory, and one row about 2.5 times as fast (the weights stream from memory); 6-8 rows cost up to
    10% more (two more vector operations per weight where the FMAs are the limit; docs/benchmarks.md,
    "bfloat16 panels"). CROSSDRAFT_BF16_PANELS=0 keeps float32 panels. Where that kernel cannot be built (crossdraft.kernels says why), one or
    two rows multiply by W^T stored contiguous [in, out] and more by the weights prepacked for oneDNN
    (`torch.ops.mkldnn._linear_pointwise`), as before: those round differently for different numbers
    of rows. Elsewhere (CUDA, float64, bfloat16) it is plain `F.linear`. A CPU layer holds its weights
    once with the kernel (`rp`), twice without (`wt` and `packed`); `w` only off the CPU."""

    __slots__ = ("w", "wt", "packed", "rp", "n", "b")
    PACKED_FROM = 3  # rows (torch's kernels)

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor] = None):
        cpu32 = w.device.type == "cpu" and w.dtype == torch.float32
        self.n, self.b = w.shape[0], b
        self.w = self.wt = self.packed = self.rp = None
        if cpu32 and kernels.load():
            self.rp = _pack(w.contiguous())
            self.b = None if b is None else b.float().contiguous()
        elif w.device.type == "cpu":
            self.wt = w.t().contiguous()
            self.packed = _prepack(w.contiguous()) if cpu32 else None
        else:
            self.w = w.contiguous()

    def weight(self) -> torch.Tensor:
        """W [out, in], from whichever layout the layer holds."""
        if self.rp is not None:
            rp = self.rp
            if rp.dtype == torch.bfloat16:  # each panel row's columns in the kernel's order (`_bf16_columns`)
                rp = torch.empty(rp.shape, dtype=torch.float32).index_copy_(2, _bf16_columns(rp.shape[2]), rp.float())
            return rp.transpose(1, 2).reshape(-1, rp.shape[1])[: self.n]
        return self.w if self.w is not None else self.wt.t()

    def rows(self, rows: torch.Tensor) -> "_Linear":
        """The layer restricted to these output rows (a pruned LM head)."""
        b = None if self.b is None else self.b[rows]
        w = self.weight()
        return _Linear(w.index_select(0, rows.to(w.device)), b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fused.linear(x, self.w, self.wt, self.packed, self.rp, self.b, self.n, self.PACKED_FROM)


def _prepack(w: torch.Tensor):
    """w prepacked for oneDNN's linear, or None where this torch cannot (then `x @ W^T` serves all rows)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        x = torch.ones(4, w.shape[1], dtype=w.dtype)
        if not torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), x @ w.t(),
                              rtol=1e-4, atol=1e-3):
            return None
        return packed
    except (AttributeError, RuntimeError):
        return None


class LlamaRunner(Runner):
    """Lean forward for Llama-family weights: many sequences' blocks in one pass (`forward_batch`), each over
    its own KV cache [layers, kv_heads, capacity, head_dim] that grows in blocks of `BLOCK` positions.
    The caches hold the model's dtype, or `kv_dtype` (bfloat16 under float32 weights: half the memory and
    half of what attention reads). Every key and value is rounded to it as it is written, and every
    attention reads it back from the cache, its own block's included, so a row's result does not depend
    on the block or the batch it came in, whatever the caches hold."""

    siblings = True

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in FAST_MODEL_TYPES:
            return False
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if any(isinstance(v, dict) for v in rope.values()):  # per-layer-type RoPE
            return False
        if (rope.get("rope_type") or rope.get("type") or "default") not in STATIC_ROPE_TYPES:
            return False
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
            return False
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            return False
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * inner.rotary_emb.inv_freq.numel() == head_dim  # RoPE over the whole head (no partial rotary)

    def __init__(self, model, max_length: Optional[int] = None, kv_dtype: Optional[torch.dtype] = None):
        cfg = model.config
        inner = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = kv_dtype or p.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.max_length = context_limit(cfg, max_length)
        self.vocab_size = model.lm_head.weight.shape[0]
        self.inter = inner.layers[0].mlp.gate_proj.weight.shape[0]
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = _Linear(model.lm_head.weight.detach())
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).detach().contiguous()
            bqkv = None
            if a.q_proj.bias is not None:
                bqkv = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0).detach()
            bo = a.o_proj.bias.detach() if a.o_proj.bias is not None else None
            wo = a.o_proj.weight.detach()
            wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0).detach().contiguous()
            self.layers.append((layer.input_layernorm.weight.detach(), _Linear(wqkv, bqkv), _Linear(wo, bo),
                                layer.post_attention_layernorm.weight.detach(), _Linear(wgu),
                                _Linear(m.down_proj.weight.detach())))
        # RoPE tables exactly as the model's own rotary embedding computes them (float32), with the scaling
        # of a static scheme (linear, llama3, yarn) already in its inv_freq and attention_scaling.
        rot = inner.rotary_emb
        pos = torch.arange(self.max_length, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * rot.inv_freq.to(self.device, torch.float32)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = getattr(rot, "attention_scaling", 1.0)
        self.cos = (emb.cos() * scale).to(self.dtype)  # [max_len, head_dim]
        self.sin = fused.rope_sin_rot((emb.sin() * scale).to(self.dtype))  # (as fused._rope takes it)
        self.scaling = self.head_dim ** -0.5
        # bytes of keys and values one position takes in a cache (all layers): what KV budgets count
        self.bytes_per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * self.kv_dtype.itemsize
        self.pruned_rows = None
        self._heads: dict = {}  # id(rows) -> (rows, pruned head): the pruned LM heads in use
        # the decoder layers (crossdraft/fused.py): compiled to run without the GIL where TorchScript is here
        self._stack = fused.layer_stack()
        self._stack_weights = fused.weights(self.layers)
        # decoding steps' attention (blocks of up to DECODE_ROWS, not trees) through crossdraft's CPU kernel
        # (crossdraft/kernels), where it is built
        self.decode_kernel = (self.device.type == "cpu" and self.dtype == torch.float32 and kernels.available()
                              and os.environ.get("CROSSDRAFT_DECODE_KERNEL", "1") != "0")
        self.cache = self.new_cache()

    # --- caches -----------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(None, 0)

    def _reserve(self, cache: KVCache, end: int) -> None:
        """Room for positions [0, end) in `cache`: allocated on first use, then grown (doubling, in whole
        blocks, never past its limit or max_length) with its entries copied."""
        data = cache.data
        cap = 0 if data is None else data[0].shape[2]
        if end <= cap:
            return
        room = self.max_length if cache.limit is None else min(cache.limit, self.max_length)
        new_cap = min(room, max(-(-end // BLOCK) * BLOCK, 2 * cap))
        shape = (len(self.layers), self.n_kv, new_cap, self.head_dim)
        k = torch.empty(shape, device=self.device, dtype=self.kv_dtype)
        v = torch.empty(shape, device=self.device, dtype=self.kv_dtype)
        if data is not None and cache.length:
            k[:, :, :cache.length] = data[0][:, :, :cache.length]
            v[:, :, :cache.length] = data[1][:, :, :cache.length]
        cache.data = (k, v)

    @staticmethod
    def capacity(cache: KVCache) -> int:
        """Positions allocated in `cache` (its memory is capacity x bytes_per_token)."""
        return 0 if cache.data is None else cache.data[0].shape[2]

    def _by_kernel(self, s: Step) -> bool:
        """Whether a step's attention goes through the decode kernel: a short block, not a tree."""
        return self.decode_kernel and s.parents is None and len(s.ids) <= DECODE_ROWS

    @staticmethod
    @torch.inference_mode()
    def move(cache: KVCache, src: int, dst: int) -> None:
        """Position src's keys and values (every layer) to position dst < cache.length: a sibling that was
        accepted, to the place of the chain row it replaces (`Step.depths`)."""
        if not 0 <= dst < cache.length or not 0 <= src < cache.length:
            raise ValueError(f"cannot move position {src} to {dst} in a cache of {cache.length}")
        k, v = cache.data
        k[:, :, dst] = k[:, :, src]
        v[:, :, dst] = v[:, :, src]

    def _head(self, rows):
        if rows is None:
            return self.lm_head
        got = self._heads.get(id(rows))
        if got is None or got[0] is not rows:
            if len(self._heads) > 8:  # rows of drafters no longer used
                self._heads.clear()
            got = self._heads[id(rows)] = (rows, self.lm_head.rows(rows))
        return got[1]

    # --- the forward pass ------------------------------------------------------------------------------
    def _plan(self, steps: list) -> tuple:
        """(token ids [N], positions [N], [(step, offset, n, start, mask or None)]) of a batch."""
        ids, pos, plan, off = [], [], [], 0
        for s in steps:
            n, start = len(s.ids), s.cache.length
            ids.extend(s.ids)
            mask = None
            if s.parents is not None:  # a tree: node i at start + depth(i), seeing the cache and its ancestors
                depth, anc = [], torch.zeros(n, n, dtype=torch.bool)
                for i, p in enumerate(s.parents):
                    depth.append(depth[p] + 1 if p >= 0 else 0)
                    if p >= 0:
                        anc[i] = anc[p]
                    anc[i, i] = True
                if start + max(depth) >= self.max_length:
                    raise ValueError(f"context full: a tree reaches position {start + max(depth)} of {self.max_length}")
                pos.extend(start + d for d in depth)
                mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device)
                mask[:, start:] = anc.to(self.device)
            elif s.depths is not None:  # row r at start + depths[r], seeing the block's first depths[r] rows
                pos.extend(start + d for d in s.depths)
                if not self._by_kernel(s):  # (the kernel takes what each row sees as `seen` instead)
                    mask = torch.zeros(n, start + n, dtype=torch.bool)
                    for r, d in enumerate(s.depths):
                        mask[r, :start + d] = True
                        mask[r, start + r] = True
                    mask = mask.to(self.device)
            else:
                pos.extend(range(start, start + n))
                if n > 1:  # causal within the block, everything before it visible
                    mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril_(diagonal=start)
            plan.append((s, off, n, start, mask))
            off += n
        dev = self.device
        return (torch.as_tensor(ids, device=dev, dtype=torch.long), torch.as_tensor(pos, device=dev, dtype=torch.long),
                plan)

    @staticmethod
    def _wanted(plan: list) -> tuple:
        """(rows of the pass whose logits are wanted, as a tensor, or None for all of them; each step's
        (first, count) among those rows). A step with `last` wants only its last row: the final layer
        skips the rest of its rows after their keys and values are in the cache (see `fused._layers`)."""
        rows, spans = [], []
        for s, off, n, _, _ in plan:
            spans.append((len(rows), 1 if s.last else n))
            rows.extend(range(off + n - 1, off + n) if s.last else range(off, off + n))
        if len(rows) == sum(p[2] for p in plan):
            return None, spans
        return torch.as_tensor(rows, dtype=torch.long), spans

    def _heads_of(self, x, plan: list, spans: list) -> list:
        """Each step's logits from the final hidden states x [wanted rows, hidden] (`_wanted`): one matmul
        per head in use."""
        if len(plan) == 1:
            return [self._head(plan[0][0].rows)(x)]
        groups: dict = {}
        for i, (s, *_) in enumerate(plan):
            groups.setdefault(id(s.rows), (s.rows, []))[1].append(i)
        out = [None] * len(plan)
        for rows, members in groups.values():
            if len(members) == len(plan):
                logits, at = self._head(rows)(x), [spans[i][0] for i in members]
            else:
                idx = [r for i in members for r in range(spans[i][0], spans[i][0] + spans[i][1])]
                logits = self._head(rows)(x.index_select(0, torch.as_tensor(idx, device=x.device)))
                at = list(itertools.accumulate([0] + [spans[i][1] for i in members[:-1]]))
            for i, a in zip(members, at):
                out[i] = logits[a: a + spans[i][1]]
        return out

    @torch.inference_mode()
    def forward_batch(self, steps: list) -> list:
        for s in steps:
            self.check(s)
        for s in steps:
            self._reserve(s.cache, s.end)
        idx, pos, plan = self._plan(steps)
        keep, spans = self._wanted(plan)
        x = self.embed.index_select(0, idx)  # [N, hidden]
        cos, sin = self.cos.index_select(0, pos)[:, None], self.sin.index_select(0, pos)[:, None]  # [N, 1, D]
        data = [s.cache.data for s, _, _, _, _ in plan]
        with torch.jit.optimized_execution(False):  # (this thread only) no fusion: exactly the source's ops
            x = self._stack(x, cos, sin, self._stack_weights, [d[0] for d in data], [d[1] for d in data],
                            [p[1] for p in plan], [p[2] for p in plan], [p[3] for p in plan], [p[4] for p in plan],
                            None if keep is None else keep.to(self.device), self.n_heads, self.n_kv,
                            self.head_dim, self.scaling, self.eps, self.inter, _Linear.PACKED_FROM,
                            [self._by_kernel(s) for s, *_ in plan],
                            [[p[3] + d for d in p[0].depths] if p[0].depths is not None else [] for p in plan])
        for s, _, n, _, _ in plan:
            if s.parents is None:  # (a tree's entries are stale from now on)
                s.cache.length += n
        return self._heads_of(fused.rms_norm(x, self.norm, self.eps), plan, spans)

    def _forward(self, ids, last_only, rows):
        return self.forward_batch([Step(self.cache, list(ids), last_only, rows)])[0]

    def _forward_tree(self, ids, parents, rows=None):
        return self.forward_batch([Step(self.cache, list(ids), rows=rows, parents=list(parents))])[0]


class HFRunner(Runner):
    """Any causal LM through its own forward, each sequence's cache a `DynamicCache` cropped on rollback.
    Batches run one sequence at a time (`Runner.forward_batch`)."""

    def __init__(self, model, max_length: Optional[int] = None):
        from transformers import DynamicCache

        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = self.dtype  # (Hugging Face's caches hold the model's dtype)
        self.max_length = context_limit(model.config, max_length)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache_cls = DynamicCache
        self.pruned_rows = None
        cfg = model.config
        heads = getattr(cfg, "num_attention_heads", 1)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", heads) // heads
        self.bytes_per_token = 2 * getattr(cfg, "num_hidden_layers", 1) * kv * head_dim * self.dtype.itemsize
        self.cache = self.new_cache()

    def new_cache(self) -> KVCache:
        return KVCache(None, 0)

    @staticmethod
    def capacity(cache: KVCache) -> int:
        return 0 if cache.data is None else cache.data.get_seq_length()

    def _installed(self):
        """The installed cache's DynamicCache, cropped to its length (a truncate is applied lazily)."""
        c = self.cache
        if c.data is None or c.length == 0:
            c.data = self._cache_cls(config=self.model.config)
        elif c.data.get_seq_length() > c.length:
            c.data.crop(c.length - c.data.get_seq_length())  # (a negative count: remove that many)
        return c.data

    @torch.inference_mode()
    def _forward(self, ids, last_only, rows):
        n = len(ids)
        data = self._installed()
        inp = torch.as_tensor([list(ids)], device=self.device, dtype=torch.long)
        out = self.model(input_ids=inp, cache=data, use_cache=True, logits_to_keep=1 if last_only else 0)
        self.cache.length += n
        logits = out.logits[0]
        if last_only:
            logits = logits[-1:]
        if rows is not None:
            logits = logits.index_select(-1, rows.to(self.device))
        return logits
