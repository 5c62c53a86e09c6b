"""Load-aware speculation (crossdraft/load.py) and the round loop's pipelining (crossdraft/rounds.py).

The cost model is fed synthetic passes whose cost is known, so its fit is checked exactly; the draft
cap is checked on hand-computed cases (a session alone, a GPU-like pass whose size barely matters, a
full batch where every row costs, the drafter's own time, slem's shorter drafter tokens), so a wrong
sign or a dropped term moves the answer. Pipelined target steps (the target alone, and a speculative session's rounds that the load cap cuts
to the target's step) are checked against the one-round-at-a-time loop on a real tiny model: the same
ids, with proposals really kept in flight. No timings are asserted."""
from __future__ import annotations

from collections import deque

import pytest
from test_lossless_greedy import PROMPTS, make_engine

from crossdraft.auto import AutoState
from crossdraft.load import MIN_PASSES, SHARED, CostModel, LoadHint, acceptance, draft_cap, expected_accepted
from crossdraft.rounds import LocalVerifier, run_rounds
from crossdraft.sampling import SamplingParams
from crossdraft.scheduler import drive

# --- the cost model ------------------------------------------------------------------------------


def test_the_cost_model_fits_multi_token_passes_and_leaves_one_token_steps_out():
    m = CostModel()
    for i in range(MIN_PASSES - 1):
        m.observe(2, 2 + i, 0.010 + 0.001 * (2 + i))
    assert m.hint() is None  # too few passes yet
    for i in range(20):
        tokens = 2 + i % 9
        m.observe(tokens // 2, tokens, 0.010 + 0.001 * tokens)
        m.observe(1, 1, 0.004)  # a one-token step: a kernel of its own, not a point on the line
    h = m.hint()
    assert h.fixed_s == pytest.approx(0.010, rel=1e-6) and h.token_s == pytest.approx(0.001, rel=1e-6)
    assert 1.0 < h.sequences < 5.0  # (the steps count in the sequences per pass)


def test_passes_all_of_one_size_give_no_slope_and_no_hint():
    m = CostModel()
    for _ in range(3 * MIN_PASSES):
        m.observe(1, 6, 0.02)
    assert m.hint() is None


def test_primed_passes_price_the_first_rounds_once_a_real_pass_says_the_load():
    """`prime` (passes timed before any session: batched.prime_cost) feeds the fit, not the sequences per
    pass: no hint until a real pass, then the primed slope and the real pass's sequences."""
    m = CostModel()
    for t in (2, 3, 4, 6, 8, 12, 16, 24):
        m.prime(t, 0.010 + 0.001 * t)
    assert m.hint() is None
    m.observe(8, 8, 0.018)
    h = m.hint()
    assert h.sequences == 8.0 and h.fixed_s == pytest.approx(0.010, rel=1e-6)
    assert h.token_s == pytest.approx(0.001, rel=1e-6)


def test_prime_cost_times_passes_of_a_real_runner(trained_models):
    from crossdraft.batched import PRIME_SIZES, prime_cost

    m = CostModel()
    prime_cost(m, make_engine(trained_models, "bpe/spm").target_runner)
    assert m.n == len(PRIME_SIZES) and m.hint() is None
    m.observe(4, 4, 0.01)
    assert m.hint().token_s >= 0.0 and m.hint().fixed_s >= 0.0


def test_old_passes_fade():
    """The machine got busier: after many passes at the new cost the fit follows it."""
    m = CostModel(half_life=8)
    for i in range(200):
        t = 2 + i % 7
        m.observe(1, t, 0.010 + 0.001 * t)
    for i in range(200):
        t = 2 + i % 7
        m.observe(1, t, 0.020 + 0.002 * t)
    h = m.hint()
    assert h.fixed_s == pytest.approx(0.020, rel=1e-3) and h.token_s == pytest.approx(0.002, rel=1e-3)


# --- the draft cap -------------------------------------------------------------------------------


def test_expected_accepted_and_acceptance():
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert expected_accepted(1.0, 4) == 4 and expected_accepted(0.7, 0) == 0
    assert acceptance(0, 0, 0) == pytest.approx(0.5)  # the prior alone
    assert acceptance(90, 100, 10) == pytest.approx((90 + 2) / (100 + 4))


def test_no_load_measured_keeps_the_length():
    assert draft_cap(None, 0.1, 1.0, 7) == 7


def test_alone_the_cap_is_off():
    """One session a pass: the adaptive length and auto's arms measure what pays; no cap."""
    alone = LoadHint(sequences=1.2, fixed_s=0.010, token_s=0.010)
    assert draft_cap(alone, 0.1, 1.0, 7) == 7


def test_where_a_shared_pass_costs_about_the_same_whatever_its_size_the_cap_changes_nothing():
    gpu = LoadHint(sequences=4.0, fixed_s=0.080, token_s=0.0001)
    # each session's share 0.020; k=5 at alpha 0.6: (1 + 1.383) / 0.0206 = 116/s against 1 / 0.0201 = 50/s
    assert draft_cap(gpu, 0.6, 1.0, 5) == 5


def test_a_full_batch_cuts_the_draft_length_by_acceptance():
    busy = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)
    # each session's share: 0.002 fixed + 0.002 per row. k=0: 250/s; k=1 at 0.6: 1.6/0.006 = 267/s;
    # k=2: 1.96/0.008 = 245/s
    assert draft_cap(busy, 0.6, 1.0, 5) == 1
    assert draft_cap(busy, 0.4, 1.0, 5) == 0  # k=1: 1.4/0.006 = 233/s < 250/s
    # the drafter's own time counts too (shared by the batch): at 0.004 s a token, k=1 costs 0.0065
    assert draft_cap(busy, 0.6, 1.0, 5, draft_s=0.004) == 0


