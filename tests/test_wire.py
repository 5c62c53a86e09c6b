"""crossdraft.wire: the core's dataclasses <-> protobuf messages, both ways.

Round trips are exact field by field; untrusted input (oversized, garbage, unknown enums) raises
InvalidArgument; and a generation whose every Proposal and Verdict goes through
dataclass -> message -> bytes -> message -> dataclass is identical to the in-process one."""
from __future__ import annotations

import math

import pytest
import torch

from crossdraft import wire
from crossdraft.engine import ALGORITHMS, Engine
from crossdraft.errors import InvalidArgument
from crossdraft.protocol import TEXT, TOKENS, Proposal, Verdict
from crossdraft.runner import make_runner
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import common_pb2, verifier_pb2
from crossdraft.verifier import MAX_CANDIDATES
from crossdraft.vocab import Vocab
from helpers import TableRunner, hashed_logits, longest_match_encoder, vocab


def over_bytes(msg):
    """Serialize and parse again, as the network would."""
    return type(msg).FromString(msg.SerializeToString())


def assert_proposals_equal(a: Proposal, b: Proposal):
    assert (a.seq, a.kind, list(a.target_ids), bytes(a.text), a.eos, a.drafted, a.draft_ns) == \
           (b.seq, b.kind, list(b.target_ids), bytes(b.text), b.eos, b.drafted, b.draft_ns)
    assert all(type(t) is int for t in b.target_ids)
    if not a.q_ids:  # None, or [] with no candidates: both mean "no q" on the wire
        assert not b.q_ids and not b.q_probs
        return
    assert len(a.q_ids) == len(b.q_ids) == len(a.q_probs) == len(b.q_probs)
    for ai, bi, ap, bp in zip(a.q_ids, b.q_ids, a.q_probs, b.q_probs):
        assert bi.dtype == torch.long and bp.dtype == torch.float64
        assert torch.equal(torch.as_tensor(ai).long(), bi)
        assert torch.equal(torch.as_tensor(ap, dtype=torch.float64), bp)  # bit for bit: doubles on the wire


def proposal_round_trip(p: Proposal, **kw) -> Proposal:
    return wire.proposal_from_proto(over_bytes(wire.proposal_to_proto(p)), **kw)


def verdict_round_trip(v: Verdict) -> Verdict:
    return wire.verdict_from_proto(over_bytes(wire.verdict_to_proto(v)))


def q_row(ids, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(len(ids), generator=g, dtype=torch.float64)
    return torch.tensor(ids, dtype=torch.long), p / p.sum()


# --- round trips ---------------------------------------------------------------------------------

def test_tokens_proposal_greedy():
    p = Proposal(seq=17, kind=TOKENS, target_ids=[5, 0, 2**31 - 1], drafted=3, draft_ns=123456789)
    b = proposal_round_trip(p)
    assert_proposals_equal(p, b)
    assert b.q_ids is None and b.q_probs is None


def test_tokens_proposal_with_q():
    rows = [q_row([3, 1, 4, 1], 0), q_row(list(range(4096)), 1), q_row([7], 2)]  # a repeated id is allowed
    p = Proposal(seq=2, kind=TOKENS, target_ids=[3, 9, 7], q_ids=[r[0] for r in rows],
                 q_probs=[r[1] for r in rows], drafted=3, draft_ns=1)
    assert_proposals_equal(p, proposal_round_trip(p))
    assert_proposals_equal(p, proposal_round_trip(p, vocab_size=4096))
    p.q_probs[0][0] = 0.1 + 0.2  # doubles survive exactly, not as floats
    assert float(proposal_round_trip(p).q_probs[0][0]) == 0.1 + 0.2


def test_text_proposal_with_eos():
    text = "x = 1  # é🙂".encode()[:-1]  # may end inside a character
    p = Proposal(seq=40, kind=TEXT, text=text, eos=True, drafted=6, draft_ns=99)
    b = proposal_round_trip(p)
    assert_proposals_equal(p, b)
    assert b.text == text and b.eos is True and b.target_ids == []


def test_empty_proposals():
    for p in (Proposal(seq=0, kind=TOKENS), Proposal(seq=5, kind=TEXT)):
        assert_proposals_equal(p, proposal_round_trip(p))


@pytest.mark.parametrize("finished,reason", [(False, ""), (True, "length"), (True, "eos")])
def test_verdict(finished, reason):
    v = Verdict(seq=12, ids=[4, 8, 15], text="ab\xe9".encode()[:-1], candidates=5, accepted=2,
                finished=finished, finish_reason=reason, verify_ns=10**12, bridge_ns=7)
    b = verdict_round_trip(v)
    assert b == v  # dataclass equality: every field
    assert all(type(t) is int for t in b.ids)


def test_empty_verdict_for_a_stale_proposal():
    v = wire.empty_verdict(31)
    assert verdict_round_trip(v) == v and v.ids == [] and v.candidates == 0 and v.seq == 31


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=2**63 - 1),
                                    SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=100.0, top_p=1e-9)])
