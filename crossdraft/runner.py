"""Model runner: a causal LM with an explicit KV cache that grows by several tokens at once and rolls back.

Owns: loading a Hugging Face `AutoModelForCausalLM` (a local directory or a Hub id) and running it
one block of tokens at a time. The contract every algorithm relies on:

    runner.length                 tokens whose keys/values are in the cache
    runner.forward(ids)           append ids at positions length.. length+n-1, return logits [n, V]
    runner.forward(ids, last_only=True)   the same, logits of the last position only [1, V]
    runner.forward(ids, pruned=True)      logits over the pruned head's rows only (TLI drafting)
    runner.truncate(n)            forget every position >= n (rejected drafts)
    runner.forward_tree(ids, parents)     logits [n, V] of a tree of tokens after the cache (node i
                                  follows parents[i], -1: the cache's end); the cache is left as it was

Two implementations sit behind it:
- `LlamaRunner`, for Llama-family decoders (llama, qwen2, mistral) with a RoPE whose frequencies do not
  change with the length (default, linear, llama3, yarn): the weights of the loaded Hugging Face
  model, run by a lean forward with a preallocated cache. On a CPU a small model's step is dominated
  by framework overhead, and this path removes most of it (see the README's profile). Numerically it
  is the Hugging Face computation; the tests compare logits and greedy outputs with the Hugging Face
  model.
- `HFRunner`, any other causal LM, through the model's own forward and a `DynamicCache`.

A model with sliding-window attention in use (mistral's `sliding_window`, qwen2's `use_sliding_window`
layers) gets a context capped below its window (`context_limit`): there every position sees every
earlier one, so the window changes nothing and both runners are exact; past it they would not be.

Never: knows about tokenizers, sampling or speculation.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ModelLoadError

FAST_MODEL_TYPES = {"llama", "qwen2", "mistral"}
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


def make_runner(model, max_length: Optional[int] = None, fast: bool = True) -> "Runner":
    """The fastest runner that is exact for this model."""
    limit = context_limit(model.config, max_length)
    if limit < (max_length or _max_positions(model.config)):
        log.info("%s has sliding-window attention (window %d): its context is capped at %d positions, where "
                 "the window masks nothing and the output is exact", getattr(model.config, "model_type", "the model"),
                 sliding_window(model.config), limit)
    if fast and LlamaRunner.supports(model):
        return LlamaRunner(model, max_length)
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


class Runner:
    """Common part: the pruned head and the bookkeeping of `length`."""

    vocab_size: int
    max_length: int
    length: int = 0
    device: torch.device
    pruned_rows: Optional[torch.Tensor] = None

    def prune_head(self, rows: Optional[torch.Tensor]) -> None:
        """Keep only these vocabulary rows of the LM head for `forward(..., pruned=True)`."""
        raise NotImplementedError

    def forward(self, ids, last_only: bool = False, pruned: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        raise NotImplementedError

    def forward_tree(self, ids, parents) -> torch.Tensor:
        """Logits [n, V] of every node of a token tree hung after the cache: node i is token ids[i]
        following node parents[i] (-1: the last cached position; parents[i] < i). The cache is as
        before afterwards. This default runs each node's chain on its own; LlamaRunner runs the whole
        tree in one pass with a tree attention mask."""
        base = self.length
        out = []
        for i in range(len(ids)):
            chain, j = [], i
            while j >= 0:
                chain.append(ids[j])
                j = parents[j]
            self.truncate(base)
            out.append(self.forward(chain[::-1], last_only=True)[0])
        self.truncate(base)
        return torch.stack(out)

    def reset(self) -> None:
        self.truncate(0)

    def new_cache(self):
        """A fresh, empty KV cache of this runner's shape, not installed (see `swap_cache`)."""
        raise NotImplementedError

    def swap_cache(self, cache):
        """Install `cache` (from `new_cache` or an earlier `swap_cache`) with its length; return the
        cache that was installed, with its length, so it can be swapped back later unchanged."""
        raise NotImplementedError

    def _check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise ValueError(f"context full: {self.length} + {n} > {self.max_length} positions")


class _Linear:
    """y = x W^T + b with the memory layout that is fastest for the block size on a CPU.

    Small-model decoding on a CPU is bound by reading the weights. Measured on the 2-core CI machine
    (MKL, float32, 1536x512 weights out of cache): one row reads the weights fastest as `x @ W^T`
    stored contiguous [in, out] (~18 GB/s against ~8 GB/s for `F.linear`), several rows as
    `(W @ x^T)^T` (~20-30 GB/s). The target's step drops from 11.4 to 7.0 ms and a 5-token
    verification from 17 to 9.5 ms. On CUDA it is plain `F.linear`."""

    __slots__ = ("w", "wt", "b")

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor] = None):
        self.w = w.contiguous()
        self.wt = w.t().contiguous() if w.device.type == "cpu" else None
        self.b = b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.wt is None:
            return F.linear(x, self.w, self.b)
        y = torch.matmul(x, self.wt) if x.shape[0] == 1 else torch.matmul(self.w, x.t()).t()
        return y if self.b is None else y + self.b


