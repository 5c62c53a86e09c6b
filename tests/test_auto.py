"""`auto`: the measuring choice of algorithm and draft length (crossdraft/auto.py).

- The search itself (AutoState) on recorded figures: round-robin order, stages, the arm it keeps.
- Lossless while it switches: greedy output identical to the target alone and sampled output with
  the target's exact distribution when the algorithm and the draft length change on every round
  (a forced cycle over every arm, so each switch is exercised, not just the ones timing picks).
- The engine remembers per pair and decoding mode: the next session runs the kept arm only.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crossdraft.auto import AutoState, mode_key
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from test_lossless_greedy import MAX_NEW as GREEDY_NEW
from test_lossless_greedy import PAIRS, PROMPTS, make_engine, reference
from test_lossless_sampling import ALPHA, T1, chi_square, exact_distribution, run_counts
from test_slrs import D_STRADDLE
from test_slrs import engine as slrs_engine


# --------------------------------------------------------------------------------------------------
# the search, on recorded figures
# --------------------------------------------------------------------------------------------------

def feed(state: AutoState, speed, rounds: int, tokens=None, session_rounds: int = 0) -> list:
    """Run `rounds` rounds where arm (algorithm, k) commits at speed(arm, i) tokens a second (a dict:
    steady speeds); -> arms used. `tokens(i)`: tokens committed by round i (default 2).
    `session_rounds`: a new session (a new text) every so many rounds."""
    used = []
    for i in range(rounds):
        if session_rounds and i % session_rounds == 0:
            state.begin_session()
        arm = state.next_arm()
        used.append(arm)
        v = speed[arm] if isinstance(speed, dict) else speed(arm, i)
        t = tokens(i) if tokens else 2
        state.record(arm, t, t / v)
    return used


def test_incumbent_and_challengers_take_turns_and_the_clearly_faster_wins():
    algos, lengths = ["slem", "tli"], (None, 2, 4)  # slem first: the static rule's pick, the incumbent
    speed = {("tli", None): 50, ("slem", None): 60, ("tli", 2): 55, ("tli", 4): 40,
             ("slem", 2): 70, ("slem", 4): 65}
    st = AutoState(algos, lengths, block=2, min_turns=2, promote_turns=2, rest=0, promote_span=0)
    used = feed(st, speed, 8)
    assert used == [("slem", None)] * 2 + [("tli", None)] * 2 + [("slem", None)] * 2 + [("tli", None)] * 2
    assert st.stage == "length" and st.algorithm == "slem" and st.dropped == [("tli", None)]
    feed(st, speed, 40)  # stage 2: slem's lengths; 2 overtakes the adaptive incumbent, 4 loses to it
    assert st.stage == "decided" and st.choice == ("slem", 2)
    assert feed(st, speed, 5) == [("slem", 2)] * 5
    s = st.summary()
    assert s["choice"] == {"algorithm": "slem", "draft_tokens": 2}
    assert s["arms"][0]["algorithm"] == "slem" and s["arms"][0]["draft_tokens"] == 2
    assert s["arms"][0]["tokens_per_second"] == pytest.approx(70)
    assert "keeps slem k=2" in st.explain() and "tli k=adaptive 50.0 tok/s" in st.explain()
    assert set(s["dropped"]) == {"tli k=adaptive", "slem k=adaptive", "slem k=4"}


def test_pairing_cancels_what_the_text_does():
    """Acceptance swings with the text far more than between arms: a challenger 10% faster on every
    stretch of text, on text whose difficulty changes every few turns, is found faster."""
    st = AutoState(["slem", "tli"], (None,), block=4, min_turns=3, algo_turns=10, rest=0, promote_span=0)
    rates = {("slem", None): 1.0, ("tli", None): 1.1}
    feed(st, lambda arm, i: 100 * rates[arm] * (1 + 2 * (i // 13 % 3)), 200)
    assert st.stage == "decided" and st.choice == ("tli", None)


def test_a_close_challenger_leaves_the_incumbent_in_place():
    """Same speed on average, noisy per round: not settled early; at the cap the incumbent stays."""
    st = AutoState(["tli", "slem"], (None,), algo_turns=6, min_turns=3, block=2, rest=0, promote_span=0)
    feed(st, {("tli", None): 100, ("slem", None): 100}, 60, tokens=lambda i: 1 + 2 * (i * 7 % 3 == 0))
    assert st.stage == "decided" and st.choice == ("tli", None) and not st.dropped


def test_at_the_cap_the_likelier_arm_is_kept():
    """A challenger that ran its turns ahead by more than MIN_GAIN and one standard error, short of the t
    test, replaces the incumbent when the stage ends (keeping the incumbent would be the less likely
    choice); the same mean with twice the scatter keeps the incumbent (the negative control). Six pairs,
    differences 10 +/- s: the standard error is about 0.45 s, the t test's margin 2.57 of it."""
    T, N = ("tli", None), ("none", None)

    def run(scatter):
        st = AutoState(["tli", "none"], (None,), algo_turns=6, min_turns=3, promote_turns=99, block=1, rest=0,
                       promote_span=0)
        turns = [0]

        def speed(arm, i):
            if arm != N:
                return 100.0
            turns[0] += 1
            return 110.0 + (scatter if turns[0] % 2 else -scatter)
        feed(st, speed, 13)
        assert st.stage == "decided", st.summary()
        return st.choice
    assert run(scatter=15.0) == N
    assert run(scatter=30.0) == T


