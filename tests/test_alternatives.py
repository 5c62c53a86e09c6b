"""Alternatives to a draft's last candidate (`Proposal.alternatives`, crossdraft/verifier.py).

What must hold: a block with siblings (`runner.Step.depths`) gives each sibling the bits of the causal
block that ends in it, through the kernel (and within float rounding through torch's attention), so a
verification with alternatives commits exactly what the target alone would; an accepted sibling's keys
and values moved into the chain's place (`LlamaRunner.move`) serve the next step as that block's would;
the verifier commits one token more exactly when the target's token in the last candidate's place is an
alternative, and ignores alternatives where it cannot run them (sampling, a runner without siblings);
a malformed shape is refused on the wire; and generations with alternatives are the target alone's."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama
from test_lossless_greedy import MAX_NEW, PROMPTS, make_engine, reference

from crossdraft import kernels, wire
from crossdraft.errors import InvalidArgument
from crossdraft.protocol import TEXT, TOKENS, Proposal, Verdict
from crossdraft.runner import HFRunner, LlamaRunner, Step
from crossdraft.sampling import SamplingParams
from crossdraft.verifier import Verifier


def _tokens(n: int, seed: int) -> list:
    return [int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(300, seed=12, hidden=96, kv_heads=2).float()


def _after(runner, prefix: list, block: list, **kw):
    cache = runner.new_cache()
    runner.forward_batch([Step(cache, prefix)])
    return cache, runner.forward_batch([Step(cache, block, **kw)])[0]


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "torch"])
def test_a_sibling_row_is_the_block_that_ends_in_it(model, kernel, monkeypatch):
    monkeypatch.setenv("CROSSDRAFT_DECODE_KERNEL", kernel)
    runner = LlamaRunner(model, 128)
    assert runner.decode_kernel == (kernel == "1" and kernels.available())
    prefix, t = _tokens(30, 1), _tokens(6, 2)
    # root, c1, c2, then two siblings of c2 and one of c1
    cache, got = _after(runner, prefix, t, depths=[0, 1, 2, 2, 2, 1])
    assert cache.length == len(prefix) + 6
    wants = [(t[:3], slice(0, 3), slice(0, 3)), (t[:2] + [t[3]], 2, 3), (t[:2] + [t[4]], 2, 4), (t[:1] + [t[5]], 1, 5)]
    for block, at, row in wants:
        want = _after(runner, prefix, block)[1][at]
        if runner.decode_kernel:
            assert torch.equal(got[row], want)
        else:
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
    wrong = _after(runner, prefix, t[:4])[1][3]  # (a row that saw c2 too: the control)
    assert (got[3] - wrong).abs().max() > 1e-3


def test_an_accepted_sibling_moved_into_place_serves_the_next_step(model):
    runner = LlamaRunner(model, 128)
    prefix, t = _tokens(30, 3), _tokens(5, 4)
    cache, _ = _after(runner, prefix, t[:4], depths=[0, 1, 2, 2])  # sibling t[3] of t[2] accepted
    runner.move(cache, len(prefix) + 3, len(prefix) + 2)
    cache.truncate(len(prefix) + 3)
    got = runner.forward_batch([Step(cache, [t[4]])])[0]
    chain, _ = _after(runner, prefix, [t[0], t[1], t[3]])
    want = runner.forward_batch([Step(chain, [t[4]])])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if runner.decode_kernel:
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cannot move"):
        runner.move(cache, cache.length, 0)


@pytest.mark.parametrize("depths", [[0, 2], [0, 1, 3], [1, 1], [0, 1, 0]])
def test_a_block_that_is_not_a_chain_and_siblings_is_refused(model, depths):
    runner = LlamaRunner(model, 128)
    with pytest.raises(ValueError, match="siblings"):
        runner.check(Step(runner.new_cache(), _tokens(len(depths), 5), depths=depths))


def test_the_hugging_face_runner_runs_no_siblings(model):
    runner = HFRunner(model, 128)
    assert not runner.siblings
    with pytest.raises(ValueError, match="does not run blocks with siblings"):
        runner.check(Step(runner.new_cache(), [1, 2], depths=[0, 1]))


# --- the verifier ---------------------------------------------------------------------------------

def _target_alone(runner, vocab_runner_model, prompt: list, n: int) -> list:
    v = Verifier(runner, vocab_runner_model)
    v.start(prompt, n, SamplingParams())
    out = []
    while not v.finished:
        out += v.step().ids
    return out


@pytest.fixture(scope="module")
def target(trained_models):
    engine = make_engine(trained_models, "bpe/bpe")
    runner = LlamaRunner(copy.deepcopy(trained_models["bpe"]).float(), 256)
    prompt = engine.target_vocab.encode_prompt(PROMPTS[0])
    return runner, engine.target_vocab, prompt, _target_alone(runner, engine.target_vocab, prompt, 8)


def _round(runner, vocab, prompt, proposal, params=SamplingParams()):
    v = Verifier(runner, vocab)
    v.start(prompt, 8, params)
    return v, v.verify(proposal)


def test_the_target_s_token_among_the_alternatives_commits_one_more(target):
    runner, vocab, prompt, ref = target
    wrong = (ref[2] + 1) % runner.vocab_size
    p = Proposal(seq=len(prompt), kind=TOKENS, target_ids=ref[:2] + [wrong], alternatives=[wrong + 7 if wrong + 7 != ref[2] else 1, ref[2]])
    v, verdict = _round(runner, vocab, prompt, p)
    assert verdict.ids == ref[:4] and verdict.alternative
    assert verdict.candidates == 3 and verdict.accepted == 3
    assert v.cache.length == len(prompt) + 3  # every committed position but the last
    while not v.finished:  # and the session goes on as the target alone
        verdict = v.step()
    assert v.new_ids == ref


def test_alternatives_change_nothing_when_the_chain_holds_or_misses_earlier(target):
    runner, vocab, prompt, ref = target
    whole = Proposal(seq=len(prompt), kind=TOKENS, target_ids=ref[:3], alternatives=[ref[3]])
    assert _round(runner, vocab, prompt, whole)[1].ids == ref[:4]
    early = Proposal(seq=len(prompt), kind=TOKENS, target_ids=[(ref[0] + 1) % runner.vocab_size, ref[1]],
                     alternatives=[ref[1], ref[0]])
    verdict = _round(runner, vocab, prompt, early)[1]
    assert verdict.ids == ref[:1] and not verdict.alternative


def test_alternatives_are_ignored_under_sampling_and_without_siblings(target, trained_models):
    runner, vocab, prompt, ref = target
    p = Proposal(seq=len(prompt), kind=TOKENS, target_ids=[(ref[0] + 1) % runner.vocab_size], alternatives=[ref[0]])
    assert _round(runner, vocab, prompt, p)[1].alternative  # (the control: greedy, lean runner)
    hf = HFRunner(copy.deepcopy(trained_models["bpe"]).float(), 256)
    assert _round(hf, vocab, prompt, p)[1].ids == ref[:1]
    sampled = Proposal(seq=len(prompt), kind=TOKENS, target_ids=[5], alternatives=[6],
                       q_ids=[torch.tensor([5])], q_probs=[torch.tensor([1.0], dtype=torch.float64)])
    verdict = _round(runner, vocab, prompt, sampled, SamplingParams(temperature=1.0, seed=3))[1]
    assert not verdict.alternative and len(verdict.ids) <= 2


def test_alternatives_on_the_wire():
    p = Proposal(seq=9, kind=TOKENS, target_ids=[4, 5], alternatives=[6, 7])
    assert wire.proposal_from_proto(wire.proposal_to_proto(p)).alternatives == [6, 7]
    v = Verdict(seq=9, ids=[4, 6, 2], text=b"abc", candidates=2, accepted=2, alternative=True)
    assert wire.verdict_from_proto(wire.verdict_to_proto(v)).alternative
    for bad in (Proposal(seq=9, kind=TOKENS, target_ids=[4], alternatives=list(range(9))),
                Proposal(seq=9, kind=TEXT, text=b"ab", alternatives=[3]),
                Proposal(seq=9, kind=TOKENS, target_ids=[], alternatives=[3])):
        with pytest.raises(InvalidArgument, match="alternatives"):
            wire.proposal_to_proto(bad)
        msg = wire.proposal_to_proto(Proposal(seq=9, kind=TOKENS, target_ids=[4]))
        msg.ClearField("target_ids")
        msg.target_ids.extend(bad.target_ids)
        msg.alternatives.extend(bad.alternatives)
        if bad.kind == TEXT:
            continue
        with pytest.raises(InvalidArgument, match="alternatives"):
            wire.proposal_from_proto(msg)


# --- whole generations ----------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["same", "tli"])
def test_generations_with_alternatives_are_the_target_alone_s(trained_models, algorithm):
    engine = make_engine(trained_models, "bpe/bpe")
    taken = 0
    for prompt in PROMPTS[:8]:
        for n in (0, 3):
            engine.alternatives = n
            engine._drafters.clear()
            r = engine.generate(prompt, MAX_NEW, algorithm=algorithm)
            assert r.ids == reference(trained_models, "bpe/bpe", prompt).ids, (prompt, n)
            taken += r.alternatives
            assert n or not r.alternatives
    assert taken > 0  # (some rounds took an alternative: the path was exercised)


def test_cli_generate_takes_draft_alternatives(trained_models, tmp_path, capsys):
    """`crossdraft generate --draft-alternatives N`: output identical to the target alone with 0 and 3; a
    count past 8 is refused by the argument parser (exit code 2)."""
    import json

    from test_services import save_model

    from crossdraft.cli import main
    t = save_model(trained_models["bpe"], "bpe", tmp_path / "target")
    d = save_model(trained_models["bpe_small"], "bpe", tmp_path / "drafter")
    args = ["generate", PROMPTS[0], "--target", str(t), "--drafter", str(d), "--algorithm", "same",
            "--max-new-tokens", "24", "--threads", "1", "--json", "--compare", "--draft-alternatives"]
    for n in ("0", "3"):
        assert main(args + [n]) == 0
        assert json.loads(capsys.readouterr().out)["identical_to_target_alone"] is True
    with pytest.raises(SystemExit) as e:
        main(args + ["9"])
    assert e.value.code == 2 and "must be in 0-8" in capsys.readouterr().err