def test_a_pipelined_session_prices_the_pass_a_drafting_round_misses():
    busy = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)
    # at alpha 0.6, 1 (267/s, above); pipelined, a round that drafts also pays the pass it misses
    # (0.004): k=1 1.6/0.010 = 160/s, k=5 2.38/0.018 = 132/s, against 250/s for k=0
    assert draft_cap(busy, 0.6, 1.0, 5) == 1 and draft_cap(busy, 0.6, 1.0, 5, pipelined=True) == 0
    # at alpha 0.9 long drafts still pay: k=6 5.22/0.020 = 261/s
    assert draft_cap(busy, 0.9, 1.0, 6, pipelined=True) == 6
    gpu = LoadHint(sequences=4.0, fixed_s=0.080, token_s=0.0001)
    # where the pass's size barely matters, speculation still pays: k=5 at alpha 0.6 commits
    # 2.38 in 0.0406 (59/s) against 1 in 0.0201 (50/s)
    assert draft_cap(gpu, 0.6, 1.0, 5, pipelined=True) == 5


def test_the_drafter_s_catch_up_is_charged_to_a_round_that_drafts():
    busy = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)
    # k=1 at 0.6 pays (267/s against 250/s, above) until the drafter must first bring its cache to the
    # committed text: a prompt of 230 tokens at 0.1 ms each adds 0.023 / 8 to the round (k=1: 183/s)
    assert draft_cap(busy, 0.6, 1.0, 5) == 1 and draft_cap(busy, 0.6, 1.0, 5, catchup_s=0.023) == 0
    gpu = LoadHint(sequences=4.0, fixed_s=0.080, token_s=0.0001)
    # where speculation pays by far, a catch-up of a few ms does not stop it: k=5 2.38 / 0.0213 = 112/s
    assert draft_cap(gpu, 0.6, 1.0, 5, catchup_s=0.004) == 5
    alone = LoadHint(sequences=1.0, fixed_s=0.016, token_s=0.002)
    assert draft_cap(alone, 0.6, 1.0, 5, catchup_s=1.0) == 5  # alone the cap is off


def test_slem_like_ratio_prices_the_candidates_a_drafted_token_brings():
    busy = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)
    # at alpha 0.9 the best round verifies 3 candidates (344/s; 2: 339/s, 4: 341/s): 3 drafted tokens
    # when each brings one, 6 when each brings half of one
    assert draft_cap(busy, 0.9, 1.0, 6) == 3
    assert draft_cap(busy, 0.9, 0.5, 6) == 6


# --- pipelined target steps ----------------------------------------------------------------------


class QueueLink:
    """A link that, like the drafter service's Verify stream, accepts proposals before the earlier
    ones are answered and answers them in order (`depth` in flight)."""

    def __init__(self, verifier, depth: int):
        self.verifier, self.depth = verifier, depth
        self.queue: deque = deque()
        self.most_in_flight = 0

    def submit(self, proposal):
        self.queue.append(proposal)
        self.most_in_flight = max(self.most_in_flight, len(self.queue))

    def result(self):
        return drive(self.verifier.runner, self.verifier.round(self.queue.popleft()))

    def load(self):
        return None


