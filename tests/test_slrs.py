"""SLRS (string-level rejection sampling): exactness, the work bound's fallback, greedy identity, acceptance.

Exactness is checked two ways on the tiny vocabularies of test_lossless_sampling (target {a, b, ab,
EOS}, prompt "b", at most 3 new tokens: 40 outcomes):
- `slrs_distribution`: an exact dynamic program over the rounds of SLRS as the engine runs them (fixed
  draft length), using the drafter's own `Explorer` for r at every position and enumerating every
  branch: the STOP coin, every candidate with its acceptance probability min(1, p/r), the residual
  norm(max(0, p - r)), and every drafter path (leaf, tail token) behind an accepted candidate with its
  probability, each continuing from its own next state (`slrs.next_state`: path and leftover). At factor 1 its output distribution must be the
  target's to 1e-12 for drafters whose tokens straddle target-token boundaries ("ba") and that spell
  one string many ways; with the acceptance coin biased by 1% it must not be.
- chi-square goodness of fit of the engine's sampled outputs (one seed per sample) against the
  target's exact distribution, with a negative control: the same run with the acceptance coin biased
  by 1% (min(1, 1.01 p/r)), whose rejection power is computed from the DP and asserted (> 0.99).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import crossdraft.algorithms as algorithms
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams, draft_uniform, probs_from_logits, sample, uniform
from crossdraft.slrs import group_state, leaves_of, next_state
from helpers import TableRunner, hashed_logits
from test_lossless_sampling import (ALPHA, BIAS, EOS, MAX_NEW, PROMPT, T1, T_TOKENS, _text_logits, biased_uniform,
                                    chi_square, exact_distribution, make_vocab, noncentrality, run_counts)

D_STRADDLE = ["a", "b", "ba", None]  # "ba" runs across target-token boundaries (b|a, b|ab)
D_MANY = ["a", "b", "ab", "ba", "aa", "bb", "aba", "bab", None]  # "abab" = ab+ab = aba+b = a+bab = a+b+a+b ...


def engine(drafter_tokens, tables="far", **kw) -> Engine:
    """Target {a, b, ab, EOS} and a drafter with these tokens (its EOS is its last id).
    far: independent pseudo-random tables. close: both models follow the same text-level logits
    (the drafter's tokens that the target lacks get the text's largest logit), so r is close to p."""
    tv = make_vocab(T_TOKENS)
    dv = make_vocab(drafter_tokens, eos=len(drafter_tokens) - 1)
    V = len(drafter_tokens)
    if tables == "far":
        tr = TableRunner(lambda c: hashed_logits(c, 4, salt=11, scale=1.5), 4, 64)
        dr = TableRunner(lambda c: hashed_logits(c, V, salt=22, scale=1.5), V, 64)
    else:
        tr = TableRunner(lambda c: _text_logits(tv.bytes_of(c)) + 0.05 * hashed_logits(c, 4, salt=6), 4, 64)

        def drafter_fn(ctx):
            base = _text_logits(dv.bytes_of(ctx))
            out = torch.empty(V, dtype=torch.float64)
            for i, t in enumerate(drafter_tokens):
                out[i] = base[EOS] if t is None else base[T_TOKENS.index(t)] if t in T_TOKENS else base.max() - 1.0
            return out

        dr = TableRunner(drafter_fn, V, 64)
    return Engine(tr, tv, dr, dv, **kw)


def slrs_distribution(eng: Engine, params: SamplingParams, k: int, factor: float = 1.0, seen: Counter = None) -> dict:
    """Outcome -> probability under SLRS with draft length k (see the module docstring). `seen` counts
    what the enumeration went through: straddles (a leftover carried to the next position), several
    drafter paths behind one candidate, tail groups, and positions where the work bound was hit."""
    seen = Counter() if seen is None else seen
    tv, dv = eng.target_vocab, eng.drafter_vocab
    expl = eng.drafter("slrs").explorer
    t_runner, d_runner = eng.verifier.runner, eng.drafter_runner
    min_conf = eng.min_confidence
    room = d_runner.max_length - 1
    tb, db = tv.token_bytes, dv.token_bytes
    prompt = tuple(tv.encode_prompt(PROMPT))
    out: Counter = Counter()

    def p_of(ids):
        return probs_from_logits(t_runner.logits_at(ids)[None], params)[0]

    def q_of(ctx):
        return probs_from_logits(d_runner.logits_at(ctx)[None], params)[0]

    def round_start(ids, prob):
        new = ids[len(prompt):]
        if len(new) == MAX_NEW or (new and new[-1] in tv.eos_ids):
            out[new] += prob
            return
        n_c = min(k, MAX_NEW - len(new) - 1)
        if n_c == 0:
            target_draw(ids, prob)
        else:
            position(ids, tuple(dv.encode_prompt(tv.bytes_of(ids).decode())), b"", 0, n_c, prob)

    def target_draw(ids, prob):
        p = p_of(ids)
        for y in range(len(p)):
            if p[y] > 0:
                round_start(ids + (y,), prob * float(p[y]))

    def position(ids, ctx, leftover, j, n_c, prob):
        if j >= n_c:
            target_draw(ids, prob)  # the bonus
            return
        p = p_of(ids)
        prop = expl.explore(leftover, lambda paths: [q_of(ctx + path) if len(ctx) + len(path) <= room else None
                                                     for path in paths])
        seen["hit"] += prop.hit
        seen["tail"] += any(lf.group is not None for lf in prop.leaves)
        total = float(prop.mass.sum())
        if not total > 0.0:
            target_draw(ids, prob)
            return
        pstop = prop.stop / (total + prop.stop)
        if pstop > 0.0:
            target_draw(ids, prob * pstop)
        sup, r_sup = prop.support()
        r = torch.zeros_like(p)
        r[sup] = r_sup
        acc_total = 0.0
        for t in sup.tolist():
            rt = float(r[t])
            a = rt * min(1.0, factor * float(p[t]) / rt)
            acc_total += a
            pa = prob * (1.0 - pstop) * a
            if pa == 0.0:
                continue
            if t in tv.eos_ids:
                round_start(ids + (t,), pa)
                continue
            nxt = j + 1 if rt < min_conf else n_c  # the drafter stops after an unsure candidate
            branches = []  # (probability given t, path, leftover): the next position's state
            leaves, weights, groups = leaves_of(prop, t, expl)
            wsum = sum(weights)
            seen["paths"] += len(leaves) > 1
            for w, lf, g in zip(weights, leaves, groups):
                st = next_state(lf, t, expl) if g is None else group_state(lf, t, expl)
                if st is not None:
                    branches.append((w / wsum,) + st)
                else:
                    gs = float(g.sum())
                    for d in g.nonzero()[:, 0].tolist():
                        branches.append((w / wsum * float(g[d]) / gs, lf.path + (d,), (lf.s + (db[d] or b""))[len(tb[t]):]))
            for bp, path, rest in branches:
                seen["straddle"] += bool(rest)
                position(ids + (t,), ctx + path, rest, j + 1, nxt, pa * bp)
        residual = (p - r).clamp_min(0.0)
        if not float(residual.sum()) > 0.0:
            residual = p
        residual = residual / residual.sum()
        rej = max(0.0, 1.0 - acc_total)
        for y in range(len(p)):
            if residual[y] > 0 and rej > 0:
                round_start(ids + (y,), prob * (1.0 - pstop) * rej * float(residual[y]))

    round_start(prompt, 1.0)
    total = sum(out.values())
    assert abs(total - 1.0) < 1e-9, total
    return dict(out)


# (drafter tokens, tables, engine options): tau 0.3 makes tail groups; budget 1 hits the work bound
DP_CASES = {
    "straddle": (D_STRADDLE, "far", {}),
    "many": (D_MANY, "far", {}),
    "many-tails": (D_MANY, "far", {"slrs_tau": 0.3}),
    "many-bound": (D_MANY, "far", {"slrs_budget": 1}),
    "straddle-close": (D_STRADDLE, "close", {}),
    "many-close": (D_MANY, "close", {}),
}


@pytest.mark.parametrize("case", list(DP_CASES))
def test_slrs_dp_is_the_targets_distribution(case):
    tokens, tables, kw = DP_CASES[case]
    for params in (T1, SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.7, top_p=0.8)):
        target = exact_distribution(engine(tokens, tables), params)
        for k in (1, 2):
            seen = Counter()
            got = slrs_distribution(engine(tokens, tables, **kw), params, k, seen=seen)
            assert set(got) <= set(target)
            err = max(abs(got.get(o, 0.0) - target[o]) for o in target)
            assert err < 1e-12, (case, params, k, err)
            if params is T1:  # (under top-p the candidates may all have p >= r: then a bias changes nothing)
                biased = slrs_distribution(engine(tokens, tables, **kw), params, k, factor=BIAS)
                assert max(abs(biased.get(o, 0.0) - target[o]) for o in target) > 1e-5, (case, params, k)
            if k == 2 and params is T1:  # the enumeration went through what the case is about
                assert seen["straddle"] > 0 and seen["paths"] > 0, seen
                if "bound" in case:
                    assert seen["hit"] > 0 and seen["tail"] > 0, seen


# (case, params, draft tokens, samples)
CHI_CASES = [
    ("straddle", T1, None, 5000),
    ("many-bound", T1, 2, 5000),
    ("many-tails", SamplingParams(temperature=1.0, top_k=3, top_p=0.9), None, 4000),
]


@pytest.mark.parametrize("case,params,k,n", CHI_CASES,
                         ids=[f"{c[0]}-k{c[2]}-topk{c[1].top_k}-topp{c[1].top_p}" for c in CHI_CASES])
def test_slrs_output_distribution_is_the_targets(case, params, k, n):
    tokens, tables, kw = DP_CASES[case]
    eng = engine(tokens, tables, **kw)
    expected = exact_distribution(eng, params)
    counts, cands, acc = run_counts(eng, params, "slrs", n, k, seed0=3_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"slrs {case} k={k} {params}: chi2={stat:.1f} df={df} p={p:.3g}; {acc}/{cands} accepted")
    assert cands > 0.3 * n and acc > 0.1 * cands and cands - acc > 0.05 * cands, (cands, acc)
    assert p > ALPHA, (case, stat, p, df)
    if "bound" in case:  # the work bound was hit, and counted
        runs = [eng.generate(PROMPT, MAX_NEW, SamplingParams(1.0, seed=s), "slrs", draft_tokens=k) for s in range(50)]
        assert sum(r.slrs_fallbacks for r in runs) > 0 and "slrs_fallbacks" in runs[0].as_json()


NEG_K, N_NEG = 1, 10_000


def test_slrs_negative_control_detects_a_one_percent_acceptance_bias(monkeypatch):
    """On `control_engine`'s tables the chi-square test at N_NEG samples has power > 0.99 (from the DP)
    against a 1% acceptance bias: the exact engine passes it, the biased one fails it, and the biased
    one fits the DP's prediction of it."""
    eng = control_engine()
    expected = exact_distribution(eng, T1)
    biased = slrs_distribution(eng, T1, NEG_K, factor=BIAS)
    lam, df, power = noncentrality(expected, biased, N_NEG)
    print(f"slrs negative control at N={N_NEG}: non-centrality {lam:.1f}, df {df}, power at p<{ALPHA}: {power:.4f}")
    assert power > 0.99, (lam, df, power)
    counts, _, _ = run_counts(eng, T1, "slrs", N_NEG, NEG_K, seed0=4_000_000)  # unbiased: fits
    stat, p, df = chi_square(counts, expected)
    print(f"slrs unbiased: chi2={stat:.1f} df={df} p={p:.3g}")
    assert p > ALPHA, (stat, p, df)
    monkeypatch.setattr(algorithms, "uniform", biased_uniform)
    counts, _, _ = run_counts(eng, T1, "slrs", N_NEG, NEG_K, seed0=4_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"slrs biased: chi2={stat:.1f} df={df} p={p:.3g}")
    assert p < ALPHA, f"a 1% acceptance bias went undetected (chi2={stat:.1f}, df={df}, p={p:.3g})"
    stat_b, p_b, _ = chi_square(counts, biased)  # and the biased engine is what the DP predicts
    assert p_b > ALPHA, (stat_b, p_b)


