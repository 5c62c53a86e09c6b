"""Engine argument checking and typed errors, and how a generation finishes (EOS, length)."""
from __future__ import annotations

import pytest
import torch

from crossdraft.engine import Engine, auto_algorithms, resolve_algorithm
from crossdraft.errors import CrossdraftError, FailedPrecondition, InvalidArgument, ModelLoadError, Unimplemented
from crossdraft.runner import load_model
from crossdraft.sampling import SamplingParams
from crossdraft.vocab import Vocab
from helpers import TableRunner, hashed_logits, longest_match_encoder

T_TOKENS = ["a", "b", "ab", " ", None]  # id 4: EOS
D_TOKENS = ["a", "b", "ba", " ", None]
EOS = 4
CTX = 32


def toy(tokens):
    return Vocab.from_tokens(tokens, longest_match_encoder(tokens), [EOS])


def never_eos(ctx):
    x = hashed_logits(ctx, 5, salt=3)
    x[EOS] = -1e9
    return x


def engine(drafter_tokens=D_TOKENS, target_fn=never_eos, drafter=True):
    tr = TableRunner(target_fn, 5, CTX)
    if not drafter:
        return Engine(tr, toy(T_TOKENS))
    return Engine(tr, toy(T_TOKENS), TableRunner(lambda c: hashed_logits(c, 5, salt=4), 5, CTX), toy(drafter_tokens))


def test_error_types_carry_status_codes():
    assert issubclass(InvalidArgument, CrossdraftError) and InvalidArgument.code == "INVALID_ARGUMENT"
    assert FailedPrecondition.code == "FAILED_PRECONDITION" and Unimplemented.code == "UNIMPLEMENTED"
    for cls in (InvalidArgument, FailedPrecondition, Unimplemented, ModelLoadError):
        assert cls.exit_code == 2


@pytest.mark.parametrize("prompt", ["", None, 12])
def test_empty_or_non_string_prompt(prompt):
    with pytest.raises(InvalidArgument):
        engine().generate(prompt, 4)


def test_prompt_that_encodes_to_no_tokens():
    with pytest.raises(InvalidArgument):
        engine().generate("xyz", 4)  # the toy tokenizer drops characters it cannot spell


def test_unknown_algorithm():
    with pytest.raises(InvalidArgument, match="unknown algorithm"):
        engine().generate("ab", 4, algorithm="medusa")


def test_slrs_runs_in_the_engine_and_is_refused_where_not_wired():
    """The engine runs slrs (greedy and sampling); `resolve_algorithm` without slrs=True (a caller that
    cannot run it) refuses it as UNIMPLEMENTED, and `auto` never picks it. The services run it
    (tests/test_gateway.py)."""
    from crossdraft.engine import resolve_algorithm

    e = engine()
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
        r = e.generate("ab", 4, params, algorithm="slrs")
        assert r.algorithm == "slrs" and r.new_tokens == 4
    with pytest.raises(Unimplemented):
        resolve_algorithm("slrs", SamplingParams(), e.target_vocab, e.drafter_vocab)
    assert resolve_algorithm("auto", SamplingParams(temperature=1.0), e.target_vocab, e.drafter_vocab,
                             slrs=True)[0] != "slrs"
    with pytest.raises(InvalidArgument, match="needs a drafter"):
        engine(drafter=False).generate("ab", 4, algorithm="slrs")


def test_same_with_different_tokenizers():
    with pytest.raises(FailedPrecondition):
        engine(D_TOKENS).generate("ab", 4, algorithm="same")
    engine(T_TOKENS).generate("ab", 4, algorithm="same")  # identical: fine


@pytest.mark.parametrize("algorithm", ["same", "tli", "slem"])
def test_drafting_algorithms_need_a_drafter(algorithm):
    with pytest.raises(InvalidArgument):
        engine(drafter=False).generate("ab", 4, algorithm=algorithm)


def test_auto_without_drafter_is_none():
    r = engine(drafter=False).generate("ab", 4, algorithm="auto")
    assert r.algorithm == "none" and r.draft_tokens == 0 and r.new_tokens == 4


@pytest.mark.parametrize("n", [0, -1, CTX, CTX - 1, 10**6])
def test_max_new_tokens_out_of_range(n):
    e = engine()
    prompt = "ab a"  # 3 target tokens: room for CTX - 3 new ones
    assert len(e.target_vocab.encode_prompt(prompt)) == 3
    with pytest.raises(InvalidArgument):
        e.generate(prompt, n)