def test_sampling_params(params):
    assert wire.sampling_params_from_proto(over_bytes(wire.sampling_params_to_proto(params))) == params


def test_sampling_params_defaults():
    assert wire.sampling_params_from_proto(None) == SamplingParams()
    assert wire.sampling_params_from_proto(common_pb2.SamplingParams()) == SamplingParams()  # top_p unset: 1.0
    assert wire.sampling_params_from_proto(common_pb2.SamplingParams(temperature=1.0, seed=9)).top_p == 1.0


@pytest.mark.parametrize("msg", [common_pb2.SamplingParams(top_p=0.0), common_pb2.SamplingParams(top_p=1.5),
                                 common_pb2.SamplingParams(temperature=-1.0), common_pb2.SamplingParams(temperature=math.nan),
                                 common_pb2.SamplingParams(temperature=math.inf), common_pb2.SamplingParams(seed=2**63)])
def test_bad_sampling_params(msg):
    with pytest.raises(InvalidArgument):
        wire.sampling_params_from_proto(over_bytes(msg))


def test_algorithms():
    for name in ALGORITHMS:
        value = wire.algorithm_to_proto(name)
        assert wire.algorithm_from_proto(value) == name
        assert common_pb2.Algorithm.Name(value) == "ALGORITHM_" + name.upper()
    assert wire.algorithm_from_proto(common_pb2.ALGORITHM_UNSPECIFIED) == "auto"
    assert set(common_pb2.Algorithm.values()) == {common_pb2.ALGORITHM_UNSPECIFIED} | {wire.algorithm_to_proto(a) for a in ALGORITHMS}
    with pytest.raises(InvalidArgument, match="unknown algorithm"):
        wire.algorithm_to_proto("medusa")
    with pytest.raises(InvalidArgument):
        wire.algorithm_from_proto(99)  # proto3 enums are open: an unknown number parses


def test_finish_reasons():
    for name in ("", "length", "eos", "cancelled", "error"):
        assert wire.finish_reason_from_proto(wire.finish_reason_to_proto(name)) == name
    with pytest.raises(InvalidArgument):
        wire.finish_reason_from_proto(42)


def test_session_start():
    s = wire.SessionStart("sess-1.a_B", [1, 2, 3], [4, 5], SamplingParams(temperature=1.0, seed=7), 20, "tli")
    b = wire.start_from_proto(over_bytes(wire.start_to_proto(s)))
    assert b == s and b.remaining == 18
    msg = over_bytes(wire.start_to_proto(s))
    msg.ClearField("params")
    assert wire.start_from_proto(msg).params == SamplingParams()


@pytest.mark.parametrize("change", [dict(session_id=""), dict(session_id="a b"), dict(session_id="x" * 129),
                                    dict(prompt_ids=[]), dict(max_new_tokens=0), dict(max_new_tokens=2),
                                    dict(algorithm=common_pb2.ALGORITHM_AUTO), dict(algorithm=common_pb2.ALGORITHM_UNSPECIFIED),
                                    dict(algorithm=77)])
def test_bad_session_start(change):
    fields = dict(session_id="s", prompt_ids=[1, 2], committed_ids=[3, 4], max_new_tokens=8,
                  algorithm=common_pb2.ALGORITHM_SLEM)
    fields.update(change)
    with pytest.raises(InvalidArgument):
        wire.start_from_proto(over_bytes(verifier_pb2.VerifyStart(**fields)))


def test_stats():
    class Result:  # the attributes of engine.GenerationResult that Stats carries
        new_tokens, rounds, draft_tokens, accepted_tokens, drafted = 30, 9, 40, 21, 44
        accepted_by_position = [8, 6, 4, 2, 1]
        seconds = 0.25
        profile = {"draft_s": 0.1, "verify_s": 0.12, "bridge_s": 0.001, "other_s": 0.029}

    m = over_bytes(wire.stats_to_proto(Result, network_ns=5000))
    assert (m.new_tokens, m.rounds, m.draft_tokens, m.accepted_tokens, m.drafted) == (30, 9, 40, 21, 44)
    assert list(m.accepted_counts_by_position) == [8, 6, 4, 2, 1]
    assert (m.draft_ns, m.verify_ns, m.bridge_ns, m.network_ns, m.total_ns) == (100_000_000, 120_000_000, 1_000_000, 5000, 250_000_000)
    d = wire.stats_from_proto(m)
    assert d["accepted_by_position"] == [8, 6, 4, 2, 1] and d["seconds"] == 0.25 and d["profile"]["verify_s"] == 0.12


def test_limits_match_the_verifier():
    assert wire.MAX_TARGET_IDS == MAX_CANDIDATES