def test_slrs_candidates_pass_the_verifiers_draw_check():
    """Every candidate is the seeded inverse-CDF draw from the r sent with it (what verify_rejection
    redoes), r is a distribution, and the STOP/leaf/child draws use their own streams."""
    eng = engine(D_MANY, "far")
    d = eng.drafter("slrs")
    n = 0
    for s in range(300):
        params = SamplingParams(temperature=1.0, seed=s)
        ids = eng.target_vocab.encode_prompt("ab")
        d.start("ab", ids, params)
        prop = d.propose(4)
        assert prop.kind == "tokens" and len(prop.target_ids) == len(prop.q_ids) == len(prop.q_probs)
        for i, c in enumerate(prop.target_ids):
            q_ids, q = prop.q_ids[i], prop.q_probs[i]
            assert abs(float(q.sum()) - 1.0) < 1e-12 and float(q.min()) > 0.0
            assert int(q_ids[sample(q, draft_uniform(s, len(ids), i))]) == c
            n += 1
    assert n > 300


def test_slrs_accepts_at_least_as_much_as_slem_under_sampling():
    """Same seeds, several tables and draft lengths: accepted candidates per candidate, slrs >= slem."""
    for tokens, tables in ((D_STRADDLE, "far"), (D_STRADDLE, "close"), (D_MANY, "far"), (D_MANY, "close")):
        for k in (None, 2):
            rates = {}
            for algo in ("slem", "slrs"):
                eng = engine(tokens, tables)
                c = a = 0
                for s in range(250):
                    r = eng.generate("ab", 8, SamplingParams(temperature=1.0, seed=s), algo, draft_tokens=k)
                    c += r.draft_tokens
                    a += r.accepted_tokens
                rates[algo] = a / c
            print(tables, len(tokens), k, rates)
            assert rates["slrs"] >= rates["slem"], (tables, tokens, k, rates)


