"""crossdraft.runner: LlamaRunner's lean forward and HFRunner must compute exactly the Hugging Face
model's logits (float64: to 1e-9) whatever the block structure of the calls: prefill, block
extensions, single tokens, truncation and re-extension; and greedy decoding must be identical."""
from __future__ import annotations

import copy

import pytest
import torch

from crossdraft.runner import HFRunner, LlamaRunner, Step, make_runner
from helpers import tiny_llama

V = 300
MODELS = {
    "llama-gqa": dict(model_type="llama", kv_heads=2),
    "llama-mha-bias-tied": dict(model_type="llama", kv_heads=4, bias=True, tie=True),
    "qwen2-gqa-bias": dict(model_type="qwen2", kv_heads=2),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return tiny_llama(V, seed=7, **MODELS[request.param])


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n,), generator=g).tolist()


RUNNERS = {"llama": LlamaRunner, "hf": HFRunner}


def test_make_runner_picks_the_lean_runner_for_llama_family(model):
    assert isinstance(make_runner(model, 64), LlamaRunner)
    assert isinstance(make_runner(model, 64, fast=False), HFRunner)
    attn = model.model.layers[0].self_attn
    if model.config.model_type == "qwen2":
        assert attn.q_proj.bias is not None  # the qkv-bias path is exercised
    if getattr(model.config, "attention_bias", False):
        assert attn.o_proj.bias is not None  # and the output-bias path


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_logits_equal_hf_for_blocks_truncate_and_reextend(model, kind):
    runner = RUNNERS[kind](model, 128)
    assert runner.vocab_size == V and runner.max_length == 128 and runner.length == 0
    ids = _ids(100, seed=1)
    ref = full_logits(model, ids)  # [100, V]
    assert ref.dtype == torch.float64

    def check(got, lo, hi):
        assert got.shape == (hi - lo, V)
        torch.testing.assert_close(got, ref[lo:hi], rtol=0, atol=1e-9)

    check(runner.forward(ids[:17]), 0, 17)  # prefill
    assert runner.length == 17
    check(runner.forward(ids[17:18]), 17, 18)  # one token
    check(runner.forward(ids[18:25]), 18, 25)  # a block (a verification pass)
    last = runner.forward(ids[25:31], last_only=True)  # last position only
    check(last, 30, 31)
    assert runner.length == 31
    runner.truncate(22)  # reject a suffix
    assert runner.length == 22
    check(runner.forward(ids[22:40]), 22, 40)  # and re-extend over the stale cache entries
    runner.truncate(40)  # a no-op truncate
    check(runner.forward(ids[40:41]), 40, 41)

    # a different continuation after truncation: logits of the new sequence, not the old one
    runner.truncate(30)
    other = ids[:30] + _ids(20, seed=2)
    ref2 = full_logits(model, other)
    torch.testing.assert_close(runner.forward(other[30:50]), ref2[30:50], rtol=0, atol=1e-9)
    # many small rollbacks, like rounds of speculative decoding
    pos = 50
    for step in range(12):
        block = _ids(5, seed=10 + step)
        out = runner.forward(block)
        seq = other[:pos] + block
        torch.testing.assert_close(out, full_logits(model, seq)[pos:pos + 5], rtol=0, atol=1e-9)
        keep = pos + step % 4
        runner.truncate(keep)
        other = seq[:keep]
        pos = keep
    runner.reset()
    assert runner.length == 0
    check(runner.forward(ids[:5]), 0, 5)


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_pruned_head(model, kind):
    runner = RUNNERS[kind](model, 64)
    ids = _ids(12, seed=3)
    ref = full_logits(model, ids)
    rows = torch.tensor([5, 0, 299, 17, 17, 3])
    runner.prune_head(rows)
    torch.testing.assert_close(runner.pruned_rows, rows)
    out = runner.forward(ids[:8], pruned=True)
    torch.testing.assert_close(out, ref[:8, rows], rtol=0, atol=1e-9)
    out = runner.forward(ids[8:], last_only=True, pruned=True)
    torch.testing.assert_close(out, ref[11:12, rows], rtol=0, atol=1e-9)
    runner.truncate(4)
    torch.testing.assert_close(runner.forward(ids[4:6]), ref[4:6], rtol=0, atol=1e-9)  # unpruned still full
    runner.prune_head(None)
    assert runner.pruned_rows is None
    torch.testing.assert_close(runner.forward(ids[6:8]), ref[6:8], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_context_limits(model, kind):
    runner = RUNNERS[kind](model, 16)
    runner.forward(_ids(10))
    with pytest.raises(ValueError):
        runner.forward(_ids(7))
    assert runner.length == 10
    runner.forward(_ids(6))
    assert runner.length == 16
    with pytest.raises(ValueError):
        runner.truncate(17)
    with pytest.raises(ValueError):
        runner.truncate(-1)


def greedy_with_runner(runner, prompt, n):
    runner.reset()
    logits = runner.forward(prompt, last_only=True)
    out = []
    for _ in range(n):
        t = int(logits[0].argmax())
        out.append(t)
        logits = runner.forward([t], last_only=True)
    return out


def test_greedy_decoding_identical_to_hf_generate(model):
    prompt = _ids(9, seed=4)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for kind, cls in RUNNERS.items():
        assert greedy_with_runner(cls(model, 128), prompt, 40) == hf, kind


def test_float32_model_close_to_hf():
    """In float32 the lean forward is the same computation up to rounding."""
    model = tiny_llama(V, seed=8).float()
    ids = _ids(60, seed=5)
    ref = full_logits(model, ids)
    runner = LlamaRunner(model, 64)
    got = torch.cat([runner.forward(ids[:20]), runner.forward(ids[20:21]), runner.forward(ids[21:60])])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_configs_fall_back_to_hf_runner():
    model = tiny_llama(V, seed=9)
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not LlamaRunner.supports(model)  # its frequencies change with the length: Hugging Face's own forward
    assert isinstance(make_runner(model, 32), HFRunner)
    model = tiny_llama(V, seed=9)
    model.config.hidden_act = "gelu"
    assert isinstance(make_runner(model, 32), HFRunner)


@pytest.mark.parametrize("fast", [True, False])
def test_forward_tree_matches_sequential_forwards(fast):
    """forward_tree (slrs evaluates the drafter's tree of continuations in one pass) gives each node
    the logits of running its chain after the cache, and leaves the cache as it was."""
    from crossdraft.runner import make_runner
    from helpers import tiny_llama

    model = tiny_llama(97, seed=4)
    r = make_runner(model, 64, fast=fast)
    prefix = [5, 17, 3, 88]
    ids = [10, 11, 12, 13, 14, 15, 16]
    parents = [-1, 0, 0, -1, 3, 1, 5]  # two roots, branching, depth up to 3
    r.reset()
    r.forward(prefix)
    got = r.forward_tree(ids, parents)
    assert r.length == len(prefix) and got.shape == (len(ids), 97)
    for i in range(len(ids)):
        chain, j = [], i
        while j >= 0:
            chain.append(ids[j])
            j = parents[j]
        r.truncate(len(prefix))
        want = r.forward(chain[::-1], last_only=True)[0]
        assert torch.allclose(got[i], want, atol=1e-9), i
    r.truncate(len(prefix))
    after = r.forward([20], last_only=True)[0]  # the cache still holds exactly the prefix
    r.reset()
    assert torch.allclose(after, r.forward(prefix + [20], last_only=True)[0], atol=1e-9)


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_batched_forward_equals_one_sequence_at_a_time(model, kind):
    """One `forward_batch` over several sequences' caches, each at its own length with its own kind of
    block (a prefill, a verification block, one token, last position only, a pruned head, a token
    tree), gives every step the logits of that sequence alone (float64: to 1e-9), and leaves each cache
    as its own forward would (a tree leaves its length unchanged)."""
    runner = RUNNERS[kind](model, 128)
    seqs = [_ids(40, seed=30 + i) for i in range(5)]
    caches = [runner.new_cache() for _ in seqs]
    pre = [0, 9, 20, 31, 12]  # positions already in each cache
    if any(pre):
        runner.forward_batch([Step(c, s[:n]) for c, s, n in zip(caches, seqs, pre) if n])
    rows = torch.tensor([3, 0, 299, 17])
    tree_ids, parents = [7, 8, 9, 10], [-1, 0, 0, 2]
    steps = [Step(caches[0], seqs[0][:17]),  # a prefill from nothing
             Step(caches[1], seqs[1][9:14]),  # a verification block
             Step(caches[2], seqs[2][20:21]),  # one token
             Step(caches[3], seqs[3][31:38], last=True, rows=rows),  # last position, pruned head
             Step(caches[4], tree_ids, parents=parents)]  # a tree after 12 positions
    got = runner.forward_batch(steps)
    assert [c.length for c in caches] == [17, 14, 21, 38, 12]
    ref = [full_logits(model, seqs[0][:17]), full_logits(model, seqs[1][:14])[9:],
           full_logits(model, seqs[2][:21])[20:], full_logits(model, seqs[3][:38])[-1:, rows]]
    for g, r in zip(got[:4], ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9)
    for i in range(len(tree_ids)):  # each node: its chain after the 12 cached positions
        chain, j = [], i
        while j >= 0:
            chain.append(tree_ids[j])
            j = parents[j]
        want = full_logits(model, seqs[4][:12] + chain[::-1])[-1]
        torch.testing.assert_close(got[4][i], want, rtol=0, atol=1e-9)
    # and each cache goes on as its sequence alone would
    nxt = runner.forward_batch([Step(c, s[c.length:c.length + 2]) for c, s in zip(caches, seqs)])
    for c, s, g in zip(caches, seqs, nxt):
        torch.testing.assert_close(g, full_logits(model, s[:c.length])[-2:], rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_compiled_layer_stack_equals_the_plain_function_bitwise(model, dtype, monkeypatch):
    """crossdraft/fused.py compiles the layers of LlamaRunner's pass with TorchScript (to run them without
    the GIL); compiled, they must compute exactly what the same source computes op by op in Python: the
    same logits to the last bit and the same cache entries, for every kind of step in one batch (the
    tests above hold the plain function to Hugging Face's model). float32 takes crossdraft's CPU kernel
    (crossdraft/kernels; torch's kernels where it is not built), float64 x @ W^T."""
    from crossdraft import fused

    m = copy.deepcopy(model).to(dtype)
    fused_runner = LlamaRunner(m, 128)
    assert fused_runner._stack is not fused._layers, "TorchScript should be available with the pinned torch"
    monkeypatch.setenv("CROSSDRAFT_FUSED", "0")
    eager_runner = LlamaRunner(m, 128)
    assert eager_runner._stack is fused._layers
    seqs = [_ids(40, seed=50 + i) for i in range(4)]
    rows = torch.tensor([3, 0, 299, 17])
    out = {}
    for name, runner in (("fused", fused_runner), ("eager", eager_runner)):
        caches = [runner.new_cache() for _ in seqs]
        first = runner.forward_batch([Step(c, s[:10 + 3 * i]) for i, (c, s) in enumerate(zip(caches, seqs))])
        second = runner.forward_batch([Step(caches[0], seqs[0][10:11]),  # one token
                                       Step(caches[1], seqs[1][13:18]),  # a verification block
                                       Step(caches[2], seqs[2][16:24], last=True, rows=rows),  # pruned, last
                                       Step(caches[3], [7, 8, 9, 10], parents=[-1, 0, 0, 2])])  # a tree
        alone = [runner.forward(seqs[0][:3])]  # one sequence
        for i in range(4):  # a graph executor may change a function after its first calls: it must not
            alone.append(runner.forward(seqs[0][3 + i:4 + i]))
        out[name] = (first + second + alone, [c.data[0][:, :, :c.length] for c in caches])
    for got, want in zip(out["fused"][0] + out["fused"][1], out["eager"][0] + out["eager"][1]):
        assert got.dtype == dtype and torch.equal(got, want)


def test_without_torchscript_the_runner_runs_the_layers_op_by_op(model, monkeypatch, caplog):
    """A torch without a working torch.jit.script (deprecated: it may go) loses the GIL-free pass, not
    the runner: layer_stack() says so in the log and hands back the plain function, which serves."""
    from crossdraft import fused

    def no_script(fn):
        raise RuntimeError("no TorchScript in this torch")

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(torch.jit, "script", no_script)
    runner = LlamaRunner(model, 64)
    assert runner._stack is fused._layers and "op by op" in caplog.text
    ids = _ids(12, seed=4)
    torch.testing.assert_close(runner.forward(ids), full_logits(model, ids), rtol=0, atol=1e-9)


def test_a_cache_grows_in_blocks_up_to_its_limit(model):
    """A Llama cache holds nothing until used, then grows by doubling in whole blocks (its entries
    kept), never past its limit (a session's KV reservation) or the context; a step that would pass
    the limit is refused before the pass (`check`), and the cache is unchanged."""
    from crossdraft.runner import BLOCK, KVCache

    runner = LlamaRunner(model, 4 * BLOCK)
    c = runner.new_cache()
    assert runner.capacity(c) == 0
    ids = _ids(3 * BLOCK, seed=40)
    runner.forward_batch([Step(c, ids[:5])])
    assert runner.capacity(c) == BLOCK
    runner.forward_batch([Step(c, ids[5:BLOCK + 3])])
    assert runner.capacity(c) == 2 * BLOCK
    last = runner.forward_batch([Step(c, ids[BLOCK + 3:BLOCK + 4])])[0]
    torch.testing.assert_close(last, full_logits(model, ids[:BLOCK + 4])[-1:], rtol=0, atol=1e-9)
    limited = KVCache(limit=BLOCK + 10)
    runner.forward_batch([Step(limited, ids[:BLOCK + 1])])
    assert runner.capacity(limited) == BLOCK + 10  # doubling stops at the limit
    with pytest.raises(ValueError, match="context full"):
        runner.check(Step(limited, ids[:10]))
    assert limited.length == BLOCK + 1


# --- scaled RoPE (Llama 3.x and others) and sliding windows --------------------------------------

ORIGINAL_CONTEXT = 32  # `original_max_position_embeddings` of the scaled models; the tests run past it
SCALED_ROPE = {
    "llama3": dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL_CONTEXT),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT),
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("rope", list(SCALED_ROPE))
def test_scaled_rope_runs_lean_and_equals_hf_past_the_original_context(rope, model_type):
    """A static RoPE scaling (Llama 3.x's llama3, linear, yarn) is in the model's own inv_freq and
    attention_scaling: the lean runner takes it, and its logits equal Hugging Face's at every position,
    including those past original_max_position_embeddings where the scaling matters."""
    model = tiny_llama(V, seed=11, model_type=model_type, rope_parameters=dict(SCALED_ROPE[rope]))
    assert model.config.rope_parameters["rope_type"] == rope
    runner = make_runner(model, 160)
    assert isinstance(runner, LlamaRunner)
    ids = _ids(150, seed=12)
    ref = full_logits(model, ids)
    got = torch.cat([runner.forward(ids[:20]), runner.forward(ids[20:21]), runner.forward(ids[21:90])])
    runner.truncate(70)  # a rejected suffix, then past the original context again
    got = torch.cat([got[:70], runner.forward(ids[70:150])])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    plain = tiny_llama(V, seed=11, model_type=model_type)  # the same weights, unscaled RoPE: other logits
    assert not torch.allclose(full_logits(plain, ids)[ORIGINAL_CONTEXT:], ref[ORIGINAL_CONTEXT:], atol=1e-6)


WINDOW = 16
WINDOWED = {
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}


@pytest.mark.parametrize("kind", list(RUNNERS))
@pytest.mark.parametrize("name", list(WINDOWED))
def test_sliding_window_models_are_capped_below_the_window_and_exact(name, kind):
    """Sliding-window attention (mistral; qwen2 with use_sliding_window, on the layers from
    max_window_layers): both runners hold at most window - 1 positions, where the window masks nothing,
    and there their logits equal Hugging Face's through blocks, a full context and a rollback (the
    generic runner's cache could not roll back once it had held `window` positions)."""
    model = tiny_llama(V, seed=13, **WINDOWED[name])
    assert model.config.sliding_window == WINDOW
    long = _ids(2 * WINDOW, seed=14)  # the same weights without a window: equal within it, not past it
    windowed, causal = full_logits(model, long), full_logits(tiny_llama(V, seed=13, model_type=name), long)
    torch.testing.assert_close(windowed[:WINDOW], causal[:WINDOW], rtol=0, atol=1e-9)
    assert not torch.allclose(windowed[WINDOW:], causal[WINDOW:], atol=1e-6)
    runner = make_runner(model, 64, fast=kind == "llama")
    assert isinstance(runner, RUNNERS[kind]) and runner.max_length == WINDOW - 1
    ids = _ids(WINDOW - 1, seed=14)
    ref = full_logits(model, ids)
    got = torch.cat([runner.forward(ids[:6]), runner.forward(ids[6:7]), runner.forward(ids[7:])])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        runner.forward([1])  # the context is full
    runner.truncate(9)
    other = ids[:9] + _ids(WINDOW - 10, seed=15)
    torch.testing.assert_close(runner.forward(other[9:]), full_logits(model, other)[9:], rtol=0, atol=1e-9)


def test_qwen2_without_use_sliding_window_keeps_its_whole_context():
    model = tiny_llama(V, seed=13, model_type="qwen2", use_sliding_window=False, sliding_window=WINDOW)
    assert isinstance(make_runner(model, 64), LlamaRunner) and make_runner(model, 64).max_length == 64


def test_rope_by_roll_equals_rotate_half_bit_for_bit():
    """fused._rope takes rotate_half(x) * sin as roll(x) * (sin with its first half negated): the same
    products exactly, for float32 and bfloat16. The plain sine table there would be wrong (the control)."""
    from crossdraft import fused
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 16, generator=g).to(dtype)
        cos, sin = torch.randn(5, 1, 16, generator=g).to(dtype), torch.randn(5, 1, 16, generator=g).to(dtype)
        textbook = x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin
        sin_rot = fused.rope_sin_rot(sin.view(5, 16)).view(5, 1, 16)
        assert torch.equal(fused._rope(x, cos, sin_rot), textbook)
        assert not torch.allclose(fused._rope(x, cos, sin).float(), textbook.float())
