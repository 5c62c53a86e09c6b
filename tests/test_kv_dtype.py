"""`--kv-dtype bfloat16`: KV caches in bfloat16 under float32 weights.

What must hold: the caches take half the bytes a position (what KV budgets count); a sequence's logits
are still the same bits whichever sequences share its pass (tests/test_kernels.py runs that case with
both caches), and a verification's rows the same bits as its tokens decoded one by one (so speculation stays lossless against the target served the same way);
the kernel and torch's attention agree over bfloat16 caches; the numbers do change (the option is not a
no-op) but stay close to the float32 caches'; the Hugging Face runner refuses it with a message; and
the services load it (GetInfo, the start-up log) and give the engine's output."""
from __future__ import annotations

import grpc
import pytest
import torch
from helpers import tiny_llama
from test_gateway import Procs
from test_services import save_model

from crossdraft import kernels
from crossdraft.engine import Engine
from crossdraft.errors import InvalidArgument
from crossdraft.runner import LlamaRunner, Step, make_runner
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import verifier_pb2, verifier_pb2_grpc
from drafter_service.client import run_session

BF16 = torch.bfloat16


def _tokens(n: int, seed: int) -> list:
    return [int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(300, seed=11, hidden=96, kv_heads=2).float()


def test_bfloat16_caches_take_half_the_bytes(model):
    full, half = LlamaRunner(model, 128), LlamaRunner(model, 128, kv_dtype=BF16)
    assert half.bytes_per_token * 2 == full.bytes_per_token
    cache = half.new_cache()
    half.forward_batch([Step(cache, _tokens(10, 1))])
    assert cache.data[0].dtype == BF16 and cache.data[1].dtype == BF16


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "torch"])
def test_a_verification_s_rows_are_its_tokens_decoded_one_by_one(model, kernel, monkeypatch):
    """With bfloat16 caches, a block of 5 tokens gives the same bits as those tokens one at a time through
    the kernel; through torch's attention (CROSSDRAFT_DECODE_KERNEL=0), whose matrix products round a
    block differently from one row, the same within float32 rounding: the block reads its own keys and
    values back from the cache, rounded as the later steps see them (a block that used its own unrounded
    ones fails this: 954 of 1500 logits off, by up to 1.7e-4). The batch side: tests/test_kernels.py,
    `..._do_not_depend_on_its_batch[bf16-caches]`."""
    monkeypatch.setenv("CROSSDRAFT_DECODE_KERNEL", kernel)
    runner = LlamaRunner(model, 128, kv_dtype=BF16)
    assert runner.decode_kernel == (kernel == "1" and kernels.available())
    a = _tokens(25, 2)
    block, steps = runner.new_cache(), runner.new_cache()
    for c in (block, steps):
        runner.forward_batch([Step(c, a[:20])])
    as_block = runner.forward_batch([Step(block, a[20:25])])[0]
    one_by_one = torch.cat([runner.forward_batch([Step(steps, [t])])[0] for t in a[20:25]])
    if runner.decode_kernel:
        assert torch.equal(as_block, one_by_one)
    else:
        torch.testing.assert_close(as_block, one_by_one, rtol=1e-5, atol=1e-5)


def test_the_kernel_and_torch_agree_and_the_numbers_move_only_a_little(model, monkeypatch):
    """Decoding steps over bfloat16 caches: the kernel's attention within float32 rounding of torch's
    (CROSSDRAFT_DECODE_KERNEL=0); both differ from float32 caches (the keys and values were rounded), by
    about what bfloat16's 8 bits of mantissa allow."""
    if not kernels.available():
        pytest.skip(f"the CPU kernel is not in use here: {kernels.why_not()}")
    kernel = LlamaRunner(model, 128, kv_dtype=BF16)
    full = LlamaRunner(model, 128)
    monkeypatch.setenv("CROSSDRAFT_DECODE_KERNEL", "0")
    plain = LlamaRunner(model, 128, kv_dtype=BF16)
    assert kernel.decode_kernel and not plain.decode_kernel
    seqs = [_tokens(12 + 5 * i, 10 + i) for i in range(3)]
    out = {}
    for name, r in (("kernel", kernel), ("torch", plain), ("float32", full)):
        caches = [r.new_cache() for _ in seqs]
        r.forward_batch([Step(c, s[:-1]) for c, s in zip(caches, seqs)])
        out[name] = r.forward_batch([Step(c, s[-1:]) for c, s in zip(caches, seqs)])
    for k, t, f in zip(out["kernel"], out["torch"], out["float32"]):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-5)
        assert not torch.equal(k, f)
        torch.testing.assert_close(k, f, rtol=0.0, atol=0.05)


