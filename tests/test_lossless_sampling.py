"""Exact-distribution tests of sampled speculative decoding (same, tli, slem; slrs in the long rounds) on tiny
vocabularies (slrs's exact enumeration: tests/test_slrs.py).

Setting: the alphabet {a, b}; the target's tokenizer is {a, b, ab, EOS} and the drafter's
{a, b, ba, EOS} (canonical encoding: greedy longest match), so the drafter's context is a genuinely
different tokenization of the text ("b" + "a" is one drafter token) and the target's "ab" is outside
the TLI intersection. Both models are table runners: float64 logits that are a pure function of the
context. For the prompt "b" and max_new_tokens = 3 (generation stops at EOS) there are 40 possible
outcomes; their exact probabilities under the target alone are enumerated with the library's own
`probs_from_logits`, the engine is run with one seed per sample, and a chi-square goodness-of-fit
test over the outcomes (rare ones merged) must not reject: p > 1e-4.

Two families of tables:
- FAR: independent pseudo-random p and q. They differ a lot (about half the candidates are
  rejected, residuals spread over several tokens): strong against wrong residuals, wrong q, wrong
  contexts or reused uniforms, but weak against a subtle 1% bias.
- CLOSE: q is nearly proportional to p on the tokens the drafter can propose, and the target puts
  about 10% on a token the drafter does not propose (TLI: "ab" is not in the drafter's vocabulary;
  same: the drafter under-weights it). About 10% of candidates are rejected. This is where a 1% bias
  in the acceptance rule is most visible (the mass it moves lands on a ~10%-probability token).

Power (negative control): the acceptance coin is biased by 1% (accept with probability
min(1, 1.01 p/q), by scaling the ACCEPT-stream uniform that crossdraft.algorithms uses). An exact
dynamic program over the rounds of speculative sampling gives the biased output distribution, hence
the non-centrality of the chi-square statistic at N samples: lambda ~ 98 with 39 degrees of freedom
for the CLOSE tables at N = 60,000 (with the engine's default confidence stop; ~105 without), a
power of ~0.998 at p < 1e-4. The test asserts that power (> 0.99), that the biased run is rejected
(p < 1e-4; observed chi2 ~ 136, p ~ 1e-12), and that the biased run fits the DP's own prediction
of it.

Long rounds. With max_new_tokens = 3 a round verifies at most two candidates, and bugs in the residual
after a late rejection, or in uniforms reused across a long round, live at four and more. So a second
table of settings runs max_new_tokens = 5 (364 outcomes) with draft lengths 4 and 5 and the drafter's
confidence stop off: the first round of every run verifies four candidates (unless the drafter draws
EOS), for same, tli, slem and slrs. Its negative control uses CLOSE tables with P("ab") = 0.05 (CLOSE4),
where each acceptance the 1% bias moves shifts more relative mass; rare outcomes are merged into bins of
at least 50 expected counts (`MIN_EXPECTED_LONG`). At N = 30,000 the DP gives a non-centrality of ~137
with ~102 degrees of freedom, a power of ~0.999 at p < 1e-4, asserted (> 0.99) as above, and the biased
run must be rejected (observed chi2 ~ 238, p ~ 1e-12) while it fits the DP's prediction of it.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional

import pytest
import torch
from scipy import stats

import crossdraft.algorithms as algorithms
from crossdraft.bridge import Intersection
from crossdraft.engine import Engine
from crossdraft.sampling import ACCEPT, SamplingParams, probs_from_logits
from crossdraft.sampling import uniform as true_uniform
from crossdraft.vocab import Vocab
from helpers import TableRunner, hashed_logits, longest_match_encoder

T_TOKENS = ["a", "b", "ab", None]  # target: id 3 is EOS
D_TOKENS = ["a", "b", "ba", None]  # drafter: id 3 is EOS
D_DUP = ["a", "b", "ba", None, "a"]  # id 4 stands for the same bytes as id 0 (like "<0x61>" next to "a")
EOS = 3
MAX_NEW = 3
PROMPT = "b"  # the drafter's tokenization of "b" + "a" is the single token "ba"
ALPHA = 1e-4
N_POWER = 60_000  # CLOSE tables: the test the negative control is run against (~18 s each on one core)
N = 20_000  # FAR tables
BIAS = 1.01  # the negative control's acceptance bias
T1 = SamplingParams(temperature=1.0)
MAX_NEW_LONG = 5  # long rounds: a first round of four candidates, then the rest
N_POWER_LONG = 30_000  # CLOSE4 tli k=4 and its negative control
MIN_EXPECTED_LONG = 50.0  # bins of the long settings' chi-square tests (their power is computed with it)
P_AB_CLOSE4 = 0.05


def make_vocab(tokens, eos=EOS):
    return Vocab.from_tokens(tokens, longest_match_encoder(tokens), [eos], name="".join(t or "#" for t in tokens))


def far_engine(drafter_tokens=None, **engine_kw) -> Engine:
    """Independent pseudo-random target and drafter tables (functions of the id contexts). `engine_kw`:
    Engine settings (min_confidence=0.0: no confidence stop, rounds as long as the draft length)."""
    tv = make_vocab(T_TOKENS)
    tr = TableRunner(lambda c: hashed_logits(c, 4, salt=11, scale=1.5), 4, 64)
    if drafter_tokens is None:
        return Engine(tr, tv)
    V = len(drafter_tokens)
    dr = TableRunner(lambda c: hashed_logits(c, V, salt=22, scale=1.5), V, 64)
    return Engine(tr, tv, dr, make_vocab(drafter_tokens), **engine_kw)


def _text_logits(text: bytes, p_ab: float = 0.1) -> torch.Tensor:
    """CLOSE tables' shared part, a function of the text: logits over the target's 4 tokens with
    P("ab") = p_ab and EOS made rarer (most outcomes have 3 tokens)."""
    x = hashed_logits(text, 4, salt=5, scale=1.0)
    x[EOS] -= 1.5
    x[2] = torch.logsumexp(x[[0, 1, EOS]], 0) + math.log(p_ab / (1 - p_ab))
    return x


def close_engine(drafter_tokens=None, p_ab: float = 0.1, **engine_kw) -> Engine:
    """Target: the text's logits plus a small term of its own id context (so it depends on the ids it
    generated, not only on the text). Drafter: the same text logits for the tokens it shares with the
    target (a drafter token with no target counterpart gets the largest logit; "ab" is lowered by 2)."""
    tv = make_vocab(T_TOKENS)
    tr = TableRunner(lambda c: _text_logits(tv.bytes_of(c), p_ab) + 0.05 * hashed_logits(c, 4, salt=6), 4, 64)
    if drafter_tokens is None:
        return Engine(tr, tv)
    dv = make_vocab(drafter_tokens)

    def drafter_fn(ctx):
        base = _text_logits(dv.bytes_of(ctx), p_ab)
        out = torch.empty(len(drafter_tokens), dtype=torch.float64)
        for i, t in enumerate(drafter_tokens):
            out[i] = base[T_TOKENS.index(t)] if t in T_TOKENS else base.max()
            if t == "ab":
                out[i] -= 2.0
        return out

    return Engine(tr, tv, TableRunner(drafter_fn, len(drafter_tokens), 64), dv, **engine_kw)


def close4_engine(drafter_tokens=None) -> Engine:
    """CLOSE tables with P("ab") = 0.05 and no confidence stop: the long settings' negative control."""
    return close_engine(drafter_tokens, P_AB_CLOSE4, min_confidence=0.0)