@pytest.mark.parametrize("n", [1, 2, 17])
def test_target_steps_in_flight_give_the_ids_of_one_at_a_time(trained_models, n):
    engine = make_engine(trained_models, "bpe/spm")
    v = engine.verifier
    for prompt in PROMPTS[:3]:
        ids = engine.target_vocab.encode_prompt(prompt)
        got = {}
        for name, link in (("alone", LocalVerifier(v)), ("pipelined", QueueLink(v, depth=3))):
            v.start(ids, n, SamplingParams())
            rounds = list(run_rounds(link, {}, None, len(ids)))
            got[name] = [t for r in rounds for t in r.verdict.ids]
            assert rounds[-1].verdict.finished and all(len(r.verdict.ids) == 1 for r in rounds)
            assert len(got[name]) == n or rounds[-1].verdict.finish_reason == "eos"
        assert got["pipelined"] == got["alone"]
        assert link.most_in_flight == 3  # (the proposals past the end are dropped with the link)


class LoadLink(QueueLink):
    """A QueueLink that reports the load `hints` gives, one per round asked (None: no load measured)."""

    def __init__(self, verifier, depth: int, hints):
        super().__init__(verifier, depth)
        self.hints, self.asked = hints, 0

    def load(self):
        self.asked += 1
        return self.hints(self.asked)


BUSY = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)  # every candidate a row of real work: cap 0


def _speculative(engine, prompt, n, link, state=None, hand_back=None):
    """A greedy slem session over `link`: (the committed ids, its rounds)."""
    ids = engine.target_vocab.encode_prompt(prompt)
    engine.verifier.start(ids, n, SamplingParams())
    d = engine.drafter("slem").fork()
    d.start(prompt, ids, SamplingParams())
    rounds = list(run_rounds(link, {"slem": d}, lambda dr, k: dr.propose(k), len(ids), state, hand_back=hand_back))
    return [t for r in rounds for t in r.verdict.ids], rounds


def test_rounds_the_load_cap_cuts_to_the_target_step_are_pipelined_and_give_the_same_ids(trained_models):
    engine = make_engine(trained_models, "bpe/spm")
    v = engine.verifier
    for prompt in PROMPTS[:3]:
        ids = engine.target_vocab.encode_prompt(prompt)
        v.start(ids, 24, SamplingParams())
        alone = [t for r in run_rounds(LocalVerifier(v), {}, None, len(ids)) for t in r.verdict.ids]
        busy = LoadLink(v, depth=3, hints=lambda i: BUSY)
        got, rounds = _speculative(engine, prompt, 24, busy)
        assert got == alone
        assert all(r.verdict.candidates == 0 and len(r.verdict.ids) == 1 for r in rounds[:-1])
        assert busy.most_in_flight == 3
        # load that comes and goes: drafted rounds (alone) between pipelined target steps
        waves = LoadLink(v, depth=2, hints=lambda i: BUSY if i % 8 < 4 else None)
        got, rounds = _speculative(engine, prompt, 24, waves)
        assert got == alone
        assert any(r.verdict.candidates for r in rounds) and waves.most_in_flight == 2


def test_a_session_whose_drafting_the_load_cuts_to_nothing_is_handed_back_after_its_rounds_in_flight(trained_models):
    """Under a load that cuts every draft to nothing, a loop that may hand back stops submitting after
    `hand_back` capped rounds, answers the rounds in flight (none is lost: the ids so far are the target
    alone's, and the last round is the last submitted) and marks the last one `handed_back`. Negative
    controls: without `hand_back`, or under load that lets the session draft, it runs to the end."""
    engine = make_engine(trained_models, "bpe/spm")
    v = engine.verifier
    ids = engine.target_vocab.encode_prompt(PROMPTS[1])
    v.start(ids, 40, SamplingParams())
    alone = [t for r in run_rounds(LocalVerifier(v), {}, None, len(ids)) for t in r.verdict.ids]
    busy = LoadLink(v, depth=3, hints=lambda i: BUSY)
    got, rounds = _speculative(engine, PROMPTS[1], 40, busy, hand_back=6)
    assert rounds[-1].handed_back and not any(r.handed_back for r in rounds[:-1])
    assert not rounds[-1].verdict.finished and not busy.queue  # every round submitted was answered
    assert len(rounds) == 6 and got == alone[:6]  # (the first round is capped too)
    # where to come back: a smaller batch at which this session's drafting pays at BUSY's pass costs
    assert SHARED <= rounds[-1].come_back_below < BUSY.sequences
    got, rounds = _speculative(engine, PROMPTS[1], 40, LoadLink(v, depth=3, hints=lambda i: BUSY))
    assert got == alone and not any(r.handed_back for r in rounds)
    got, rounds = _speculative(engine, PROMPTS[1], 40, LoadLink(v, depth=3, hints=lambda i: None), hand_back=6)
    assert got == alone and not any(r.handed_back for r in rounds)