def test_slrs_greedy_is_slem():
    """Greedy, p is one-hot: min(1, p/r) accepts exactly the argmax and the residual is the argmax,
    so slrs is slem's exact-match rule; the engine runs slem's proposals for it."""
    for tokens in (D_STRADDLE, D_MANY):
        eng = engine(tokens, "far")
        for prompt in ("b", "ab", "ba"):
            a = eng.generate(prompt, 12, SamplingParams(), "slrs", draft_tokens=3)
            b = eng.generate(prompt, 12, SamplingParams(), "slem", draft_tokens=3)
            ref = eng.generate(prompt, 12, SamplingParams(), "none")
            assert a.ids == b.ids == ref.ids and a.algorithm == "slrs"
            assert (a.draft_tokens, a.accepted_tokens, a.rounds) == (b.draft_tokens, b.accepted_tokens, b.rounds)


def control_engine(p_eos: float = 0.01) -> Engine:
    """The negative control's tables, built so that a 1% acceptance bias shows: the drafter (D_MANY)
    never drafts EOS, and the target's p at a round's first position is 0.99 r + 0.01 EOS, where r is
    SLRS's proposal there (the drafter's ctx at a round start is a function of the text). With draft
    length 1 every candidate is at a round start, accepted with probability 0.99, and the residual is
    EOS alone: accepting with min(1, 1.01 p/r) takes ~1% of the output mass from EOS (p = 0.01)."""
    tv = make_vocab(T_TOKENS)
    dv = make_vocab(D_MANY, eos=len(D_MANY) - 1)
    V = len(D_MANY)

    def drafter_fn(ctx):
        x = hashed_logits(ctx, V, salt=22, scale=1.5)
        x[V - 1] = float("-inf")
        return x

    dr = TableRunner(drafter_fn, V, 64)
    from crossdraft.slrs import Explorer

    expl = Explorer(dv, tv)

    def target_fn(ids):
        dctx = tuple(dv.encode_prompt(tv.bytes_of(ids).decode()))
        prop = expl.explore(b"", lambda paths: [probs_from_logits(dr.logits_at(dctx + p)[None], T1)[0] for p in paths])
        assert prop.stop == 0.0
        p = (1.0 - p_eos) * prop.mass / prop.mass.sum()
        p[EOS] = p_eos
        return p.log()

    return Engine(TableRunner(target_fn, 4, 64), tv, dr, dv)


