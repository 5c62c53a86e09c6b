"""Drafting ahead (`Drafter.draft_ahead`, `rounds.run_rounds(run_beside=...)`): while the verifier checks
a round, the drafter drafts the next one on the guess that every candidate is accepted and followed by
its own next token. It must change nothing but time: every round proposes exactly what it would have
proposed without it, however far the draft ahead got before the verdict came (all of it, some of it,
none, or it failed), and the output is the target alone's. Where the draft ahead is of target ids (same,
tli) and whole before the verdict, it is sent before the verdict, marked with the last id it guessed: the
verifier checks it as any round if the guess held, and answers it as stale otherwise.

The verifier here is in this process; the link says it `overlaps` (as the drafter service's Verify
stream does), and `run_beside` runs the draft ahead to the step the test chooses before the verdict is
read, the rest after the loop has asked it to stop: the timing of a real verdict, made deterministic.
The models are the float64 tiny Llamas of tests/conftest.py, so equal drafts are equal to the bit."""
from __future__ import annotations

from collections import deque

import pytest

from crossdraft import wire
from crossdraft.drafter import ALTERNATIVES
from crossdraft.rounds import LocalVerifier, run_rounds
from crossdraft.sampling import SamplingParams
from test_lossless_greedy import PROMPTS, make_engine, reference

MAX_NEW = 24


class Overlapping(LocalVerifier):
    """As drafter_service/link.py's RemoteVerifier: it `overlaps`, takes proposals before their verdicts are
    read (each verified as it comes, in order, as the verifier service does), and answers a stale one with
    an empty verdict, without a pass (verifier_service/server.py)."""
    overlaps = True

    def __init__(self, verifier):
        super().__init__(verifier)
        self.verdicts: deque = deque()
        self.stale = 0

    def submit(self, proposal) -> None:
        v = self.verifier
        if wire.stale(proposal, v.ids):
            self.stale += 1
            self.verdicts.append(wire.empty_verdict(len(v.ids)))
        else:
            self.verdicts.append(v.verify(proposal))

    def result(self):
        return self.verdicts.popleft()


class Partly:
    """A program beside the session, run `steps` forward steps at once (None: to its end); the rest when
    the loop asks for its result, by which time it has set the program's stop. `fail`: the program is
    made to raise there instead (a draft ahead that fails must cost only itself)."""

    failed = 0  # programs made to fail, over all

    def __init__(self, runner, program, steps, fail=False):
        self.runner, self.program, self.fail = runner, program, fail
        self.finished, self.step, self.callbacks = False, None, []
        try:
            step = next(program)
            n = 0
            while steps is None or n < steps:
                step = program.send(runner.forward_batch([step])[0])
                n += 1
            self.step = step
        except StopIteration:
            self.finished = True

    def add_done_callback(self, fn) -> None:
        if self.finished:
            fn(self)
        else:
            self.callbacks.append(fn)

    def result(self):
        if self.finished:
            return None
        self.finished = True
        try:
            return self._rest()
        finally:
            for fn in self.callbacks:
                fn(self)

    def _rest(self):
        if self.fail:
            Partly.failed += 1
            self.program.throw(RuntimeError("the drafter's pass failed"))
        try:
            step = self.step
            while True:
                step = self.program.send(self.runner.forward_batch([step])[0])
        except StopIteration:
            return None


def _session(models, pair, algorithm, prompt, beside=None, draft_tokens=None, links=None, alternatives=ALTERNATIVES):
    """(new ids, each round's proposal, the session's RoundStats) of one greedy session; `links` gets its link."""
    engine = make_engine(models, pair)
    engine.alternatives = alternatives
    v, params = engine.verifier, SamplingParams()
    prompt_ids = engine.target_vocab.encode_prompt(prompt)
    v.start(prompt_ids, MAX_NEW, params)
    d = engine.drafter(algorithm)
    d.start(prompt, prompt_ids, params)
    link = Overlapping(v) if beside is not None else LocalVerifier(v)
    if links is not None:
        links.append(link)
    run_beside = (lambda program: beside(engine.drafter_runner, program)) if beside is not None else None
    proposals, stats = [], None
    for r in run_rounds(link, {algorithm: d}, lambda dr, k: dr.propose(k), len(prompt_ids),
                        draft_tokens=draft_tokens, run_beside=run_beside):
        p = r.proposal
        proposals.append((p.seq, list(p.target_ids), p.text, p.eos))
        stats = r.stats
        if links is not None and p.after is not None:
            link.sent_ahead = getattr(link, "sent_ahead", 0) + 1
    return list(v.new_ids), proposals, stats


