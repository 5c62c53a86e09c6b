"""The verifier is the trust boundary: a hostile or buggy proposal can cost acceptance, never change output.

Each round below feeds the Verifier a malformed proposal and checks that what it commits is exactly
what the target alone commits at that position (greedy: the argmax; sampling: the target's own draw,
which uses the same uniform as the target alone).
"""
from __future__ import annotations

import math

import pytest
import torch

from crossdraft.protocol import TEXT, TOKENS, Proposal
from crossdraft.sampling import SamplingParams
from crossdraft.verifier import Verifier
from crossdraft.vocab import Vocab
from helpers import TableRunner, hashed_logits, longest_match_encoder

TOKENS_T = ["a", "b", "ab", " ", "ba", "c", None]  # id 6: EOS
V = len(TOKENS_T)
EOS = 6


def target_fn(ctx):
    x = hashed_logits(ctx, V, salt=11)
    x[EOS] = -1e9  # never ends: every round commits
    return x


def vocab():
    return Vocab.from_tokens(TOKENS_T, longest_match_encoder(TOKENS_T), [EOS])


def reference(params, n):
    """The target alone: n tokens after the prompt."""
    v = Verifier(TableRunner(target_fn, V, 64), vocab())
    v.start([0, 1], n, params)
    while not v.finished:
        v.step()
    return v.new_ids


def hostile_proposals(seq):
    t = torch.tensor
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[V + 5, 1, 2])  # out of range
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[-1])
    yield Proposal(seq=seq, kind=TOKENS, target_ids=["a", 1])  # not an int
    yield Proposal(seq=seq + 3, kind=TOKENS, target_ids=[1, 2, 3])  # stale
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1] * 500)  # far too many
    nan = t([math.nan, 1.0], dtype=torch.float64)
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1], q_ids=[t([1, 2])], q_probs=[nan])
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1], q_ids=[t([1, 2])], q_probs=[t([5.0, 3.0], dtype=torch.float64)])
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1], q_ids=[t([1, 2])], q_probs=[t([1.5, -0.5], dtype=torch.float64)])
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1], q_ids=[t([2])], q_probs=[t([1.0], dtype=torch.float64)])  # q(c)=0
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1, 2, 3], q_ids=[t([1])], q_probs=[t([1.0], dtype=torch.float64)])  # q too short
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1], q_ids=[t([1])], q_probs=[t([1e-300], dtype=torch.float64)])  # tiny q: "accept"
    lie = t([1e-12, 1 - 1e-12], dtype=torch.float64)  # normalised, but c=1 is not what it draws
    yield Proposal(seq=seq, kind=TOKENS, target_ids=[1, 1, 1], q_ids=[t([1, 2])] * 3, q_probs=[lie] * 3)
    yield Proposal(seq=seq, kind=TEXT, text=b"\xff\xfe\x00garbage" * 1000, eos=True)
    yield Proposal(seq=seq, kind=TEXT, text="é".encode()[:1])  # half a character
    yield Proposal(seq=seq, kind="nonsense")


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=7)], ids=["greedy", "sampling"])
def test_hostile_proposals_cannot_change_the_output(params):
    n = 40
    ref = reference(params, n)
    v = Verifier(TableRunner(target_fn, V, 64), vocab())
    v.start([0, 1], n, params)
    props = list(hostile_proposals(0))
    i = 0
    while not v.finished:
        p = props[i % len(props)]
        p.seq = len(v.ids) + (3 if i % len(props) == 3 else 0)
        verdict = v.verify(p)
        assert verdict.ids, "every round commits at least the target's own token"
        i += 1
    # every proposal above is refused or out-voted, so each position is the target alone's own
    # choice: the argmax, or under sampling the target's draw with the target alone's uniform
    assert v.new_ids == ref
