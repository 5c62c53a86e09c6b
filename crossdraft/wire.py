"""The wire adapter: the core's dataclasses <-> the protobuf messages of `proto/crossdraft/v1`.

Owns: every conversion between the core's values (`protocol.Proposal`, `protocol.Verdict`,
`sampling.SamplingParams`, algorithm names, finish reasons, a generation's statistics, the start
of a Verify stream) and the generated messages of `crossdraft.v1`, both ways, and the validation
of what comes in from the wire. A message from the wire is untrusted: sizes are bounded before
anything is built from them (at most MAX_TARGET_IDS candidates, as many q rows of at most
MAX_Q_ENTRIES entries, MAX_TEXT_BYTES of text), ids must be non-negative, probabilities finite,
enums known; a violation raises `errors.InvalidArgument` with a one-line message (the services map
it to INVALID_ARGUMENT). Semantic checks that need the model (ids below the vocabulary size, q
summing to 1, staleness) stay with the verifier, which treats a bad proposal as one that ends
acceptance; `vocab_size` lets the verifier's service reject out-of-range q ids here already.

Other core modules import the generated code (`crossdraft.v1`) only where they speak gRPC themselves:
`client.py` (the gateway's messages, built from plain values), `crossdraft/serving/tokenizers.py`
(GetTokenizer) and `compose.py` (the services' stubs).

Never: imports grpc, opens channels, decides acceptance, or touches models.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import InvalidArgument
from .load import LoadHint
from .protocol import MAX_ALTERNATIVES, TEXT, TOKENS, Proposal, Verdict
from .sampling import SamplingParams
from .v1 import common_pb2, drafter_pb2, verifier_pb2

MAX_TARGET_IDS = 64  # candidates per proposal (the verifier's MAX_CANDIDATES)
MAX_Q_ENTRIES = 4096  # non-zero entries of one q row; a drafter with a larger support needs draft_top_k
MAX_TEXT_BYTES = 4096  # drafted text per TEXT proposal
MAX_VERDICT_IDS = MAX_TARGET_IDS + 1  # accepted candidates + the target's own token
MAX_VERDICT_TEXT_BYTES = 1 << 20  # the bytes of at most 65 tokens
MAX_PROMPT_TEXT_BYTES = 1 << 20  # VerifyStart.prompt
MAX_SEQUENCE_IDS = 1 << 20  # prompt or committed ids of one session (far above any context)
MAX_SESSION_ID = 128
_INT32 = 2**31
_SESSION_ID = re.compile(r"[A-Za-z0-9._-]+")

# --- enums ------------------------------------------------------------------------------------

_ALGORITHMS = {
    "auto": common_pb2.ALGORITHM_AUTO, "same": common_pb2.ALGORITHM_SAME, "tli": common_pb2.ALGORITHM_TLI,
    "slem": common_pb2.ALGORITHM_SLEM, "slrs": common_pb2.ALGORITHM_SLRS, "none": common_pb2.ALGORITHM_NONE,
}
_ALGORITHM_NAMES = {v: k for k, v in _ALGORITHMS.items()}
_ALGORITHM_NAMES[common_pb2.ALGORITHM_UNSPECIFIED] = "auto"  # not set in a request: auto

_FINISH_REASONS = {
    "": common_pb2.FINISH_REASON_UNSPECIFIED, "length": common_pb2.FINISH_REASON_LENGTH,
    "eos": common_pb2.FINISH_REASON_EOS, "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR, "stop": common_pb2.FINISH_REASON_STOP,
}
_FINISH_REASON_NAMES = {v: k for k, v in _FINISH_REASONS.items()}

_KINDS = {TOKENS: verifier_pb2.PROPOSAL_KIND_TOKENS, TEXT: verifier_pb2.PROPOSAL_KIND_TEXT}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


def algorithm_to_proto(name: str) -> int:
    """'auto', 'same', 'tli', 'slem', 'slrs', 'none' -> Algorithm enum value."""
    try:
        return _ALGORITHMS[name]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown algorithm {name!r}; choose one of {', '.join(_ALGORITHMS)}") from None


def algorithm_from_proto(value: int) -> str:
    """Algorithm enum value -> name; ALGORITHM_UNSPECIFIED -> 'auto'."""
    try:
        return _ALGORITHM_NAMES[value]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown algorithm enum value {value!r}") from None


def finish_reason_to_proto(reason: str) -> int:
    """'' (not finished), 'length', 'eos', 'cancelled', 'error', 'stop' -> FinishReason enum value."""
    try:
        return _FINISH_REASONS[reason]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown finish reason {reason!r}") from None


def finish_reason_from_proto(value: int) -> str:
    try:
        return _FINISH_REASON_NAMES[value]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown finish reason enum value {value!r}") from None


# --- sampling parameters ----------------------------------------------------------------------

def sampling_params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    params = params.validate()
    return common_pb2.SamplingParams(temperature=float(params.temperature), top_k=int(params.top_k),
                                     top_p=float(params.top_p), seed=int(params.seed))


def sampling_params_from_proto(msg: Optional[common_pb2.SamplingParams]) -> SamplingParams:
    """A message (or None: not set, greedy) -> validated SamplingParams; top_p not set means 1.0."""
    if msg is None:
        return SamplingParams()
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    return SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=top_p, seed=msg.seed).validate()


# --- proposal ---------------------------------------------------------------------------------

def _check_ids(ids, what: str, limit: int) -> None:
    """ids: a sequence of ints (not bools) in [0, 2^31), at most `limit` of them."""
    if len(ids) > limit:
        raise InvalidArgument(f"{what}: {len(ids)} ids, at most {limit} allowed")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidArgument(f"{what}: id {t!r} is not an integer")
        if not 0 <= t < _INT32:
            raise InvalidArgument(f"{what}: id {t} is out of range")


def _check_row(ids: torch.Tensor, probs: torch.Tensor, i: int, vocab_size: Optional[int]) -> None:
    what = f"q row {i}"
    if ids.dim() != 1 or probs.dim() != 1 or ids.shape[0] != probs.shape[0]:
        raise InvalidArgument(f"{what}: ids and probs must be two vectors of the same length "
                              f"({tuple(ids.shape)} and {tuple(probs.shape)})")
    if ids.shape[0] > MAX_Q_ENTRIES:
        raise InvalidArgument(f"{what}: {ids.shape[0]} entries, at most {MAX_Q_ENTRIES} allowed "
                              "(limit the drafter's support with draft_top_k)")
    if ids.dtype in (torch.bool,) or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise InvalidArgument(f"{what}: ids must be integers, got {ids.dtype}")
    if not probs.dtype.is_floating_point:
        raise InvalidArgument(f"{what}: probs must be floating point, got {probs.dtype}")
    if ids.numel():
        hi = vocab_size if vocab_size is not None else _INT32
        lo_id, hi_id = int(ids.min()), int(ids.max())
        if lo_id < 0 or hi_id >= hi:
            bad = lo_id if lo_id < 0 else hi_id
            raise InvalidArgument(f"{what}: id {bad} is out of range [0, {hi})")
        if not bool(torch.isfinite(probs).all()):
            raise InvalidArgument(f"{what}: probabilities must be finite")


def _check_shape(kind: str, n_ids: int, n_rows: int, text_len: int, eos: bool) -> None:
    if kind == TOKENS:
        if n_ids > MAX_TARGET_IDS:
            raise InvalidArgument(f"proposal: {n_ids} target ids, at most {MAX_TARGET_IDS} allowed")
        if n_rows and n_rows != n_ids:
            raise InvalidArgument(f"proposal: {n_rows} q rows for {n_ids} target ids (one per candidate, or none)")
        if text_len or eos:
            raise InvalidArgument("proposal: a TOKENS proposal carries no text and no eos flag")
    elif kind == TEXT:
        if text_len > MAX_TEXT_BYTES:
            raise InvalidArgument(f"proposal: {text_len} bytes of text, at most {MAX_TEXT_BYTES} allowed")
        if n_ids or n_rows:
            raise InvalidArgument("proposal: a TEXT proposal carries no target ids and no q")
    else:
        raise InvalidArgument(f"proposal: unknown kind {kind!r} (TOKENS or TEXT)")


def _check_counter(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {value!r}")
    return value


def validate_proposal(p: Proposal, vocab_size: Optional[int] = None) -> Proposal:
    """Check a Proposal's shape and values (bounds, types, finiteness); returns it unchanged."""
    _check_counter(p.seq, "proposal seq")
    _check_counter(p.drafted, "proposal drafted")
    _check_counter(p.draft_ns, "proposal draft_ns")
    if p.after is not None:
        _check_ids([p.after], "proposal after_id", 1)
    if (p.q_ids is None) != (p.q_probs is None):
        raise InvalidArgument("proposal: q_ids and q_probs must be both set or both unset")
    n_rows = len(p.q_ids) if p.q_ids is not None else 0
    if p.q_ids is not None and len(p.q_probs) != n_rows:
        raise InvalidArgument(f"proposal: {n_rows} q id rows but {len(p.q_probs)} q prob rows")
    if not isinstance(p.text, (bytes, bytearray)):
        raise InvalidArgument(f"proposal: text must be bytes, got {type(p.text).__name__}")
    _check_shape(p.kind, len(p.target_ids), n_rows, len(p.text), bool(p.eos))
    _check_ids(p.target_ids, "proposal target ids", MAX_TARGET_IDS)
    _check_alternatives(p.alternatives, p.kind, len(p.target_ids), n_rows)
    for i in range(n_rows):
        _check_row(torch.as_tensor(p.q_ids[i]), torch.as_tensor(p.q_probs[i]), i, vocab_size)
    return p


