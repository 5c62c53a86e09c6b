"""Greedy losslessness: with any drafter, any tokenizer pair and any draft length, the generated ids
are exactly the target alone's (algorithm none).

Models are tiny Llama decoders (float64, so there are no near-ties to excuse a difference) briefly
trained on the synthetic corpus, so drafters agree with the target often enough to exercise the
accept path. Tokenizer pairs are adversarial: different space handling (SentencePiece's prepended
"▁" vs byte-level "Ġ"), byte fallback vs byte-level bytes, different specials (BOS in prompts, <s>
</s> vs <|endoftext|>), and a drafter vocabulary that cannot spell some characters."""
from __future__ import annotations

import pytest
import torch

from crossdraft.engine import Engine
from crossdraft.runner import HFRunner, make_runner
from crossdraft.sampling import SamplingParams
from helpers import TableRunner, hashed_logits, vocab

MAX_NEW = 24
KS = [1, 3, 7, None]  # None: adaptive

PROMPTS = [
    "class Parser:\n    def get_value(self",
    "x = 1",
    "    # é🙂 ~@ weird\n\tfor",
    "def very_long_identifier_name_here_and_more_and_more(self, other_long_identifier):\n        return",
    "import os\n\n\nclass Cache:\n    def __init__(self):\n        self.",
    "🐍🐍🐍",
    "   \n\n  \t  x",
    "s = '中文字符' + \"日本\"\n",
    "        if node is None:\n            return",
    "print(\"héllo wörld\")  # ü",
    "a",
    "self.data = data\n        self.",
    "for item in items:\n        item.update(",
    "x=1;y=2;z=x+y\r\n",
    "class Tree:\n    def find_node(self, key, left, right):\n        # the first last empty list",
    "))))]]]]",
    "\n",
    "value = self.cache[key] if key in self.cache else None\n        return value.strip().split",
    "    def close(self):\n        self.buffer.close()\n\n    def read(self",
    "total_count_of_items_in_the_queue_buffer_offset_size = len(queue) - 1",
    "# → ✓ Ω ñ ß\n",
    "return self.parse_token(token, 3)",
    "<s> x </s> y <|endoftext|> z",
]

# (target tokenizer, target model, drafter tokenizer, drafter model, algorithms besides auto)
PAIRS = {
    "bpe/bpe": ("bpe", "bpe", "bpe", "bpe_small", ["same", "tli", "slem"]),
    "bpe/spm": ("bpe", "bpe", "spm_bos", "spm", ["tli", "slem"]),  # drafter puts <s> first
    "bpe/bpe_alt": ("bpe", "bpe", "bpe_alt", "bpe_alt", ["tli", "slem"]),
    "bpe/ascii": ("bpe", "bpe", "ascii", "ascii", ["tli", "slem"]),
    "spm/bpe": ("spm_bos", "spm", "bpe", "bpe", ["tli", "slem"]),  # SentencePiece target with BOS
    "ascii/spm": ("ascii", "ascii", "spm", "spm", ["tli", "slem"]),  # a target that cannot spell all
}


def make_engine(models, pair, fast=True, drafter_max=256):
    t_tok, t_model, d_tok, d_model, _ = PAIRS[pair]
    dr = make_runner(models[d_model], drafter_max, fast=fast)
    return Engine(make_runner(models[t_model], 256, fast=fast), vocab(t_tok), dr, vocab(d_tok))


_reference: dict = {}


def reference(models, pair, prompt):
    """The target alone, greedy."""
    key = (PAIRS[pair][0], PAIRS[pair][1], prompt)
    if key not in _reference:
        t_tok, t_model = PAIRS[pair][:2]
        r = Engine(make_runner(models[t_model], 256), vocab(t_tok)).generate(prompt, MAX_NEW, SamplingParams(),
                                                                               "none")
        assert r.algorithm == "none" and r.draft_tokens == 0 and r.rounds == r.new_tokens
        _reference[key] = r
    return _reference[key]


def test_reference_is_the_models_own_greedy_decoding(trained_models):
    """Algorithm none is plain greedy decoding with the Hugging Face model (full recomputation)."""
    model = trained_models["bpe"]
    v = vocab("bpe")
    for prompt in PROMPTS[:4]:
        ids = v.encode_prompt(prompt)
        out = []
        for _ in range(MAX_NEW):
            with torch.no_grad():
                t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
            if t in v.eos_ids:
                break
        assert reference(trained_models, "bpe/bpe", prompt).ids == out


CASES = [(pair, algo) for pair, spec in PAIRS.items() for algo in spec[4]]