def test_max_new_tokens_filling_the_context_exactly():
    e = engine()
    for algorithm in ("none", "tli", "slem"):
        r = e.generate("ab a", CTX - 3, algorithm=algorithm, draft_tokens=7)
        assert r.new_tokens == CTX - 3 and r.finish_reason == "length"
    e2 = engine(T_TOKENS)
    r = e2.generate("ab a", CTX - 3, algorithm="same", draft_tokens=7)
    assert r.new_tokens == CTX - 3


def test_prompt_longer_than_the_context():
    e = engine()
    with pytest.raises(InvalidArgument):
        e.generate("a " * CTX, 1)
    with pytest.raises(InvalidArgument):
        e.generate("a" * CTX, 1)  # exactly the context: no room for a token
    r = e.generate("a" * (CTX - 1), 1)  # one position left
    assert r.new_tokens == 1
    # the engine is still usable after an error
    assert e.generate("ab", 3, algorithm="tli").new_tokens == 3


@pytest.mark.parametrize("k", [0, -3, 65])
def test_draft_tokens_out_of_range(k):
    with pytest.raises(InvalidArgument):
        engine().generate("ab", 4, algorithm="tli", draft_tokens=k)


@pytest.mark.parametrize("params", [SamplingParams(temperature=-0.5), SamplingParams(top_p=0.0),
                                    SamplingParams(top_k=-2), SamplingParams(seed=-1)])
def test_bad_sampling_params(params):
    with pytest.raises(InvalidArgument):
        engine().generate("ab", 4, params)


def eos_after_three(ctx):
    """The target writes "b" three times after the prompt "a", then EOS."""
    n = len(ctx) - 1
    x = torch.zeros(5, dtype=torch.float64)
    x[1 if n < 3 else EOS] = 10.0
    return x


@pytest.mark.parametrize("algorithm", ["none", "same", "tli", "slem", "auto"])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=5)])
def test_eos_stops_generation(algorithm, params):
    tokens = T_TOKENS if algorithm == "same" else D_TOKENS
    e = engine(tokens, target_fn=eos_after_three)
    r = e.generate("a", 20, params, algorithm, draft_tokens=4)
    assert r.finish_reason == "eos"
    assert r.ids == [1, 1, 1, EOS] and r.new_tokens == 4
    assert r.text == "bbb"  # EOS stands for no text
    r = e.generate("a", 2, params, algorithm)
    assert r.finish_reason == "length" and r.ids == [1, 1]


def test_eos_drafted_and_accepted():
    """The drafter drafts EOS (TLI maps the drafter's EOS to the target's) and the target accepts it."""
    def drafter_fn(ctx):
        x = torch.zeros(5, dtype=torch.float64)
        x[1 if len(ctx) < 4 else EOS] = 10.0  # drafter ctx: "a" + "bbb" = [a, b, b, b] (no "ba" merge: a first)
        return x

    for algorithm in ("tli", "slem"):
        tr = TableRunner(eos_after_three, 5, CTX)
        e = Engine(tr, toy(T_TOKENS), TableRunner(drafter_fn, 5, CTX), toy(D_TOKENS))
        r = e.generate("a", 20, SamplingParams(), algorithm, draft_tokens=8)
        assert r.ids == [1, 1, 1, EOS] and r.finish_reason == "eos"
        assert r.rounds == 1 and r.draft_tokens == r.accepted_tokens == 4  # b b b EOS, all in one round


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError):
        Engine.load(str(tmp_path / "no-such-model"))


def test_auto_rule():
    """The static rule the services use: identical tokenizers -> same; different: greedy -> slem,
    sampling -> tli. The engine's auto measures instead, among `auto_algorithms` (tests/test_auto.py)."""
    t, d, dv_same = engine(D_TOKENS).target_vocab, engine(D_TOKENS).drafter_vocab, engine(T_TOKENS).drafter_vocab
    greedy, t1 = SamplingParams(), SamplingParams(temperature=1.0, seed=3)
    assert resolve_algorithm("auto", greedy, t, dv_same)[0] == "same"
    assert resolve_algorithm("auto", greedy, t, d)[0] == "slem"
    algo, why = resolve_algorithm("auto", t1, t, d)
    assert algo == "tli" and why
    # the static rule's pick first, the target's own step last (auto is never slower than no speculation)
    assert auto_algorithms(greedy, t, dv_same) == ["same", "none"]
    assert auto_algorithms(greedy, t, d) == ["slem", "none", "tli"]
    assert auto_algorithms(t1, t, d) == ["tli", "none", "slem", "slrs"]
    assert auto_algorithms(t1, t, None) == ["none"]
    assert engine(T_TOKENS).generate("ab", 4, algorithm="auto").algorithm == "same"
    r = engine(D_TOKENS).generate("ab", 4, t1, algorithm="auto")
    assert r.algorithm in ("tli", "slem", "slrs") and r.why and r.auto["arms"]