def far_long_engine(drafter_tokens=None) -> Engine:
    return far_engine(drafter_tokens, min_confidence=0.0)


# --------------------------------------------------------------------------------------------------
# exact distributions by enumeration
# --------------------------------------------------------------------------------------------------

def exact_distribution(engine: Engine, params: SamplingParams, mode: str = "none", k: int = 0,
                       factor: float = 1.0, max_new: int = MAX_NEW) -> dict:
    """Outcome (tuple of new target ids) -> probability.

    mode "none": the target alone (every token drawn from p). mode "same"/"tli": token-level
    speculative sampling with draft length k as the engine runs it (a round verifies at most
    remaining - 1 candidates), the acceptance probability min(1, factor * p/Q) where Q(t) is the
    drafter's total probability of target token t, the residual norm(max(0, p - Q)). factor 1 is the
    exact algorithm (its output must be the target's distribution), factor 1.01 the biased one.
    The drafter's context follows the engine's drafter: its canonical tokenization of the committed
    text at the start of a round, then its own drafted tokens; and like the engine's drafter it stops
    drafting after a token it drew with probability below its `min_confidence` (that token is still a
    candidate)."""
    tv = engine.target_vocab
    min_conf = getattr(engine, "min_confidence", 0.0)
    prompt = tuple(tv.encode_prompt(PROMPT))
    t_runner = engine.verifier.runner

    def p_of(ids):
        return probs_from_logits(t_runner.logits_at(ids)[None], params)[0]

    if mode == "none":
        k = 0
    if k:
        dv, d_runner = engine.drafter_vocab, engine.drafter_runner
        if mode == "tli":
            inter = Intersection(dv, tv)
            rows, tids = inter.rows.tolist(), inter.target_list
        else:
            rows = tids = list(range(len(dv)))

        def canon(ids):
            return tuple(ids) if mode == "same" else tuple(dv.encode_prompt(tv.bytes_of(ids).decode()))

        def q_rows(dctx):  # [(drafter id, target id, q)] over the rows the drafter samples from
            q = probs_from_logits(d_runner.logits_at(dctx)[rows][None], params)[0]
            return [(rows[i], tids[i], float(q[i])) for i in range(len(rows)) if q[i] > 0]

    out: Counter = Counter()

    def rec(ids, dctx, j, n_c, prob):
        new = ids[len(prompt):]
        if len(new) == max_new or (new and new[-1] in tv.eos_ids):
            out[new] += prob
            return
        if j == 0:  # a round starts
            n_c = min(k, max_new - len(new) - 1)
            if n_c:
                dctx = canon(ids)
        p = p_of(ids)
        if j >= n_c:  # no candidate here: the target draws from p (bonus, or no drafter)
            for t in range(len(p)):
                if p[t] > 0:
                    rec(ids + (t,), None, 0, 0, prob * float(p[t]))
            return
        qr = q_rows(dctx)
        Q = torch.zeros_like(p)
        for _, t, qv in qr:
            Q[t] += qv
        acc_total = 0.0
        for d, t, qv in qr:
            a = qv * min(1.0, factor * float(p[t]) / float(Q[t]))
            acc_total += a
            rec(ids + (t,), dctx + (d,), j + 1, j + 1 if qv < min_conf else n_c, prob * a)
        residual = (p - Q).clamp_min(0.0)
        if not float(residual.sum()) > 0.0:
            residual = p
        residual = residual / residual.sum()
        rej = max(0.0, 1.0 - acc_total)
        for t in range(len(p)):
            if residual[t] > 0 and rej > 0:
                rec(ids + (t,), None, 0, 0, prob * rej * float(residual[t]))

    rec(prompt, None, 0, 0, 1.0)
    total = sum(out.values())
    assert abs(total - 1.0) < 1e-9, total
    return dict(out)