def test_switch_rounds_do_not_count():
    st = AutoState(["tli", "slem", "slrs"], (None,), min_turns=2, promote_turns=2, block=2, rest=0, promote_span=0)
    order = []
    for _ in range(18):
        arm = st.next_arm()
        switched = not order or order[-1] != arm
        order.append(arm)
        # a switch round commits as much but takes far longer (the drafter catches up): not counted
        st.record(arm, 2, 9.0 if switched else 0.02 if arm[0] == "slem" else 0.03, measured=not switched)
    assert [a for a, _ in order] == ["tli"] * 3 + ["slem"] * 3 + ["tli"] * 3 + ["slrs"] * 3 + ["tli"] * 3 + ["slem"] * 3
    assert st.summary()["unmeasured_rounds"] == 6
    assert st.incumbent == ("slem", None)  # 100 tok/s against 67 on both of its turns
    assert st.stats[("slem", None)].tokens_per_second == pytest.approx(100)


def test_the_search_rests_between_challenger_turns():
    """With a rest, each challenger turn sits between two incumbent turns (its pairs), and then the
    incumbent runs alone for `rest` rounds: the search takes block/(3 block + rest) of the rounds."""
    st = AutoState(["slem", "tli"], (None,), block=2, rest=5)
    used = feed(st, {("slem", None): 100, ("tli", None): 100}, 22)
    S, T = ("slem", None), ("tli", None)
    assert used == [S] * 2 + [T] * 2 + [S] * 2 + [S] * 5 + [S] * 2 + [T] * 2 + [S] * 2 + [S] * 5
    assert [t[0] for t in st.turns] == [S, T, S, S, T, S]  # rest rounds are no turn