# --- validation of untrusted input ---------------------------------------------------------------

def tokens_msg(**kw):
    return verifier_pb2.Proposal(seq=1, kind=verifier_pb2.PROPOSAL_KIND_TOKENS, **kw)


def row(ids, probs):
    return verifier_pb2.SparseDistribution(ids=ids, probs=probs)


BAD_MESSAGES = {
    "no kind": verifier_pb2.Proposal(seq=1, target_ids=[1]),
    "unknown kind": verifier_pb2.Proposal(seq=1, kind=9),
    "65 target ids": tokens_msg(target_ids=[1] * 65),
    "negative target id": tokens_msg(target_ids=[1, -2]),
    "q rows without candidates": tokens_msg(q_rows=[row([1], [1.0])]),
    "fewer q rows than candidates": tokens_msg(target_ids=[1, 2], q_rows=[row([1], [1.0])]),
    "65 q rows": tokens_msg(target_ids=[1] * 65, q_rows=[row([1], [1.0])] * 65),
    "4097 q entries": tokens_msg(target_ids=[1], q_rows=[row(list(range(4097)), [1 / 4097] * 4097)]),
    "4097 q probs": tokens_msg(target_ids=[1], q_rows=[row([1], [1.0] * 4097)]),
    "ids and probs of different lengths": tokens_msg(target_ids=[1], q_rows=[row([1, 2], [1.0])]),
    "nan prob": tokens_msg(target_ids=[1], q_rows=[row([1, 2], [math.nan, 1.0])]),
    "inf prob": tokens_msg(target_ids=[1], q_rows=[row([1], [math.inf])]),
    "negative q id": tokens_msg(target_ids=[1], q_rows=[row([-1], [1.0])]),
    "text on tokens": tokens_msg(target_ids=[1], text=b"x"),
    "eos on tokens": tokens_msg(eos=True),
    "text too long": verifier_pb2.Proposal(kind=verifier_pb2.PROPOSAL_KIND_TEXT, text=b"a" * 4097),
    "ids on text": verifier_pb2.Proposal(kind=verifier_pb2.PROPOSAL_KIND_TEXT, text=b"a", target_ids=[1]),
}


@pytest.mark.parametrize("name", BAD_MESSAGES)
def test_bad_proposal_messages(name):
    with pytest.raises(InvalidArgument) as e:
        wire.proposal_from_proto(over_bytes(BAD_MESSAGES[name]))
    assert "\n" not in str(e.value) and str(e.value)


def test_q_ids_beyond_the_vocabulary():
    msg = tokens_msg(target_ids=[1], q_rows=[row([1, 50], [0.5, 0.5])])
    wire.proposal_from_proto(msg)  # the vocabulary size is unknown here: only the verifier can tell
    with pytest.raises(InvalidArgument, match="out of range"):
        wire.proposal_from_proto(msg, vocab_size=50)


def test_limits_are_inclusive():
    ok = tokens_msg(target_ids=[1] * 64, q_rows=[row(list(range(4096)), [1 / 4096] * 4096)] * 64)
    assert len(wire.proposal_from_proto(over_bytes(ok)).q_ids) == 64
    assert len(wire.proposal_from_proto(verifier_pb2.Proposal(kind=verifier_pb2.PROPOSAL_KIND_TEXT, text=b"a" * 4096)).text) == 4096


def test_garbage_bytes_do_not_parse_into_a_proposal():
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        verifier_pb2.Proposal.FromString(b"\xff\xff\xff\xff")
    # bytes that happen to parse still go through validation
    with pytest.raises(InvalidArgument):
        wire.proposal_from_proto(verifier_pb2.Proposal.FromString(b"\x10\x07"))  # kind = 7


@pytest.mark.parametrize("p", [
    Proposal(seq=0, kind="tree"),
    Proposal(seq=-1, kind=TOKENS),
    Proposal(seq=0, kind=TOKENS, target_ids=[1.5]),
    Proposal(seq=0, kind=TOKENS, target_ids=[True]),
    Proposal(seq=0, kind=TOKENS, target_ids=[2**31]),
    Proposal(seq=0, kind=TOKENS, target_ids=[1], q_ids=[torch.tensor([1])], q_probs=None),
    Proposal(seq=0, kind=TOKENS, target_ids=[1], q_ids=[torch.tensor([1.0])], q_probs=[torch.tensor([1.0])]),
    Proposal(seq=0, kind=TEXT, text="str, not bytes"),
])
def test_bad_outgoing_proposals(p):
    with pytest.raises(InvalidArgument):
        wire.proposal_to_proto(p)