def _check_alternatives(alternatives, kind: str, n_ids: int, n_rows: int) -> None:
    _check_ids(alternatives, "proposal alternatives", MAX_ALTERNATIVES)
    if alternatives and (kind != TOKENS or not n_ids or n_rows):
        raise InvalidArgument("proposal: alternatives go with greedy TOKENS candidates only")


def proposal_to_proto(p: Proposal) -> verifier_pb2.Proposal:
    """Proposal -> message (validated: a drafter bug shows up on the drafter's side)."""
    validate_proposal(p)
    msg = verifier_pb2.Proposal(seq=p.seq, kind=_KINDS[p.kind], target_ids=p.target_ids, text=bytes(p.text),
                                eos=bool(p.eos), drafted=p.drafted, draft_ns=p.draft_ns, alternatives=p.alternatives)
    if p.after is not None:
        msg.after_id = p.after
    if p.q_ids is not None:
        for ids, probs in zip(p.q_ids, p.q_probs):
            row = msg.q_rows.add()
            row.ids.extend(torch.as_tensor(ids).tolist())
            row.probs.extend(torch.as_tensor(probs, dtype=torch.float64).tolist())
    return msg


def proposal_from_proto(msg: verifier_pb2.Proposal, vocab_size: Optional[int] = None) -> Proposal:
    """An untrusted message -> validated Proposal. q rows become (LongTensor ids, float64 probs) on
    the CPU, as the drafter makes them; no rows means greedy (q_ids = q_probs = None). With
    `vocab_size` (the verifier's), q ids must also be below it."""
    kind = _KIND_NAMES.get(msg.kind)
    if kind is None:
        raise InvalidArgument(f"proposal: kind must be PROPOSAL_KIND_TOKENS or PROPOSAL_KIND_TEXT, got {msg.kind}")
    _check_shape(kind, len(msg.target_ids), len(msg.q_rows), len(msg.text), msg.eos)  # before building anything
    target_ids = list(msg.target_ids)
    _check_ids(target_ids, "proposal target ids", MAX_TARGET_IDS)
    _check_alternatives(msg.alternatives, kind, len(target_ids), len(msg.q_rows))
    q_ids = q_probs = None
    if msg.q_rows:
        q_ids, q_probs = [], []
        for i, row in enumerate(msg.q_rows):
            if len(row.ids) > MAX_Q_ENTRIES or len(row.probs) > MAX_Q_ENTRIES:
                raise InvalidArgument(f"q row {i}: {max(len(row.ids), len(row.probs))} entries, "
                                      f"at most {MAX_Q_ENTRIES} allowed (limit the drafter's support with draft_top_k)")
            ids = torch.tensor(list(row.ids), dtype=torch.long)
            probs = torch.tensor(list(row.probs), dtype=torch.float64)
            _check_row(ids, probs, i, vocab_size)
            q_ids.append(ids)
            q_probs.append(probs)
    return Proposal(seq=msg.seq, kind=kind, target_ids=target_ids, q_ids=q_ids, q_probs=q_probs,
                    text=bytes(msg.text), eos=msg.eos, drafted=msg.drafted, draft_ns=msg.draft_ns,
                    after=msg.after_id if msg.HasField("after_id") else None, alternatives=list(msg.alternatives))