def run_counts(engine, params: SamplingParams, algorithm: str, n: int, k=None, seed0: int = 0,
               max_new: int = MAX_NEW, by_position: Optional[Counter] = None) -> tuple:
    """(Counter of outcomes, candidates verified, candidates accepted) over n runs with seeds seed0..;
    `by_position`, if given, gets [i]: rounds whose i-th candidate was accepted."""
    c: Counter = Counter()
    cands = acc = 0
    for s in range(seed0, seed0 + n):
        r = engine.generate(PROMPT, max_new, SamplingParams(params.temperature, params.top_k, params.top_p, s),
                            algorithm, draft_tokens=k)
        c[tuple(r.ids)] += 1
        cands += r.draft_tokens
        acc += r.accepted_tokens
        if by_position is not None:
            by_position.update(dict(enumerate(r.accepted_by_position)))
    return c, cands, acc


def _bins(expected: dict, min_expected: float, n: int) -> list:
    """Outcome groups: every outcome with n * P >= min_expected alone; the rest merged, rarest first,
    into groups of at least min_expected expected counts (a remainder joins the last group)."""
    order = sorted(expected, key=lambda o: (-expected[o], o))
    bins = [[o] for o in order if n * expected[o] >= min_expected]
    group, acc = [], 0.0
    for o in reversed([o for o in order if n * expected[o] < min_expected]):
        group.append(o)
        acc += n * expected[o]
        if acc >= min_expected:
            bins.append(group)
            group, acc = [], 0.0
    if group:
        if bins:
            bins[-1] = bins[-1] + group
        else:
            bins.append(group)
    return bins


def chi_square(counts: Counter, expected: dict, min_expected: float = 5.0) -> tuple:
    """(statistic, p-value, df). Outcomes of probability 0 must never be sampled."""
    n = sum(counts.values())
    impossible = [o for o in counts if expected.get(o, 0.0) <= 0.0]
    assert not impossible, f"outcomes of probability 0 were sampled: {impossible[:5]}"
    bins = _bins(expected, min_expected, n)
    obs = [sum(counts.get(o, 0) for o in b) for b in bins]
    exp = [n * sum(expected[o] for o in b) for b in bins]
    stat, p = stats.chisquare(obs, exp)
    return float(stat), float(p), len(bins) - 1