def test_the_hugging_face_runner_refuses_it_with_a_message(model):
    with pytest.raises(InvalidArgument, match="--kv-dtype bfloat16 needs the lean Llama runner"):
        make_runner(model, 128, fast=False, kv_dtype=BF16)
    assert make_runner(model, 128, fast=False, kv_dtype=torch.float32).kv_dtype == torch.float32


PROMPTS = ["class Parser:\n    def get_value(self", "def main():\n    for i in range(", "import os\n\nclass "]
N = 24


@pytest.fixture(scope="module")
def dirs(trained_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-dtype")
    return {"root": root, "target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "same": save_model(trained_models["bpe_small"], "bpe", root / "drafter-same"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm")}


@pytest.fixture(scope="module")
def engines(dirs):
    """{drafter: an engine with bfloat16 caches}, float32 weights."""
    return {d: Engine.load(str(dirs["target"]), str(dirs[d]), device="cpu", kv_dtype=BF16) for d in ("same", "spm")}


@pytest.mark.parametrize("drafter,algorithm", [("same", "same"), ("spm", "slem"), ("spm", "tli")])
def test_speculation_equals_the_target_alone_with_bfloat16_caches(engines, drafter, algorithm):
    """Greedy: each speculative output equals the target alone served with bfloat16 caches, one stream
    and four sessions batched together (the target's steps and the verifications share passes)."""
    eng = engines[drafter]
    assert eng.target_runner.kv_dtype == BF16 and eng.drafter_runner.kv_dtype == BF16
    alone = [eng.generate(p, N, SamplingParams(), "none") for p in PROMPTS]
    for p, ref in zip(PROMPTS, alone):
        assert eng.generate(p, N, SamplingParams(), algorithm).ids == ref.ids
    batched = eng.generate_batch(PROMPTS + PROMPTS[:1], N, SamplingParams(), algorithm, concurrency=4)
    assert [r.ids for r in batched] == [r.ids for r in alone + alone[:1]]


def test_services_load_it_and_give_the_engine_s_output(dirs, engines):
    """`serve verifier|drafter --kv-dtype bfloat16`: GetInfo's cache says so (its budget counting half
    the bytes a position), the start-up log too, and a session's output, greedy and sampled, equals the
    in-process engine's with bfloat16 caches."""
    procs = Procs(dirs["root"])
    kv = ["--kv-dtype", "bfloat16"]
    try:
        addr = {"verifier": procs.start("verifier", "verifier", dirs["target"], kv),
                "drafter": procs.start("drafter", "drafter", dirs["spm"], kv)}
        procs.wait_serving(addr)
        with grpc.insecure_channel(addr["verifier"]) as ch:
            info = verifier_pb2_grpc.VerifierServiceStub(ch).GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(),
                                                                     timeout=5)
        assert (info.dtype, info.cache.dtype) == ("float32", "bfloat16")
        log = (procs.log_dir / "verifier.log").read_text(errors="replace")
        assert "float32 on cpu, KV caches bfloat16" in log, log
        eng = engines["spm"]
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5)):
            ref = eng.generate(PROMPTS[0], N, params, "slem")
            ids, text, _ = run_session(addr["drafter"], addr["verifier"], PROMPTS[0], N, params, "slem", timeout=60)
            assert (ids, text) == (ref.ids, ref.text)
    finally:
        procs.stop_all()


def test_cli_generate_compare_with_bfloat16_caches(dirs, engines, capsys):
    """`crossdraft generate --kv-dtype bfloat16 --compare`: the engine's output, identical to the target
    alone loaded the same way; with --hf-runner, exit code 2 and the message."""
    import json

    from crossdraft.cli import main

    args = ["generate", PROMPTS[1], "--target", str(dirs["target"]), "--drafter", str(dirs["spm"]), "--algorithm",
            "slem", "--max-new-tokens", str(N), "--kv-dtype", "bfloat16", "--threads", "1", "--json"]
    assert main(args + ["--compare"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical_to_target_alone"] is True
    assert out["text"] == engines["spm"].generate(PROMPTS[1], N, SamplingParams(), "slem").text
    assert main(args + ["--hf-runner"]) == 2
    assert "--kv-dtype bfloat16 needs the lean Llama runner" in capsys.readouterr().err