# --- verdict ----------------------------------------------------------------------------------

def _check_verdict(seq, ids, text_len, candidates, accepted, finished, finish_reason) -> None:
    for value, what in ((seq, "verdict seq"), (candidates, "verdict candidates"), (accepted, "verdict accepted")):
        _check_counter(value, what)
    _check_ids(ids, "verdict ids", MAX_VERDICT_IDS)
    if text_len > MAX_VERDICT_TEXT_BYTES:
        raise InvalidArgument(f"verdict: {text_len} bytes of text, at most {MAX_VERDICT_TEXT_BYTES} allowed")
    if candidates > MAX_TARGET_IDS or accepted > candidates:
        raise InvalidArgument(f"verdict: {accepted} accepted of {candidates} candidates")
    if len(ids) > accepted + 1:
        raise InvalidArgument(f"verdict: {len(ids)} ids for {accepted} accepted candidates (at most accepted + 1)")
    if bool(finish_reason) != bool(finished):
        raise InvalidArgument(f"verdict: finish reason {finish_reason!r} with finished={finished}")


def verdict_to_proto(v: Verdict) -> verifier_pb2.Verdict:
    reason = finish_reason_to_proto(v.finish_reason)
    _check_verdict(v.seq, v.ids, len(v.text), v.candidates, v.accepted, v.finished, v.finish_reason)
    msg = verifier_pb2.Verdict(seq=v.seq, ids=v.ids, text=bytes(v.text), candidates=v.candidates,
                               accepted=v.accepted, finished=bool(v.finished), finish_reason=reason,
                               verify_ns=v.verify_ns, bridge_ns=v.bridge_ns, alternative=bool(v.alternative))
    if v.load is not None:
        msg.load.CopyFrom(load_to_proto(v.load))
    return msg