@pytest.mark.parametrize("pair,algorithm", CASES, ids=[f"{p}-{a}" for p, a in CASES])
def test_greedy_output_identical_to_target_alone(trained_models, pair, algorithm):
    engine = make_engine(trained_models, pair)
    accepted = drafted = 0
    for prompt in PROMPTS:
        ref = reference(trained_models, pair, prompt)
        for k in KS:
            r = engine.generate(prompt, MAX_NEW, SamplingParams(), algorithm, draft_tokens=k)
            assert r.ids == ref.ids, (pair, algorithm, k, prompt, r.text, ref.text)
            assert r.text == ref.text and r.finish_reason == ref.finish_reason
            assert r.algorithm == algorithm
            assert r.new_tokens == len(r.ids)
            assert 0 <= r.accepted_tokens <= r.draft_tokens
            # each round commits its accepted candidates and the target's token, except a round whose
            # accepted candidates end with EOS
            eos_accepted = r.finish_reason == "eos" and r.rounds == r.new_tokens - r.accepted_tokens + 1
            assert r.rounds == r.new_tokens - r.accepted_tokens or eos_accepted
            if k is not None and algorithm != "slem":  # (slem: k drafter tokens may be more target tokens)
                assert r.draft_tokens <= k * r.rounds
            accepted += r.accepted_tokens
            drafted += r.draft_tokens
    print(f"{pair} {algorithm}: {accepted}/{drafted} candidates accepted")
    assert drafted > 0
    if pair != "spm/bpe" or algorithm != "tli":  # (see the byte-fallback note in test_bridge)
        assert accepted > 0.1 * drafted, (accepted, drafted)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_auto_greedy(trained_models, pair):
    engine = make_engine(trained_models, pair)
    # auto measures which (test_auto.py), the target's own step among them
    allowed = (["same"] if pair == "bpe/bpe" else ["tli", "slem"]) + ["none"]
    for prompt in PROMPTS:
        for k in (None, 3):
            r = engine.generate(prompt, MAX_NEW, SamplingParams(), "auto", draft_tokens=k)
            assert r.algorithm in allowed and r.why and set(r.auto["rounds_by_algorithm"]) <= set(allowed)
            assert r.ids == reference(trained_models, pair, prompt).ids, (pair, prompt, k)


@pytest.mark.parametrize("pair", ["bpe/spm", "spm/bpe"])
def test_hf_runner_path(trained_models, pair):
    """The same with the Hugging Face forward (HFRunner) for both models."""
    engine = make_engine(trained_models, pair, fast=False)
    assert isinstance(engine.drafter_runner, HFRunner)
    for algorithm in PAIRS[pair][4]:
        for prompt in PROMPTS[::3]:
            r = engine.generate(prompt, MAX_NEW, SamplingParams(), algorithm)
            assert r.ids == reference(trained_models, pair, prompt).ids, (pair, algorithm, prompt)


def test_drafter_context_smaller_than_the_targets(trained_models):
    """A drafter whose context fills up mid-generation stops drafting; the target carries on."""
    for pair, algorithm in (("bpe/bpe", "same"), ("bpe/spm", "slem"), ("bpe/spm", "tli")):
        engine = make_engine(trained_models, pair, drafter_max=40)
        for prompt in PROMPTS[:8]:
            r = engine.generate(prompt, MAX_NEW, SamplingParams(), algorithm, draft_tokens=5)
            assert r.ids == reference(trained_models, pair, prompt).ids, (pair, algorithm, prompt)


def test_identical_drafter_accepts_everything(trained_models):
    """The target as its own drafter: with `same` every candidate is accepted; tli and slem accept
    most (their drafter context is the canonical re-tokenization of the text, which differs from the
    target's own ids where the target generated a non-canonical split)."""
    model = trained_models["bpe"]
    v = vocab("bpe")
    for algorithm in ("same", "tli", "slem"):
        engine = Engine(make_runner(model, 256), v, make_runner(model, 256), v)
        for prompt in PROMPTS[:10]:
            ref = reference(trained_models, "bpe/bpe", prompt)
            r = engine.generate(prompt, MAX_NEW, SamplingParams(), algorithm, draft_tokens=4)
            assert r.ids == ref.ids
            if algorithm == "same":
                assert r.accepted_tokens == r.draft_tokens > 0
            else:
                assert r.accepted_tokens >= 0.5 * r.draft_tokens


def test_adversarial_drafter_table_runner():
    """A drafter that always drafts the worst token (the target's argmin) and one that drafts EOS:
    every candidate is rejected and the output is still the target's."""
    v = vocab("bpe")
    target = TableRunner(lambda c: hashed_logits(c, len(v), salt=1), len(v), 256)
    ref = Engine(target, v).generate("x = 1", 20, SamplingParams(), "none")

    def worst(ctx):
        return -target.logits_at(tuple(ctx)) if len(ctx) else torch.zeros(len(v), dtype=torch.float64)

    def eos(ctx):
        x = torch.zeros(len(v), dtype=torch.float64)
        x[0] = 5.0
        return x

    for fn in (worst, eos):
        for algorithm in ("same", "tli", "slem"):
            drafter = TableRunner(fn, len(v), 256)
            r = Engine(target, v, drafter, v).generate("x = 1", 20, SamplingParams(), algorithm, draft_tokens=3)
            assert r.ids == ref.ids, (fn.__name__, algorithm)
            assert r.accepted_tokens == 0


@pytest.mark.parametrize("fast", [True, False])
def test_switching_algorithms_on_one_engine(trained_models, fast):
    """One engine, one drafter runner shared by the per-mode drafters: tli's pruned head must be in
    place for every tli generation, whatever ran before (regression: after slem had cleared it,
    LlamaRunner called F.linear(x, None) and HFRunner drafted over the full vocabulary)."""
    engine = make_engine(trained_models, "bpe/spm", fast=fast)
    prompt = PROMPTS[0]
    ref = reference(trained_models, "bpe/spm", prompt).ids
    for algorithm in ("tli", "slem", "tli", "auto", "tli", "none", "tli"):
        r = engine.generate(prompt, MAX_NEW, SamplingParams(), algorithm)
        assert r.ids == ref, algorithm
        if r.algorithm == "tli":
            assert r.accepted_tokens > 0
    for algorithm in ("slem", "tli", "slem", "tli"):  # sampling: q is over the intersection's rows
        r = engine.generate(prompt, MAX_NEW, SamplingParams(temperature=1.0, seed=3), algorithm)
        assert r.new_tokens == MAX_NEW or r.finish_reason == "eos"