class LlamaRunner(Runner):
    """Lean forward for Llama-family weights with a preallocated KV cache [layers, kv_heads, max_len, head_dim]."""

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

    def __init__(self, model, max_length: Optional[int] = None):
        cfg = model.config
        inner = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.max_length = context_limit(cfg, max_length)
        self.vocab_size = model.lm_head.weight.shape[0]
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
        self.sin = (emb.sin() * scale).to(self.dtype)
        self.scaling = self.head_dim ** -0.5
        shape = (len(self.layers), self.n_kv, self.max_length, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.length = 0
        self.pruned_rows = None
        self.pruned_head = None

    def prune_head(self, rows):
        self.pruned_rows = rows
        self.pruned_head = None if rows is None else _Linear(self.lm_head.w.index_select(0, rows.to(self.device)))

    def _rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def _rope(x, cos, sin):  # x [h, n, d]; cos/sin [n, d]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, ids, last_only=False, pruned=False):
        n = len(ids)
        self._check_room(n)
        start, end = self.length, self.length + n
        idx = torch.as_tensor(ids, device=self.device, dtype=torch.long)
        x = self.embed.index_select(0, idx)  # [n, hidden]
        cos, sin = self.cos[start:end], self.sin[start:end]
        mask = None
        if n > 1:  # causal within the new block, everything before it visible
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril_(diagonal=start)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        for li, (w_in, qkv_proj, o_proj, w_post, gate_up, down) in enumerate(self.layers):
            h = self._rms(x, w_in)
            qkv = qkv_proj(h)  # [n, (H + 2 KV) D]
            q = qkv[:, : H * D].view(n, H, D).transpose(0, 1)  # [H, n, D]
            k = qkv[:, H * D: (H + KV) * D].view(n, KV, D).transpose(0, 1)  # [KV, n, D]
            v = qkv[:, (H + KV) * D:].view(n, KV, D).transpose(0, 1)
            q = self._rope(q, cos, sin)
            self.k_cache[li, :, start:end] = self._rope(k, cos, sin)
            self.v_cache[li, :, start:end] = v
            keys, vals = self.k_cache[li, :, :end], self.v_cache[li, :, :end]  # [KV, end, D]
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=H != KV)  # [H, n, D]
            x = x + o_proj(o.transpose(0, 1).reshape(n, H * D))
            h = self._rms(x, w_post)
            g, u = gate_up(h).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
        self.length = end
        if last_only:
            x = x[-1:]
        x = self._rms(x, self.norm)
        head = self.pruned_head if pruned else self.lm_head
        return head(x)  # [n or 1, V or |pruned|]

    def truncate(self, length):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length  # stale entries beyond `length` are overwritten before they are read

    def new_cache(self):
        return (torch.zeros_like(self.k_cache), torch.zeros_like(self.v_cache), 0)

    def swap_cache(self, cache):
        old = (self.k_cache, self.v_cache, self.length)
        self.k_cache, self.v_cache, self.length = cache
        return old

    @torch.inference_mode()
    def forward_tree(self, ids, parents):
        """One pass over a token tree (see Runner.forward_tree): node i sits at position
        length + depth(i) and attends to the cache and to its own ancestors; its keys and values are
        written past the cache's end and forgotten afterwards."""
        n = len(ids)
        self._check_room(n)
        start, end = self.length, self.length + n
        depth = []
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError("forward_tree: every parent must come before its child")
            depth.append(depth[p] + 1 if p >= 0 else 0)
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        pos = torch.tensor(depth, device=self.device, dtype=torch.long) + start
        if int(pos.max()) >= self.max_length:
            raise ValueError(f"context full: a tree reaches position {int(pos.max())} of {self.max_length}")
        mask = torch.ones(n, end, dtype=torch.bool, device=self.device)
        mask[:, start:] = anc.to(self.device)
        idx = torch.as_tensor(list(ids), device=self.device, dtype=torch.long)
        x = self.embed.index_select(0, idx)  # [n, hidden]
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        for li, (w_in, qkv_proj, o_proj, w_post, gate_up, down) in enumerate(self.layers):
            h = self._rms(x, w_in)
            qkv = qkv_proj(h)
            q = qkv[:, : H * D].view(n, H, D).transpose(0, 1)
            k = qkv[:, H * D: (H + KV) * D].view(n, KV, D).transpose(0, 1)
            v = qkv[:, (H + KV) * D:].view(n, KV, D).transpose(0, 1)
            q = self._rope(q, cos, sin)
            self.k_cache[li, :, start:end] = self._rope(k, cos, sin)
            self.v_cache[li, :, start:end] = v
            keys, vals = self.k_cache[li, :, :end], self.v_cache[li, :, :end]
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=H != KV)
            x = x + o_proj(o.transpose(0, 1).reshape(n, H * D))
            h = self._rms(x, w_post)
            g, u = gate_up(h).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
        x = self._rms(x, self.norm)  # (length unchanged: the tree's entries are stale from now on)
        return self.lm_head(x)