# --- real tokenizer pairs (tiny trained Llama models, adversarial tokenizers of test_lossless_greedy) ---

from test_lossless_greedy import MAX_NEW as GREEDY_NEW  # noqa: E402
from test_lossless_greedy import PAIRS, PROMPTS, make_engine, reference  # noqa: E402


@pytest.mark.parametrize("pair", list(PAIRS))
def test_slrs_greedy_output_identical_to_target_alone(trained_models, pair):
    engine_ = make_engine(trained_models, pair)
    drafted = 0
    for prompt in PROMPTS:
        ref = reference(trained_models, pair, prompt)
        for k in (1, 3, None):
            r = engine_.generate(prompt, GREEDY_NEW, SamplingParams(), "slrs", draft_tokens=k)
            assert r.ids == ref.ids and r.text == ref.text, (pair, k, prompt)
            assert r.algorithm == "slrs" and 0 <= r.accepted_tokens <= r.draft_tokens
            drafted += r.draft_tokens
    assert drafted > 0


@pytest.mark.parametrize("pair", ["bpe/spm", "spm/bpe", "bpe/ascii"])
def test_slrs_sampling_on_real_tokenizers(trained_models, pair):
    """Sampling with real byte-level / SentencePiece / ASCII-only pairs: every committed token has
    p > 0 under the target's top-k, runs are reproducible for a seed, the work per candidate stays
    within the bound, and psi's cost is reported."""
    eng = make_engine(trained_models, pair)
    tr = eng.verifier.runner
    tv = eng.target_vocab
    params_list = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(6)]
    acc = cands = 0
    for i, params in enumerate(params_list):
        prompt = PROMPTS[i % 10]
        r = eng.generate(prompt, 20, params, "slrs", draft_tokens=None if i % 2 else 3)
        again = eng.generate(prompt, 20, params, "slrs", draft_tokens=None if i % 2 else 3)
        assert r.ids == again.ids
        ids = tv.encode_prompt(prompt)
        ctx = list(ids)
        for t in r.ids:
            tr.reset()
            p = probs_from_logits(tr.forward(ctx, last_only=True), params)[0]
            assert p[t] > 0, (pair, prompt, t)
            ctx.append(t)
        assert r.drafted <= eng.slrs_budget * (r.draft_tokens + r.rounds) and r.slrs_rows >= r.drafted
        assert r.profile["psi_s"] > 0 and r.profile["psi_forward_s"] <= r.profile["psi_s"]
        acc += r.accepted_tokens
        cands += r.draft_tokens
    assert cands > 0 and acc > 0, (acc, cands)