def load_to_proto(h: LoadHint) -> verifier_pb2.LoadHint:
    return verifier_pb2.LoadHint(sequences_per_pass=h.sequences, pass_fixed_ns=_ns(h.fixed_s),
                                 pass_token_ns=_ns(h.token_s))


def load_from_proto(msg: verifier_pb2.LoadHint) -> Optional[LoadHint]:
    """A verifier's load hint, or None when it is missing or not plausible (it only tunes speed)."""
    seqs = msg.sequences_per_pass
    if not (math.isfinite(seqs) and 0.0 < seqs <= 1e6) or msg.pass_fixed_ns > 10**12 or msg.pass_token_ns > 10**12:
        return None
    return LoadHint(sequences=seqs, fixed_s=msg.pass_fixed_ns / 1e9, token_s=msg.pass_token_ns / 1e9)


def cache_usage_to_proto(u: dict) -> common_pb2.CacheUsage:
    """`BatchedModel.usage()` -> the GetInfo message."""
    return common_pb2.CacheUsage(
        budget_bytes=u["budget_bytes"], reserved_bytes=u["reserved_bytes"], allocated_bytes=u["allocated_bytes"],
        queued_sessions=u["queued"], refused_sessions=u["refused"], max_batch_tokens=u["max_batch_tokens"],
        sequences_per_pass=u.get("sequences_per_pass", 0.0), passes=u["passes"], max_model_len=u["max_model_len"],
        parked_sessions=u.get("parked", 0), dtype=u.get("kv_dtype", ""))


