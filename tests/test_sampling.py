"""crossdraft.sampling: the target's sampling distribution must be Hugging Face's, the uniforms must be
pure functions of (seed, position, stream), and an inverse-CDF draw never picks a zero-weight token."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from crossdraft.errors import InvalidArgument
from crossdraft.sampling import ACCEPT, DRAFT, TARGET, SamplingParams, probs_from_logits, sample, uniform


def hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What `model.generate(do_sample=True, temperature=, top_k=, top_p=)` samples from."""
    x = logits.double()
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long)
    if params.temperature != 1.0:
        x = TemperatureLogitsWarper(params.temperature)(ids, x)
    if params.top_k:
        x = TopKLogitsWarper(params.top_k)(ids, x)
    if params.top_p < 1.0:
        x = TopPLogitsWarper(params.top_p)(ids, x)
    return torch.softmax(x, dim=-1)


PARAMS = [
    SamplingParams(1.0),
    SamplingParams(0.7),
    SamplingParams(1.5, top_k=5),
    SamplingParams(1.0, top_k=1),
    SamplingParams(0.8, top_p=0.9),
    SamplingParams(1.2, top_p=0.3),
    SamplingParams(0.6, top_k=20, top_p=0.95),
    SamplingParams(1.0, top_k=50, top_p=0.5),
    SamplingParams(2.0, top_k=200, top_p=0.99),  # top_k larger than the vocabulary: off
    SamplingParams(0.05, top_p=0.01),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probs_match_hugging_face_warpers(params, dtype):
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(64, 100, generator=g, dtype=torch.float64) * 3).to(dtype)
    # ties at the top-k boundary and repeated values: both keep every tied token
    logits[0, :10] = 1.0
    logits[1, 5:20] = logits[1].max()
    got = probs_from_logits(logits, params)
    want = hf_probs(logits, params)
    assert got.dtype == torch.float64
    assert got.shape == logits.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got > 0, want > 0)  # the same support, exactly
    torch.testing.assert_close(got.sum(-1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)


def test_top_k_keeps_ties_and_top_p_keeps_at_least_one():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    p = probs_from_logits(logits, SamplingParams(1.0, top_k=2))
    assert (p[0] > 0).tolist() == [True, True, True, True, False]  # tied 2nd place: all kept, as HF
    p = probs_from_logits(logits, SamplingParams(1.0, top_p=1e-9))
    assert (p[0] > 0).tolist() == [True, False, False, False, False]
    assert float(p[0, 0]) == 1.0


def test_uniform_is_deterministic_and_in_unit_interval():
    seen = set()
    for seed in (0, 1, 2**63 - 1, 123456789):
        for pos in range(200):
            for stream in (DRAFT, ACCEPT, TARGET):
                u = uniform(seed, pos, stream)
                assert isinstance(u, float)
                assert 0.0 <= u < 1.0
                assert u == uniform(seed, pos, stream)
                seen.add(u)
    assert len(seen) == 4 * 200 * 3  # no collisions between seeds, positions or streams


def test_uniform_is_roughly_uniform_and_streams_are_independent():
    n = 20000
    us = [uniform(7, i, TARGET) for i in range(n)]
    assert stats.kstest(us, "uniform").pvalue > 1e-4
    vs = [uniform(7, i, ACCEPT) for i in range(n)]
    assert abs(float(stats.pearsonr(us, vs)[0])) < 0.05
    ws = [uniform(s, 3, DRAFT) for s in range(n)]  # across seeds at one position
    assert stats.kstest(ws, "uniform").pvalue > 1e-4
    assert abs(sum(us) / n - 0.5) < 0.01
    # 53 random bits: the low bits vary too
    assert len({int(u * 2**53) & 0xFF for u in us[:2000]}) == 256


@pytest.mark.parametrize("u", [0.0, 1e-300, 0.25, 0.5, 0.999999, 1 - 2**-53, math.nextafter(1.0, 0.0)])
def test_sample_never_picks_a_zero_probability_token(u):
    rows = [
        torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.1, 0.2, 0.0, 0.0], dtype=torch.float64),  # trailing zeros
        torch.tensor([1e-300, 0.0, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 5.0, 0.0, 7.0, 0.0], dtype=torch.float64),  # unnormalised (residuals)
        torch.tensor([0.1] * 10 + [0.0], dtype=torch.float64),  # cdf rounds: sum != 1.0 exactly
        torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0], dtype=torch.float32),
    ]
    for probs in rows:
        i = sample(probs, u)
        assert 0 <= i < probs.shape[0]
        assert probs[i] > 0, (probs, u, i)


def test_sample_never_picks_a_zero_probability_token_random():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        V = 2 + trial % 40
        w = torch.rand(V, generator=g, dtype=torch.float64)
        w[torch.rand(V, generator=g) < 0.6] = 0.0
        if not w.any():
            w[trial % V] = 1e-12
        for u in (0.0, float(torch.rand(1, generator=g)), 1 - 2**-53):
            i = sample(w, u)
            assert w[i] > 0


def test_sample_is_the_inverse_cdf():
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    assert sample(probs, 0.0) == 0
    assert sample(probs, 0.19) == 0
    assert sample(probs, 0.21) == 2
    assert sample(probs, 0.69) == 2
    assert sample(probs, 0.71) == 3
    # frequencies with the library's own uniforms match the probabilities
    counts = [0, 0, 0, 0]
    n = 20000
    for s in range(n):
        counts[sample(probs, uniform(s, 0, TARGET))] += 1
    assert counts[1] == 0
    assert stats.chisquare([counts[0], counts[2], counts[3]], [0.2 * n, 0.5 * n, 0.3 * n]).pvalue > 1e-4


def test_sample_rejects_an_all_zero_row():
    with pytest.raises(ValueError):
        sample(torch.zeros(5, dtype=torch.float64), 0.5)


@pytest.mark.parametrize("bad", [
    SamplingParams(temperature=-1.0), SamplingParams(temperature=float("nan")), SamplingParams(temperature=101.0),
    SamplingParams(top_k=-1), SamplingParams(top_p=0.0), SamplingParams(top_p=1.5),
    SamplingParams(seed=-1), SamplingParams(seed=2**63),
])
def test_invalid_sampling_params(bad):
    with pytest.raises(InvalidArgument):
        bad.validate()


def test_greedy_flag():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.0, top_k=5).greedy
    assert not SamplingParams(temperature=0.01).greedy