def noncentrality(expected: dict, alternative: dict, n: int, min_expected: float = 5.0) -> tuple:
    """(lambda, df, power at ALPHA) of the binned chi-square test when the truth is `alternative`."""
    bins = _bins(expected, min_expected, n)
    lam = 0.0
    for b in bins:
        p0 = sum(expected[o] for o in b)
        p1 = sum(alternative.get(o, 0.0) for o in b)
        lam += n * (p1 - p0) ** 2 / p0
    df = len(bins) - 1
    return lam, df, float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam))


def biased_uniform(seed, position, stream):
    """Accept iff u/1.01 * q < p: with probability min(1, 1.01 p/q). Other streams untouched."""
    u = true_uniform(seed, position, stream)
    return u / BIAS if stream == ACCEPT else u


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [far_engine, close_engine])
def test_enumeration_and_dp_agree(make):
    """The DP at factor 1 reproduces the target's distribution for both drafters and k = 1, 2: an
    independent check that the DP models speculative sampling (which the power figure relies on)."""
    none = exact_distribution(make(), T1)
    assert len(none) == 40  # 27 sequences of 3 non-EOS tokens + 13 ending in EOS
    for tokens, mode in ((T_TOKENS, "same"), (D_TOKENS, "tli")):
        for k in (1, 2):
            spec = exact_distribution(make(tokens), T1, mode, k)
            assert set(spec) == set(none)
            assert max(abs(spec[o] - none[o]) for o in none) < 1e-12
        biased = exact_distribution(make(tokens), T1, mode, 2, BIAS)
        assert max(abs(biased[o] - none[o]) for o in none) > 1e-4  # the bias shows in the outcomes