CASES = [("bpe/bpe", "same"), ("bpe/bpe", "slem"), ("bpe/bpe", "tli"), ("bpe/spm", "slem"), ("bpe/spm", "tli"),
         ("bpe/bpe_alt", "slem")]


@pytest.mark.parametrize("alternatives", [0, ALTERNATIVES])
@pytest.mark.parametrize("pair,algorithm", CASES)
def test_drafting_ahead_proposes_what_drafting_after_the_verdict_would(trained_models, pair, algorithm, alternatives):
    """Drafts ahead run whole before each verdict: same proposals, round by round, and the target's output;
    and the guess held often enough to be used (else this test would test nothing). With same and tli
    (target ids) the draft ahead is sent before the verdict: some of those rounds held, some went stale
    (without alternatives: a round with them sends nothing ahead, since its verdict may take one)."""
    used, links = 0, []
    for prompt in PROMPTS[:8]:
        ids, props, _ = _session(trained_models, pair, algorithm, prompt, alternatives=alternatives)
        ids2, props2, stats = _session(trained_models, pair, algorithm, prompt, links=links, alternatives=alternatives,
                                       beside=lambda runner, prog: Partly(runner, prog, None))
        assert ids2 == ids == reference(trained_models, pair, prompt).ids
        assert props2 == props
        used += stats.early
    assert used > 0, "no draft made ahead was ever used: the guess never held"
    held, stale = sum(getattr(x, "sent_ahead", 0) for x in links), sum(x.stale for x in links)
    if algorithm in ("same", "tli") and not alternatives:
        assert held > 0 and stale > 0, (held, stale)
    elif algorithm == "slem":  # the target length of a guessed text is not known, so it waits for the verdict
        assert held == stale == 0


@pytest.mark.parametrize("steps", [0, 1, 2, 4])
@pytest.mark.parametrize("pair,algorithm", [("bpe/bpe", "same"), ("bpe/spm", "slem")])
def test_a_verdict_that_comes_midway_leaves_the_drafts_unchanged(trained_models, pair, algorithm, steps):
    """The verdict comes after `steps` steps of the draft ahead: the next draft takes what was drafted ahead
    and goes on from there (or starts afresh); the proposals are the same as without drafting ahead."""
    for prompt in PROMPTS[:6]:
        ids, props, _ = _session(trained_models, pair, algorithm, prompt, draft_tokens=5)
        ids2, props2, _ = _session(trained_models, pair, algorithm, prompt, draft_tokens=5,
                                   beside=lambda runner, prog: Partly(runner, prog, steps))
        assert props2 == props and ids2 == ids


@pytest.mark.parametrize("steps", [1, 3])
def test_a_draft_ahead_that_fails_costs_only_itself(trained_models, steps):
    """Its pass fails after `steps` steps: the session goes on, and drafts and outputs what it would have."""
    Partly.failed = 0
    for prompt in PROMPTS[:4]:
        ids, props, _ = _session(trained_models, "bpe/bpe", "same", prompt)
        ids2, props2, _ = _session(trained_models, "bpe/bpe", "same", prompt,
                                   beside=lambda runner, prog: Partly(runner, prog, steps, fail=True))
        assert props2 == props and ids2 == ids
    assert Partly.failed > 0


def test_no_draft_ahead_over_a_link_that_does_not_overlap(trained_models):
    """In process the verifier's pass runs in the session's own thread: nothing to overlap, nothing run."""
    engine = make_engine(trained_models, "bpe/bpe")
    v, params = engine.verifier, SamplingParams()
    prompt_ids = engine.target_vocab.encode_prompt(PROMPTS[0])
    v.start(prompt_ids, MAX_NEW, params)
    d = engine.drafter("same")
    d.start(PROMPTS[0], prompt_ids, params)
    ran = []
    list(run_rounds(LocalVerifier(v), {"same": d}, lambda dr, k: dr.propose(k), len(prompt_ids),
                    run_beside=lambda program: ran.append(program)))
    assert ran == []