class HFRunner(Runner):
    """Any causal LM through its own forward with a `DynamicCache` that is cropped on rollback."""

    def __init__(self, model, max_length: Optional[int] = None):
        from transformers import DynamicCache

        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_length = context_limit(model.config, max_length)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache_cls = DynamicCache
        self.cache = DynamicCache(config=model.config)
        self.length = 0
        self.pruned_rows = None

    def prune_head(self, rows):
        self.pruned_rows = None if rows is None else rows.to(self.device)

    @torch.inference_mode()
    def forward(self, ids, last_only=False, pruned=False):
        n = len(ids)
        self._check_room(n)
        inp = torch.as_tensor([list(ids)], device=self.device, dtype=torch.long)
        out = self.model(input_ids=inp, cache=self.cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        self.length += n
        logits = out.logits[0]
        if last_only:
            logits = logits[-1:]
        if pruned and self.pruned_rows is not None:
            logits = logits.index_select(-1, self.pruned_rows)
        return logits

    def truncate(self, length):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length == 0:
            self.cache = self._cache_cls(config=self.model.config)
        elif length < self.length:
            self.cache.crop(length - self.length)
        self.length = length

    def new_cache(self):
        return (self._cache_cls(config=self.model.config), 0)

    def swap_cache(self, cache):
        old = (self.cache, self.length)
        self.cache, self.length = cache
        return old


class KVPool:
    """Per-session KV caches of one runner: at most `slots` of them, least recently used evicted.

    The runner computes with one installed cache at a time; the others are parked. `activate(key)`
    installs the cache of `key`: True if it was kept (installed or parked), False if `key` had none
    (never had one, or it was evicted): then the installed cache is empty and the caller rebuilds it
    from the session's committed ids. With `slots` = 1 every switch between sessions is a rebuild.
    Memory: each slot is one runner cache (for a Llama runner, layers x 2 x kv heads x max length x
    head dim values). Not thread-safe: callers hold their own lock.

    Never: knows what the sessions are or how to rebuild them."""

    def __init__(self, runner: Runner, slots: int = 1):
        if slots < 1:
            raise ValueError(f"a KV pool needs at least one slot, got {slots}")
        self.runner, self.slots = runner, slots
        self.owner = None  # the key whose cache is installed
        self.parked: "OrderedDict" = OrderedDict()  # key -> cache, least recently used first
        self.free: list = []  # caches of no session
        self.count = 1  # caches allocated: the runner's own to begin with
        self.hits = self.misses = self.evictions = 0

    def activate(self, key) -> bool:
        if self.owner == key:
            self.hits += 1
            return True
        cache = self.parked.pop(key, None)
        if cache is not None:
            self._install(key, cache)
            self.hits += 1
            return True
        self.misses += 1
        if self.free:
            cache = self.free.pop()
        elif self.count < self.slots:
            cache = self.runner.new_cache()
            self.count += 1
        elif self.parked:
            _, cache = self.parked.popitem(last=False)
            self.evictions += 1
        if cache is None:  # one slot: the installed cache changes hands
            if self.owner is not None:
                self.evictions += 1
        else:
            self._install(key, cache)
        self.owner = key
        self.runner.reset()
        return False

    def _install(self, key, cache) -> None:
        previous = self.runner.swap_cache(cache)
        if self.owner is not None:
            self.parked[self.owner] = previous
        else:
            self.free.append(previous)
        self.owner = key

    def release(self, key) -> None:
        """The session ended: its cache holds nobody's state any more."""
        if self.owner == key:
            self.owner = None
        elif key in self.parked:
            self.free.append(self.parked.pop(key))

    def __contains__(self, key) -> bool:
        return key == self.owner or key in self.parked