def test_a_challenger_ahead_in_the_first_sessions_only_does_not_take_over():
    """What the zoo showed (drafter-bpe2k, greedy, six prompts of 128 tokens): on the first prompts tli
    beats slem by up to 13%, on the others slem beats tli by up to 16%, and slem is ahead over all.
    Turns back to back decide on the first stretch and keep the wrong arm; resting between turns and
    asking for evidence from `PROMOTE_SESSIONS` sessions leaves the incumbent in place."""
    S, T = ("slem", None), ("tli", None)
    per_session = [1.06, 1.13, 0.86, 0.93, 0.92, 0.95] * 2  # tli's speed over slem's, per session (text)

    def run(**kw):
        st = AutoState(["slem", "tli"], (None,), **kw)
        feed(st, lambda arm, i: 100 * (per_session[i // 64] if arm == T else 1.0), 64 * 12, session_rounds=64)
        return st

    assert run(rest=0, promote_span=0).best() == T  # the old schedule: decided inside the first stretch
    st = run()
    assert st.best() == S, st.summary()
    assert st.stats[T].rounds < 0.2 * 64 * 12  # and the search took a small share of the rounds


def test_a_challenger_faster_on_every_text_takes_over_within_a_few_sessions():
    """The same defaults find a challenger 10% faster everywhere, with noisy rounds, in a few sessions."""
    T = ("tli", None)
    st = AutoState(["slem", "tli"], (None,))
    noise = [1.0, 0.8, 1.25, 0.9, 1.1]
    feed(st, lambda arm, i: 100 * (1.1 if arm == T else 1.0) * noise[i * 7 % 5], 64 * 6, session_rounds=64)
    assert st.best() == T and st.algorithm == "tli", st.summary()


def test_a_challenger_far_ahead_on_every_turn_takes_over_inside_the_first_session():
    """`AHEAD`: the target's own step against a drafter that cannot pay (0.63x-0.93x on the zoo's CPU)
    takes over after 3 paired turns, inside one session; 12% ahead is within what the text moves and
    waits for the ordinary test, on turns from several sessions."""
    S, N = ("slem", None), ("none", None)
    noise = [1.0, 0.8, 1.25, 0.9, 1.1]

    def run(ahead):
        st = AutoState(["slem", "none"], (None,))
        feed(st, lambda arm, i: 100 * (ahead if arm == N else noise[i * 7 % 5]), 4 * 28, session_rounds=4 * 28)
        return st

    far = run(1.45)
    assert far.stage == "decided" and far.best() == N and far.session == 1, far.summary()
    near = run(1.12)
    assert near.best() == S and near.challengers == [N], near.summary()


def test_the_target_s_own_step_takes_the_first_challenger_turns_until_it_can_be_settled():
    """`_next_challenger`: `none` (second in `engine.auto_algorithms`' order) has its first `AHEAD` turns
    before any other challenger, so that where no drafter pays it takes over within the first cycles;
    then the challengers with the fewest turns go first, as they do among drafting arms (the control)."""
    S, N, T, R = ("tli", None), ("none", None), ("slem", None), ("slrs", None)
    st = AutoState(["tli", "none", "slem", "slrs"], (None,), block=1, rest=0, min_turns=99, algo_turns=99)
    feed(st, {S: 100, N: 101, T: 100, R: 100}, 2 * 8)  # all alike: nobody settled
    assert [t[0] for t in st.turns if t[0] != S] == [N, N, N, T, R, T, R, T]
    st = AutoState(["tli", "slem", "slrs"], (None,), block=1, rest=0, min_turns=99, algo_turns=99)
    feed(st, {S: 100, T: 100, R: 100}, 2 * 6)
    assert [t[0] for t in st.turns if t[0] != S] == [T, R, T, R, T, R]
    st = AutoState(["tli", "none", "slem", "slrs"], (None,), block=1, rest=0)
    feed(st, {S: 70, N: 100, T: 60, R: 50}, 2 * 3)  # `none` 43% ahead: it takes over after its 3 turns
    assert st.incumbent == N and S in st.dropped, st.summary()  # (in the old order: 1 of its turns by now)


def test_a_rest_runs_the_challenger_ahead_so_far():
    """Rests are no turn: once a challenger is ahead on its paired turns (on two turns at least, by
    more than MIN_GAIN and by more than a standard error), the rests run it, so that a search whose
    challenger will take over costs less meanwhile; its turns and its judgement are as before."""
    S, N = ("slem", None), ("none", None)
    st = AutoState(["slem", "none"], (None,), block=2, rest=5)
    used = feed(st, {S: 100, N: 115}, 33)  # (15% ahead: short of `AHEAD`, no take-over yet)
    cycle = [S] * 2 + [N] * 2 + [S] * 2
    assert used == cycle + [S] * 5 + cycle + [N] * 5 + cycle + [N] * 5  # one turn is no evidence yet
    assert [t[0] for t in st.turns] == [S, N, S] * 3  # the rests' rounds are still no turn
    st = AutoState(["slem", "none"], (None,), block=2, rest=5)
    assert feed(st, {S: 100, N: 102}, 22)[-5:] == [S] * 5  # within MIN_GAIN: the incumbent rests


def test_a_challenger_ahead_by_chance_does_not_run_the_rests():
    """A challenger whose paired turns scatter around the incumbent's (ahead on average by more than
    MIN_GAIN, but by less than a standard error) leaves the rests to the incumbent; the same mean with
    a small scatter hands them over (the positive control)."""
    S, N = ("slem", None), ("none", None)

    def run(scatter):
        st = AutoState(["slem", "none"], (None,), block=1, rest=4, min_turns=99, algo_turns=99)
        n_turns = [0]

        def speed(arm, i):
            if arm != N or st.turn != N:
                return 100.0
            n_turns[0] += 1
            return 110.0 + (scatter if n_turns[0] % 2 else -scatter)  # +10% on average
        return feed(st, speed, 3 * 7)[-4:]
    assert run(scatter=60.0) == [S] * 4
    assert run(scatter=2.0) == [N] * 4


def test_arms_picked_one_round_ahead_keep_each_turn_to_its_block():
    """rounds.run_rounds keeps target steps in flight: the next arm is picked before the round ahead
    of it is recorded, and a round that drafts, picked then, waits and is recorded right after it.
    Each turn still counts `block` rounds of its own arm (one committed token each)."""
    st = AutoState(["slem", "none", "tli"], (None,), block=3, rest=2, promote_span=0)
    speed = {("slem", None): 100, ("none", None): 104, ("tli", None): 98}
    flight = st.next_arm()
    for i in range(90):
        planned = st.next_arm()  # picked while `flight` is in flight
        st.record(flight, 1, 1 / speed[flight])
        if i % 3 == 0:  # it drafts: submitted once `flight` is answered, and answered before the next pick
            st.record(planned, 1, 1 / speed[planned])
            flight = st.next_arm()
        else:
            flight = planned
    assert st.turns and all(tokens == 3 for _, tokens, _, _, _ in st.turns), st.turns


def test_sessions_start_only_the_drafters_still_in_play():
    S, T, R = ("tli", None), ("slem", None), ("slrs", None)
    st = AutoState(["tli", "slem", "slrs"], (None, 3), block=1, min_turns=2, promote_turns=2, rest=0,
                   promote_span=0)
    assert st.algorithms_in_play() == ["tli", "slem", "slrs"]
    feed(st, {S: 100, T: 100, R: 50}, 8)  # slrs 50% behind: dropped after its first paired turn
    assert ("slrs", None) in st.dropped and st.algorithms_in_play() == ["tli", "slem"]
    feed(st, {S: 100, T: 100, R: 50, ("tli", 3): 100}, 60)  # slem capped: the length stage
    assert st.stage != "algorithm" and st.algorithms_in_play() == [st.algorithm]


def test_a_challenger_far_behind_is_dropped_after_two_turns_one_closer_after_three():
    """The `FAR` rule: 35% slower goes after its second paired turn, 20% slower after its third (a
    turn is expensive when the arm is, so the clearly slow one gets fewer)."""
    inc, slow, closer = ("tli", None), ("slrs", None), ("slem", None)
    st = AutoState(["tli", "slrs", "slem"], (None,), block=1, rest=0, promote_span=0)
    speed = {inc: 100, slow: 65, closer: 80}
    used = feed(st, speed, 9)  # inc slrs inc slem inc slrs inc slem inc
    assert used.count(slow) == 2 and used.count(closer) == 2
    assert st.dropped == [slow]  # after its second turn; slem, 20% behind, is still measured
    used = feed(st, speed, 2)  # slem's third turn, and the incumbent's after it
    assert used.count(closer) == 1 and st.dropped == [slow, closer]


def test_a_challenger_very_far_behind_is_dropped_after_one_turn():
    """`FAR`'s first step: 45% slower goes after one paired turn (slrs against the target's own step with
    bfloat16 panels is 60% slower, and each of its turns pays a drafter's catch-up); 35% slower waits
    for its second turn (the control)."""
    inc, very, slow = ("tli", None), ("slrs", None), ("slem", None)
    st = AutoState(["tli", "slrs", "slem"], (None,), block=1, rest=0, promote_span=0)
    used = feed(st, {inc: 100, very: 55, slow: 65}, 5)  # inc slrs inc slem inc
    assert used.count(very) == 1 and used.count(slow) == 1
    assert st.dropped == [very] and slow in st.challengers, st.summary()


def test_search_skips_what_is_fixed():
    st = AutoState(["same"], (None, 3))  # one algorithm: straight to the lengths
    assert st.stage == "length" and st.algorithm == "same"
    # a fixed length: only the algorithm
    st = AutoState(["tli", "slem"], (5,), min_turns=2, promote_turns=2, block=1, rest=0, promote_span=0)
    assert feed(st, {("tli", 5): 50, ("slem", 5): 100}, 4) == [("tli", 5), ("slem", 5)] * 2
    assert st.stage == "decided" and st.choice == ("slem", 5)
    st = AutoState(["same"], (4,))
    assert st.stage == "decided" and st.next_arm() == ("same", 4)


def test_mode_key_separates_decoding_modes():
    assert mode_key(SamplingParams()) != mode_key(T1)
    assert mode_key(T1) != mode_key(SamplingParams(temperature=1.0, top_k=5))
    assert mode_key(SamplingParams(temperature=0.7, top_p=0.9)) != mode_key(SamplingParams(temperature=0.8, top_p=0.95))


def test_mode_key_buckets_nearby_sampling_parameters():
    """Nearby settings share what auto measured, and a sweep of settings makes few keys."""
    a = SamplingParams(temperature=0.71, top_k=40, top_p=0.93, seed=1)
    b = SamplingParams(temperature=0.74, top_k=50, top_p=0.94, seed=2)
    assert mode_key(a) == mode_key(b)
    sweep = {mode_key(SamplingParams(temperature=1.0 + i * 1e-5, top_k=300 + i // 10, top_p=0.9 + i * 1e-5))
             for i in range(1000)}
    assert sweep == {("sampling", 1.0, 256, 0.9)}  # top-k 300..399: one power of two


def test_auto_memory_is_bounded_least_recently_used_out():
    """A client sweeping sampling parameters (or fixed draft lengths) cannot grow a process's memory: at
    most max_entries states are kept, and the one used all along is never the one evicted."""
    from crossdraft.auto import LENGTHS, MEMORY_ENTRIES, AutoMemory

    assert AutoMemory().max_entries == MEMORY_ENTRIES  # as the engine and the drafter service make it
    mem = AutoMemory(max_entries=8)
    kept = ("fp", mode_key(T1), None)
    first = mem.get(kept, ["tli", "slem"], LENGTHS)
    for i in range(500):
        params = SamplingParams(temperature=0.05 + i * 0.2, top_k=i, top_p=0.3 + (i % 14) * 0.05, seed=i)
        mem.get(("fp", mode_key(params), 1 + i % 64), ["tli", "slem"], LENGTHS)
        assert len(mem) <= 8
        if i % 5 == 0:
            assert mem.get(kept, ["tli", "slem"], LENGTHS) is first  # still there: recently used
    assert len(mem) == 8 and kept in mem
    assert ("fp", mode_key(SamplingParams(temperature=0.05, seed=0)), 1) not in mem  # the oldest went first


# --------------------------------------------------------------------------------------------------
# lossless while switching
# --------------------------------------------------------------------------------------------------

class Cycle(AutoState):
    """An `AutoState` that never settles: every round takes the next arm of a fixed cycle over all
    algorithms and lengths, so every switch between them happens many times."""

    def __init__(self, algorithms, lengths):
        super().__init__(algorithms, lengths)
        self.cycle = [(a, k) for a in algorithms for k in lengths]
        self.i = 0
        self.stage = "cycling"

    def algorithms_in_play(self):
        return list(dict.fromkeys(a for a, _ in self.cycle))

    def next_arm(self):
        arm = self.cycle[self.i % len(self.cycle)]
        self.i += 1
        return arm

    def record(self, arm, tokens, seconds, measured=True):
        super().record(arm, tokens, seconds, measured)
        self.stage = "cycling"


@pytest.mark.parametrize("pair", ["bpe/spm", "spm/bpe", "bpe/ascii", "bpe/bpe"])
def test_greedy_identical_to_target_alone_with_a_switch_every_round(trained_models, pair):
    engine = make_engine(trained_models, pair)
    algos = (["same"] if pair == "bpe/bpe" else ["tli", "slem"]) + ["none"]  # none: the target's own step
    cyc = Cycle(algos, (None, 1, 3))
    engine.auto_memory.put((mode_key(SamplingParams()), None), cyc)
    switched = 0
    for prompt in PROMPTS:
        r = engine.generate(prompt, GREEDY_NEW, SamplingParams(), "auto")
        assert r.ids == reference(trained_models, pair, prompt).ids, (pair, prompt)
        switched += len(r.auto["rounds_by_algorithm"]) > 1
    assert cyc.i > 3 * len(cyc.cycle)
    if len(algos) > 1:
        assert switched > len(PROMPTS) // 2  # most generations ran both algorithms


class DecideAfter(AutoState):
    """Runs `schedule`, then keeps `keep`: the decision comes mid-session, after another drafter ran."""

    def __init__(self, schedule, keep):
        super().__init__(sorted({a for a, _ in schedule} | {keep[0]}), (None,))
        self.schedule, self.keep, self.i = list(schedule), keep, 0
        self.stage = "algorithm"

    def algorithms_in_play(self):
        return self.algorithms if self.i < len(self.schedule) else [self.keep[0]]

    def next_arm(self):
        if self.i < len(self.schedule):
            self.i += 1
            return self.schedule[self.i - 1]
        self.stage, self.algorithm, self.choice = "decided", self.keep[0], self.keep
        return self.keep

    def record(self, arm, tokens, seconds, measured=True):
        pass


def test_drafters_share_one_cache_and_draft_what_a_fresh_cache_gives(trained_models):
    """tli and slem draft on one KV cache (Drafter.share_kv), which holds exactly the ids on record
    before each draft, also after a mid-session decision dropped the other drafter; and on every draft
    the logits the cache gives (with tli's pruned head) equal a fresh forward of the whole context (so
    what one drafter left in the cache, its own draft past the committed text included, never leaks
    into the other's)."""
    import torch

    from crossdraft.runner import make_runner

    engine = make_engine(trained_models, "bpe/spm")
    fresh = make_runner(trained_models[PAIRS["bpe/spm"][3]], 256)
    engine.auto_memory.put((mode_key(SamplingParams()), None),
                           DecideAfter([("tli", None), ("slem", None), ("tli", None), ("tli", None), ("slem", None)],
                                       ("slem", None)))
    seen, checked = [], [0]
    tli, slem = engine.drafter("tli"), engine.drafter("slem")
    assert tli.kv is slem.kv
    for d in (tli, slem):
        orig_propose, orig_logits = d.propose, d._logits_after

        def propose(k, d=d, orig=orig_propose):
            assert d.kv.cache.length == len(d.kv_ids)
            if d.inter is not None:
                assert d.rows is d.inter.rows
            seen.append(d.mode)
            return orig(k)

        def logits_after(ctx, d=d, orig=orig_logits):
            got = yield from orig(ctx)
            fresh.prune_head(d.inter.rows if d.inter is not None else None)
            fresh.reset()
            want = fresh.forward(list(ctx), last_only=True, pruned=d.mode == "tli")[0]
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
            checked[0] += 1
            return got
        d.propose, d._logits_after = propose, logits_after
    r = engine.generate(PROMPTS[0], GREEDY_NEW, SamplingParams(), "auto")
    assert seen[:5] == ["tli", "slem", "tli", "tli", "slem"] and set(seen[5:]) == {"slem"}
    assert checked[0] >= len(seen)
    assert r.ids == reference(trained_models, "bpe/spm", PROMPTS[0]).ids
    assert r.accepted_tokens > 0


@pytest.mark.parametrize("pair", ["bpe/spm", "bpe/bpe"])
def test_greedy_auto_search_is_lossless_and_remembered(trained_models, pair):
    """The real search: identical output while it measures, then one arm only (per decoding mode)."""
    engine = make_engine(trained_models, pair)
    for prompt in PROMPTS * 2:
        r = engine.generate(prompt, GREEDY_NEW, SamplingParams(), "auto")
        assert r.ids == reference(trained_models, pair, prompt).ids, (pair, prompt)
    st = engine.auto_memory.get((mode_key(SamplingParams()), None), [], ())
    assert st.stage == "decided", st.summary()
    r = engine.generate(PROMPTS[0], GREEDY_NEW, SamplingParams(), "auto")
    assert list(r.auto["rounds_by_algorithm"]) == [st.choice[0]] == [r.algorithm]
    assert r.as_json()["auto"]["choice"] == {"algorithm": st.choice[0], "draft_tokens": st.choice[1]}
    assert "keeps" in r.why
    # sampling is measured apart: its own search starts from scratch
    r = engine.generate(PROMPTS[0], GREEDY_NEW, SamplingParams(temperature=1.0, seed=1), "auto")
    assert r.auto["stage"] != "decided" or pair == "bpe/bpe"


def test_auto_without_a_drafter_is_the_target_alone(trained_models):
    e = Engine(make_engine(trained_models, "bpe/spm").verifier.runner, make_engine(trained_models, "bpe/spm").target_vocab)
    r = e.generate(PROMPTS[0], 5, SamplingParams(), "auto")
    assert r.algorithm == "none" and r.auto is None


def test_auto_sampled_distribution_is_the_targets_with_a_switch_every_round():
    """tli, slem and slrs at three draft lengths and the target's own step, the arm changing on every
    round (and the cycle running on across generations, so each position is reached under each arm):
    the output distribution is the target's (chi-square over the enumerated outcomes, as for each
    algorithm)."""
    eng = slrs_engine(D_STRADDLE)
    cyc = Cycle(["tli", "slem", "slrs", "none"], (None, 1, 2))
    eng.auto_memory.put((mode_key(T1), None), cyc)
    expected = exact_distribution(eng, T1)
    n = 9000
    counts, cands, acc = run_counts(eng, T1, "auto", n, None, seed0=5_000_000)
    stat, p, df = chi_square(counts, expected)
    print(f"auto, switching every round: chi2={stat:.1f} df={df} p={p:.3g}; {acc}/{cands} accepted")
    assert cyc.i > n  # more than one round per generation on average
    assert cands > 0.3 * n and acc > 0.1 * cands and cands - acc > 0.05 * cands, (cands, acc)
    assert p > ALPHA, (stat, p, df)


def test_auto_sampling_search_runs_every_algorithm(trained_models):
    """Under sampling the search tries tli, slem, slrs and the target's own step on a real tokenizer
    pair and settles."""
    engine = make_engine(trained_models, "bpe/spm")
    seen = set()
    for i, prompt in enumerate(PROMPTS * 2):
        r = engine.generate(prompt, GREEDY_NEW, SamplingParams(temperature=1.0, seed=i), "auto")
        seen |= set(r.auto["rounds_by_algorithm"])
        assert r.new_tokens == GREEDY_NEW or r.finish_reason == "eos"
    assert seen == {"tli", "slem", "slrs", "none"}
    assert engine.auto_memory.get((mode_key(T1), None), [], ()).stage == "decided"


def test_the_search_simulation_runs_and_compares_against_the_best_fixed_arm(tmp_path):
    """scripts/auto_sim.py (the tool behind the search's rules): a few seeds per scenario, rows written."""
    sim = _script("auto_sim")
    out = tmp_path / "sim.json"
    assert sim.main(["--seeds", "3", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scenario"] for r in rows] == list(sim.SCENARIOS)
    for r in rows:  # auto pays for its search, so it is below the best fixed arm, and not by half
        assert 0.5 < r["p10"] <= r["median"] and r["mean"] < 1.02 and 0.0 <= r["kept_best"] <= 1.0
    with pytest.raises(SystemExit):
        sim.main(["--scenarios", "nosuch"])


def _script(name):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_auto_summary_counts_the_target_alone_unless_told_not_to(tmp_path, capsys):
    """scripts/auto_summary.py pools bench runs: auto against the best configuration, the target alone
    among them (issue 13's goal), or against the fixed algorithms only with --fixed-only."""
    def run_file(i, alone_s):
        rows = [{"config": "target alone", "drafter": "-", "new_tokens": 100, "seconds": alone_s},
                {"config": "tli", "drafter": "d", "new_tokens": 100, "seconds": 1.0},
                {"config": "auto", "drafter": "d", "new_tokens": 100, "seconds": 0.9}]
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps({"meta": {"temperature": 1.0, "seed": i}, "results": rows}))
        return str(p)
    files = [run_file(0, 0.8), run_file(1, 0.8)]
    summary = _script("auto_summary")
    assert summary.main(files) == 0
    out = capsys.readouterr().out
    assert "(target alone 125.0 tok/s, auto 111.1)" in out and " 0.889 " in out
    assert summary.main(files + ["--fixed-only"]) == 0
    out = capsys.readouterr().out
    assert "(tli 100.0 tok/s, auto 111.1)" in out and " 1.111 " in out
    with pytest.raises(SystemExit, match="not a `crossdraft bench"):
        bad = tmp_path / "bad.json"
        bad.write_text("[]")
        summary.main([str(bad)])