@pytest.mark.parametrize("fields", [dict(ids=[1] * 66, candidates=64, accepted=64), dict(ids=[1, 2, 3], candidates=5, accepted=1),
                                    dict(candidates=3, accepted=4), dict(candidates=65, accepted=0),
                                    dict(ids=[-1], candidates=0), dict(finished=True),
                                    dict(finish_reason=common_pb2.FINISH_REASON_EOS), dict(finish_reason=17)])
def test_bad_verdict_messages(fields):
    with pytest.raises(InvalidArgument):
        wire.verdict_from_proto(over_bytes(verifier_pb2.Verdict(seq=3, **fields)))


# --- end to end: a generation through the wire ---------------------------------------------------

def through_the_wire(engine: Engine) -> dict:
    """Make every Proposal and Verdict of `engine` cross the wire (both ways, as bytes), checking on
    the way that nothing changed. Returns the counters of what crossed."""
    v = engine.verifier
    in_process = v.round
    crossed = {"proposals": 0, "q_rows": 0, "text": 0}

    def round_(proposal):  # (a round is a program: see crossdraft/scheduler.py)
        if proposal is not None:
            wired = wire.proposal_from_proto(verifier_pb2.Proposal.FromString(
                wire.proposal_to_proto(proposal).SerializeToString()), vocab_size=v.runner.vocab_size)
            assert_proposals_equal(proposal, wired)
            crossed["proposals"] += 1
            crossed["q_rows"] += len(wired.q_ids or [])
            crossed["text"] += len(wired.text)
            proposal = wired
        verdict = yield from in_process(proposal)
        wired = wire.verdict_from_proto(verifier_pb2.Verdict.FromString(wire.verdict_to_proto(verdict).SerializeToString()))
        assert wired == verdict
        return wired

    v.round = round_
    return crossed


def same_result(a, b):
    assert (a.text, a.ids, a.algorithm, a.rounds, a.draft_tokens, a.accepted_tokens, a.drafted, a.finish_reason,
            a.accepted_by_position) == \
           (b.text, b.ids, b.algorithm, b.rounds, b.draft_tokens, b.accepted_tokens, b.drafted, b.finish_reason,
            b.accepted_by_position)


T_TOKENS = ["a", "b", "ab", " ", None]  # the toy pair of test_engine_errors.py; id 4: EOS
D_TOKENS = ["a", "b", "ba", " ", None]


def never_eos(ctx):
    x = hashed_logits(ctx, 5, salt=3, scale=1.0)
    x[4] = -1e9  # the target never ends, so every generation runs its 40 tokens (the drafter may draft EOS)
    return x


def toy_engine():
    toy = lambda tokens: Vocab.from_tokens(tokens, longest_match_encoder(tokens), [4])
    return Engine(TableRunner(never_eos, 5, 64), toy(T_TOKENS),
                  TableRunner(lambda c: hashed_logits(c, 5, salt=3, scale=1.2) + 0.3 * hashed_logits(c, 5, salt=4), 5, 64),
                  toy(D_TOKENS))


PARAMS = {"greedy": SamplingParams(), "sampling": SamplingParams(temperature=1.0, seed=11),
          "top-k/top-p": SamplingParams(temperature=0.8, top_k=3, top_p=0.9, seed=5)}


@pytest.mark.parametrize("params", PARAMS, ids=list(PARAMS))
@pytest.mark.parametrize("algorithm", ["tli", "slem", "none"])
def test_toy_generation_through_the_wire(algorithm, params):
    for draft_tokens in (None, 3):
        ref = toy_engine().generate("ab a", 40, PARAMS[params], algorithm, draft_tokens)
        e = toy_engine()
        crossed = through_the_wire(e)
        got = e.generate("ab a", 40, PARAMS[params], algorithm, draft_tokens)
        same_result(ref, got)
        assert got.new_tokens == 40
        if algorithm != "none":
            assert crossed["proposals"] == got.rounds and got.accepted_tokens > 0
            assert (crossed["q_rows"] > 0) == (algorithm == "tli" and params != "greedy")
            assert (crossed["text"] > 0) == (algorithm == "slem")


@pytest.mark.parametrize("params", ["greedy", "sampling"])
@pytest.mark.parametrize("algorithm", ["tli", "slem"])
def test_tiny_llama_generation_through_the_wire(trained_models, algorithm, params):
    """Tiny trained Llama models with different tokenizers (byte-level BPE target, SentencePiece-style
    drafter): the output through the wire is identical, token for token and round for round."""
    def engine():
        return Engine(make_runner(trained_models["bpe"], 256), vocab("bpe"),
                      make_runner(trained_models["spm"], 256), vocab("spm"))

    prompt = "class Parser:\n    def get_value(self"
    ref = engine().generate(prompt, 32, PARAMS[params], algorithm)
    e = engine()
    crossed = through_the_wire(e)
    got = e.generate(prompt, 32, PARAMS[params], algorithm)
    same_result(ref, got)
    assert crossed["proposals"] == got.rounds and got.accepted_tokens > 0