def test_a_session_under_load_does_not_prefill_its_drafter_for_a_round_that_cannot_pay_it_back(trained_models):
    """Under a load where drafting pays once the drafter is caught up, a session whose
    drafter would first run the whole prompt stays on the target's own steps (its drafter never runs);
    with the catch-up free (the negative control) the same session drafts. The same ids either way."""
    engine = make_engine(trained_models, "bpe/spm")
    v = engine.verifier
    ids = engine.target_vocab.encode_prompt(PROMPTS[0])
    v.start(ids, 24, SamplingParams())
    alone = [t for r in run_rounds(LocalVerifier(v), {}, None, len(ids)) for t in r.verdict.ids]
    gpu = LoadHint(sequences=4.0, fixed_s=0.080, token_s=0.0001)  # caught up, k=5 pays at the prior 0.5
    drafted = {}
    for per_token in (1.0, 0.0):  # seconds per context token the drafter's catch-up costs
        engine.drafter("slem").costs.catchup_s, engine.drafter("slem").costs.step_s = per_token, 0.0
        got, rounds = _speculative(engine, PROMPTS[0], 24, LoadLink(v, depth=1, hints=lambda i: gpu))
        assert got == alone
        drafted[per_token] = sum(r.stats.drafted for r in rounds[-1:])
    assert drafted[1.0] == 0 and drafted[0.0] > 0


@pytest.mark.parametrize("mode", ["same", "slem"])
def test_a_drafter_s_pending_catch_up(trained_models, mode):
    """What the load cap prices: the whole context before a session's first draft, about what was committed
    since after one (deferred verdicts counted in target tokens), and what it cost measured into the
    costs its model's sessions share."""
    engine = make_engine(trained_models, "bpe/bpe" if mode == "same" else "bpe/spm")
    ids = engine.target_vocab.encode_prompt(PROMPTS[1])
    engine.verifier.start(ids, 12, SamplingParams())
    d = engine.drafter(mode).fork()
    d.start(PROMPTS[1], ids, SamplingParams())
    assert d.pending() == len(d.ctx) > 0
    proposal = d.propose(3)
    assert proposal.catchup_tokens == len(d.ctx) and proposal.catchup_ns > 0
    assert engine.drafter(mode).costs.catchup_s > 0  # shared with the model's other forks
    verdict = drive(engine.verifier.runner, engine.verifier.round(proposal))
    d.defer(verdict)
    assert d.pending() == 1 + len(verdict.ids)  # the last context token runs again, then the verdict's


def test_auto_rounds_ahead_are_lossless_and_keep_its_turns_whole(trained_models):
    """auto's arm `none` (and slem under a load that caps it to 0) in flight two at a time, each arm
    picked before the record of the round ahead of it (the turns' count: tests/test_auto.py)."""
    engine = make_engine(trained_models, "bpe/spm")
    v = engine.verifier
    ids = engine.target_vocab.encode_prompt(PROMPTS[0])
    v.start(ids, 40, SamplingParams())
    alone = [t for r in run_rounds(LocalVerifier(v), {}, None, len(ids)) for t in r.verdict.ids]
    state = AutoState(["slem", "none"], lengths=(None,), block=3, rest=0, promote_span=0)
    link = LoadLink(v, depth=2, hints=lambda i: BUSY if i % 10 < 5 else None)
    got, rounds = _speculative(engine, PROMPTS[0], 40, link, state)
    assert got == alone and link.most_in_flight == 2
    assert {r.arm[0] for r in rounds} == {"slem", "none"}