CASES = [
    # (tables, algorithm, drafter tokens, params, draft_tokens, N)
    ("close", "tli", D_TOKENS, T1, 2, N_POWER),
    ("close", "same", T_TOKENS, T1, None, N),
    ("far", "same", T_TOKENS, T1, 1, N),
    ("far", "tli", D_TOKENS, T1, None, N),
    ("far", "tli", D_TOKENS, SamplingParams(temperature=1.0, top_k=3, top_p=0.9), 2, N // 2),
    ("far", "same", T_TOKENS, SamplingParams(temperature=1.3, top_k=2), 1, N // 2),
    ("far", "slem", D_TOKENS, T1, None, N // 2),
]


@pytest.mark.parametrize("tables,algorithm,tokens,params,k,n", CASES,
                         ids=[f"{c[0]}-{c[1]}-k{c[4]}-t{c[3].temperature}-topk{c[3].top_k}-topp{c[3].top_p}"
                              for c in CASES])
def test_output_distribution_is_the_targets(tables, algorithm, tokens, params, k, n):
    engine = (close_engine if tables == "close" else far_engine)(tokens)
    expected = exact_distribution(engine, params)
    counts, cands, acc = run_counts(engine, params, algorithm, n, k, seed0=1_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"{tables} {algorithm} k={k} {params}: chi2={stat:.1f} df={df} p={p:.3g}; "
          f"{acc}/{cands} candidates accepted")
    # both branches of the rule ran many times
    assert cands > 0.5 * n and acc > 0.1 * cands and cands - acc > 0.05 * cands, (cands, acc)
    assert p > ALPHA, (f"{algorithm}: the output distribution is not the target's "
                       f"(chi2={stat:.1f}, df={df}, p={p:.3g})")


def test_negative_control_detects_a_one_percent_acceptance_bias(monkeypatch):
    engine = close_engine(D_TOKENS)
    expected = exact_distribution(engine, T1)
    biased = exact_distribution(engine, T1, "tli", 2, BIAS)
    lam, df, power = noncentrality(expected, biased, N_POWER)
    print(f"negative control at N={N_POWER}: non-centrality {lam:.1f}, df {df}, power at p<{ALPHA}: {power:.4f}")
    assert power > 0.99, (lam, df, power)
    monkeypatch.setattr(algorithms, "uniform", biased_uniform)
    counts, _, _ = run_counts(engine, T1, "tli", N_POWER, 2, seed0=1_000_000)  # the seeds of the real test
    stat, p, df = chi_square(counts, expected)
    print(f"negative control: chi2={stat:.1f} df={df} p={p:.3g}")
    assert p < ALPHA, f"a 1% acceptance bias went undetected (chi2={stat:.1f}, df={df}, p={p:.3g})"
    stat_b, p_b, _ = chi_square(counts, biased)  # and the biased engine is what the DP predicts
    assert p_b > ALPHA, (f"the biased engine does not follow the DP (chi2={stat_b:.1f}, p={p_b:.3g}): "
                         "if the drafting rule changed (draft length, confidence stop), update exact_distribution")


# --- long rounds: four and more candidates -------------------------------------------------------

def test_enumeration_and_dp_agree_for_long_rounds():
    """As above for max_new_tokens = 5 and draft lengths 4 and 5 (rounds of four candidates)."""
    for make in (far_long_engine, close4_engine):
        none = exact_distribution(make(), T1, max_new=MAX_NEW_LONG)
        assert len(none) == 364  # 243 sequences of 5 non-EOS tokens + 121 ending in EOS
        for tokens, mode in ((T_TOKENS, "same"), (D_TOKENS, "tli")):
            for k in (4, 5):
                spec = exact_distribution(make(tokens), T1, mode, k, max_new=MAX_NEW_LONG)
                assert max(abs(spec.get(o, 0.0) - none[o]) for o in none) < 1e-12 and set(spec) == set(none)


LONG_CASES = [
    # (tables, algorithm, drafter tokens, params, draft_tokens, N, fourth): `fourth`, the least share of
    # runs whose round of four accepted its fourth candidate (the late positions ran, not only existed)
    ("close4", "tli", D_TOKENS, T1, 4, N_POWER_LONG, 0.3),
    ("close4", "same", T_TOKENS, T1, 4, N // 2, 0.3),
    ("far", "same", T_TOKENS, SamplingParams(temperature=0.8), 4, N // 2, 0.01),
    ("far", "tli", D_TOKENS, SamplingParams(temperature=1.0, top_k=3, top_p=0.9), 5, N // 2, 0.01),
    ("close4", "slem", D_TOKENS, T1, 4, N // 2, 0.002),
    ("far", "slrs", D_TOKENS, T1, 4, N // 4, 0.002),
]


@pytest.mark.parametrize("tables,algorithm,tokens,params,k,n,fourth", LONG_CASES,
                         ids=[f"{c[0]}-{c[1]}-k{c[4]}-t{c[3].temperature}-topk{c[3].top_k}-topp{c[3].top_p}"
                              for c in LONG_CASES])
def test_long_rounds_output_distribution_is_the_targets(tables, algorithm, tokens, params, k, n, fourth):
    engine = (close4_engine if tables == "close4" else far_long_engine)(tokens)
    expected = exact_distribution(engine, params, max_new=MAX_NEW_LONG)
    accepted_at: Counter = Counter()
    counts, cands, acc = run_counts(engine, params, algorithm, n, k, seed0=3_000_000, max_new=MAX_NEW_LONG,
                                    by_position=accepted_at)
    stat, p, df = chi_square(counts, expected, MIN_EXPECTED_LONG)
    print(f"{tables} {algorithm} k={k} {params}: chi2={stat:.1f} df={df} p={p:.3g}; {acc}/{cands} candidates "
          f"accepted; accepted at positions 1-5: {[accepted_at[i] for i in range(5)]}")
    assert cands > 3 * n and cands - acc > 0.05 * cands and acc > 0.1 * cands, (cands, acc)
    assert accepted_at[3] > fourth * n, accepted_at  # rounds of four candidates, the fourth accepted
    assert p > ALPHA, (f"{algorithm}: the output distribution is not the target's "
                       f"(chi2={stat:.1f}, df={df}, p={p:.3g})")


def test_negative_control_detects_a_one_percent_acceptance_bias_in_long_rounds(monkeypatch):
    engine = close4_engine(D_TOKENS)
    expected = exact_distribution(engine, T1, max_new=MAX_NEW_LONG)
    biased = exact_distribution(engine, T1, "tli", 4, BIAS, max_new=MAX_NEW_LONG)
    lam, df, power = noncentrality(expected, biased, N_POWER_LONG, MIN_EXPECTED_LONG)
    print(f"long negative control at N={N_POWER_LONG}: non-centrality {lam:.1f}, df {df}, "
          f"power at p<{ALPHA}: {power:.4f}")
    assert power > 0.99, (lam, df, power)
    monkeypatch.setattr(algorithms, "uniform", biased_uniform)
    counts, _, _ = run_counts(engine, T1, "tli", N_POWER_LONG, 4, seed0=3_000_000, max_new=MAX_NEW_LONG)
    stat, p, df = chi_square(counts, expected, MIN_EXPECTED_LONG)
    print(f"long negative control: chi2={stat:.1f} df={df} p={p:.3g}")
    assert p < ALPHA, f"a 1% acceptance bias went undetected in long rounds (chi2={stat:.1f}, df={df}, p={p:.3g})"
    stat_b, p_b, _ = chi_square(counts, biased, MIN_EXPECTED_LONG)
    assert p_b > ALPHA, f"the biased engine does not follow the DP in long rounds (chi2={stat_b:.1f}, p={p_b:.3g})"


def test_tli_sampling_with_duplicate_drafter_tokens_is_exact():
    engine = far_engine(D_DUP)
    expected = exact_distribution(engine, T1)
    counts, _, _ = run_counts(engine, T1, "tli", N // 2, 2, seed0=1_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"duplicate drafter tokens: chi2={stat:.1f} df={df} p={p:.3g}")
    assert p > ALPHA, (stat, p, df)


def test_slem_sample_equals_the_targets_own_sample_for_each_seed():
    """SLEM commits the target's own draw at every position, made with the uniform the target alone
    uses there: for every seed the output is identical to algorithm none's."""
    engine = far_engine(D_TOKENS)
    accepted = 0
    for s in range(1500):
        params = SamplingParams(temperature=1.0, seed=s)
        ref = engine.generate(PROMPT, MAX_NEW, params, "none")
        for k in (None, 1):
            r = engine.generate(PROMPT, MAX_NEW, params, "slem", draft_tokens=k)
            assert r.ids == ref.ids, (s, k, r.ids, ref.ids)
            accepted += r.accepted_tokens
    assert accepted > 300


# (not auto: what it runs depends on timings; see crossdraft/auto.py and tests/test_auto.py)
@pytest.mark.parametrize("algorithm,tokens", [("none", None), ("same", T_TOKENS), ("tli", D_TOKENS),
                                              ("slem", D_TOKENS), ("slrs", D_TOKENS)])
def test_sampled_runs_are_reproducible_for_a_seed(algorithm, tokens):
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(200)]
    first = [far_engine(tokens).generate(PROMPT, MAX_NEW, p, algorithm).ids for p in params]
    engine = far_engine(tokens)  # a fresh engine, and then the same engine twice more
    for _ in range(2):
        assert [engine.generate(PROMPT, MAX_NEW, p, algorithm).ids for p in params] == first
    assert len({tuple(x) for x in first}) > 5  # the seed matters


def test_sampling_longer_generations_only_emits_possible_tokens():
    """Longer runs (24 tokens, draft lengths 1..5) with a top-k/top-p target: every committed token is
    in the target's top-k/top-p set at its position (never a token the target gives probability 0)."""
    params_list = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(60)] + \
                  [SamplingParams(temperature=0.9, top_p=0.6, seed=s) for s in range(60)]
    for tokens, algorithm in ((T_TOKENS, "same"), (D_TOKENS, "tli"), (D_TOKENS, "slem")):
        engine = far_engine(tokens)
        tr = engine.verifier.runner
        for i, params in enumerate(params_list):
            r = engine.generate("ab", 24, params, algorithm, draft_tokens=1 + i % 5)
            ctx = tuple(engine.target_vocab.encode_prompt("ab"))
            for t in r.ids:
                p = probs_from_logits(tr.logits_at(ctx)[None], params)[0]
                assert p[t] > 0, (algorithm, params, ctx, t)
                ctx += (t,)


@pytest.mark.parametrize("algorithm,tokens", [("tli", D_TOKENS), ("same", T_TOKENS)])
def test_sparse_drafter_distribution_is_exact(algorithm, tokens):
    """--draft-top-k: the drafter samples from its top-k renormalised distribution and sends exactly
    that sparse q; the output must still be the target's distribution."""
    base = far_engine(tokens)
    engine = Engine(base.verifier.runner, base.target_vocab, base.drafter_runner, base.drafter_vocab, draft_top_k=2)
    expected = exact_distribution(base, T1)
    counts, cands, acc = run_counts(engine, T1, algorithm, N // 2, 2, seed0=2_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"{algorithm} draft_top_k=2: chi2={stat:.1f} df={df} p={p:.3g}; {acc}/{cands} accepted")
    assert cands > 0.5 * (N // 2) and 0 < acc < cands
    assert p > ALPHA, (stat, p, df)