def verdict_from_proto(msg: verifier_pb2.Verdict) -> Verdict:
    """A message -> validated Verdict (the drafter does not trust the network either)."""
    reason = finish_reason_from_proto(msg.finish_reason)
    ids = list(msg.ids)
    _check_verdict(msg.seq, ids, len(msg.text), msg.candidates, msg.accepted, msg.finished, reason)
    return Verdict(seq=msg.seq, ids=ids, text=bytes(msg.text), candidates=msg.candidates, accepted=msg.accepted,
                   finished=msg.finished, finish_reason=reason, verify_ns=msg.verify_ns, bridge_ns=msg.bridge_ns,
                   alternative=msg.alternative, load=load_from_proto(msg.load) if msg.HasField("load") else None)


def stale(proposal: Proposal, ids: list) -> bool:
    """Whether a proposal was drafted after something other than `ids`, the committed ids: another committed
    length, or (drafted ahead) another last id."""
    return proposal.seq != len(ids) or (proposal.after is not None and (not ids or ids[-1] != proposal.after))


def empty_verdict(seq: int) -> Verdict:
    """The verifier's answer to a stale proposal: nothing committed, `seq` the current committed length."""
    return Verdict(seq=seq, ids=[], text=b"", candidates=0, accepted=0)


# --- the start of a Verify stream -------------------------------------------------------------

@dataclass
class SessionStart:
    """The first message of a Verify stream (`VerifyStart`), as plain values."""

    session_id: str
    prompt_ids: list  # target ids, not empty
    committed_ids: list = field(default_factory=list)  # generated target ids committed so far (resume)
    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 128  # in the whole session, committed_ids included
    algorithm: str = "none"  # resolved: same, tli, slem or none (never auto)
    prompt: str = ""  # the prompt as text, when prompt_ids is empty (the verifier encodes it)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.committed_ids)


def check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not 1 <= len(session_id) <= MAX_SESSION_ID \
            or not _SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(f"session id must be 1 to {MAX_SESSION_ID} ASCII letters, digits, '-', '_' "
                              f"or '.', got {session_id!r}")
    return session_id


def _check_start(s: SessionStart) -> SessionStart:
    check_session_id(s.session_id)
    if not s.prompt_ids and not s.prompt:
        raise InvalidArgument("the prompt is empty")
    if len(s.prompt.encode("utf-8")) > MAX_PROMPT_TEXT_BYTES:
        raise InvalidArgument(f"the prompt text is more than {MAX_PROMPT_TEXT_BYTES} bytes")
    _check_ids(s.prompt_ids, "prompt ids", MAX_SEQUENCE_IDS)
    _check_ids(s.committed_ids, "committed ids", MAX_SEQUENCE_IDS)
    if isinstance(s.max_new_tokens, bool) or not isinstance(s.max_new_tokens, int) \
            or not len(s.committed_ids) < s.max_new_tokens <= MAX_SEQUENCE_IDS:
        raise InvalidArgument(f"max_new_tokens must be more than the {len(s.committed_ids)} ids committed "
                              f"(and at most {MAX_SEQUENCE_IDS}), got {s.max_new_tokens!r}")
    if s.algorithm == "auto" or s.algorithm not in _ALGORITHMS:
        raise InvalidArgument(f"a Verify stream needs a resolved algorithm (same, tli, slem, slrs or none), "
                              f"got {s.algorithm!r}")
    s.params.validate()
    return s


def start_to_proto(s: SessionStart) -> verifier_pb2.VerifyStart:
    _check_start(s)
    return verifier_pb2.VerifyStart(session_id=s.session_id, prompt_ids=s.prompt_ids, committed_ids=s.committed_ids,
                                    params=sampling_params_to_proto(s.params), max_new_tokens=s.max_new_tokens,
                                    algorithm=_ALGORITHMS[s.algorithm], prompt=s.prompt)


def start_from_proto(msg: verifier_pb2.VerifyStart) -> SessionStart:
    """An untrusted VerifyStart -> validated SessionStart (the verifier checks ids against its vocabulary
    and the context length when it starts the session)."""
    if len(msg.prompt_ids) > MAX_SEQUENCE_IDS or len(msg.committed_ids) > MAX_SEQUENCE_IDS:
        raise InvalidArgument(f"a session holds at most {MAX_SEQUENCE_IDS} prompt and committed ids")
    params = sampling_params_from_proto(msg.params if msg.HasField("params") else None)
    return _check_start(SessionStart(session_id=msg.session_id, prompt_ids=list(msg.prompt_ids),
                                     committed_ids=list(msg.committed_ids), params=params,
                                     max_new_tokens=msg.max_new_tokens,
                                     algorithm=algorithm_from_proto(msg.algorithm),
                                     prompt=msg.prompt if not msg.prompt_ids else ""))


# --- statistics -------------------------------------------------------------------------------

def _ns(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9))) if math.isfinite(seconds) else 0


def stats_to_proto(result, network_ns: int = 0) -> common_pb2.Stats:
    """A `engine.GenerationResult` (or anything with its attributes) -> Stats."""
    prof = result.profile or {}
    return common_pb2.Stats(
        new_tokens=result.new_tokens, rounds=result.rounds, draft_tokens=result.draft_tokens,
        accepted_tokens=result.accepted_tokens, drafted=result.drafted,
        accepted_counts_by_position=list(result.accepted_by_position),
        draft_ns=_ns(prof.get("draft_s", 0.0)), verify_ns=_ns(prof.get("verify_s", 0.0)),
        bridge_ns=_ns(prof.get("bridge_s", 0.0)), network_ns=network_ns, total_ns=_ns(result.seconds))


def stats_from_proto(msg: common_pb2.Stats) -> dict:
    """Stats -> a dict with the core's names (GenerationResult's fields; timings in seconds under `profile`)."""
    return {
        "new_tokens": msg.new_tokens, "rounds": msg.rounds, "draft_tokens": msg.draft_tokens,
        "accepted_tokens": msg.accepted_tokens, "drafted": msg.drafted,
        "accepted_by_position": list(msg.accepted_counts_by_position), "seconds": msg.total_ns / 1e9,
        "profile": {"draft_s": msg.draft_ns / 1e9, "verify_s": msg.verify_ns / 1e9,
                    "bridge_s": msg.bridge_ns / 1e9, "network_s": msg.network_ns / 1e9},
    }


def session_request(verifier_address: str, prompt: str, max_new_tokens: int = 128,
                    params: SamplingParams = SamplingParams(), algorithm: str = "auto",
                    draft_tokens: Optional[int] = None, session_id: str = "", prompt_ids=None,
                    committed_ids=None, resume_draft_tokens: int = 0,
                    may_hand_back: bool = False) -> drafter_pb2.RunSessionRequest:
    """The DrafterService.RunSession request for a session (or, with committed_ids, its resumption): what
    the gateway sends a drafter."""
    return drafter_pb2.RunSessionRequest(
        session_id=session_id, verifier_address=verifier_address, prompt=prompt, prompt_ids=prompt_ids or [],
        committed_ids=committed_ids or [], params=sampling_params_to_proto(params),
        algorithm=algorithm_to_proto(algorithm), max_new_tokens=max_new_tokens, draft_tokens=draft_tokens or 0,
        resume_draft_tokens=resume_draft_tokens or 0, may_hand_back=may_hand_back)
