from crossdraft.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPOSAL_KIND_UNSPECIFIED: _ClassVar[ProposalKind]
    PROPOSAL_KIND_TOKENS: _ClassVar[ProposalKind]
    PROPOSAL_KIND_TEXT: _ClassVar[ProposalKind]
PROPOSAL_KIND_UNSPECIFIED: ProposalKind
PROPOSAL_KIND_TOKENS: ProposalKind
PROPOSAL_KIND_TEXT: ProposalKind

class VerifierServiceGetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifierServiceGetInfoResponse(_message.Message):
    __slots__ = ("model_id", "tokenizer_fingerprint", "vocab_size", "algorithms", "max_context", "eos_ids", "device", "dtype", "active_sessions", "max_sessions", "cache")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    algorithms: _containers.RepeatedScalarFieldContainer[_common_pb2.Algorithm]
    max_context: int
    eos_ids: _containers.RepeatedScalarFieldContainer[int]
    device: str
    dtype: str
    active_sessions: int
    max_sessions: int
    cache: _common_pb2.CacheUsage
    def __init__(self, model_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., algorithms: _Optional[_Iterable[_Union[_common_pb2.Algorithm, str]]] = ..., max_context: _Optional[int] = ..., eos_ids: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., cache: _Optional[_Union[_common_pb2.CacheUsage, _Mapping]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("file_name", "offset", "data", "size", "tokenizer_fingerprint")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    data: bytes
    size: int
    tokenizer_fingerprint: str
    def __init__(self, file_name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class VerifyStart(_message.Message):
    __slots__ = ("session_id", "prompt_ids", "committed_ids", "params", "max_new_tokens", "algorithm", "prompt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    max_new_tokens: int
    algorithm: _common_pb2.Algorithm
    prompt: str
    def __init__(self, session_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., committed_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., algorithm: _Optional[_Union[_common_pb2.Algorithm, str]] = ..., prompt: _Optional[str] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("seq", "kind", "target_ids", "q_rows", "text", "eos", "drafted", "draft_ns", "after_id", "alternatives")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDS_FIELD_NUMBER: _ClassVar[int]
    Q_ROWS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: ProposalKind
    target_ids: _containers.RepeatedScalarFieldContainer[int]
    q_rows: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    text: bytes
    eos: bool
    drafted: int
    draft_ns: int
    after_id: int
    alternatives: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[ProposalKind, str]] = ..., target_ids: _Optional[_Iterable[int]] = ..., q_rows: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ..., text: _Optional[bytes] = ..., eos: _Optional[bool] = ..., drafted: _Optional[int] = ..., draft_ns: _Optional[int] = ..., after_id: _Optional[int] = ..., alternatives: _Optional[_Iterable[int]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("seq", "ids", "text", "candidates", "accepted", "finished", "finish_reason", "verify_ns", "bridge_ns", "seal", "load", "alternative")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_NS_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: bytes
    candidates: int
    accepted: int
    finished: bool
    finish_reason: _common_pb2.FinishReason
    verify_ns: int
    bridge_ns: int
    seal: bytes
    load: LoadHint
    alternative: bool
    def __init__(self, seq: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., text: _Optional[bytes] = ..., candidates: _Optional[int] = ..., accepted: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., verify_ns: _Optional[int] = ..., bridge_ns: _Optional[int] = ..., seal: _Optional[bytes] = ..., load: _Optional[_Union[LoadHint, _Mapping]] = ..., alternative: _Optional[bool] = ...) -> None: ...

class LoadHint(_message.Message):
    __slots__ = ("sequences_per_pass", "pass_fixed_ns", "pass_token_ns")
    SEQUENCES_PER_PASS_FIELD_NUMBER: _ClassVar[int]
    PASS_FIXED_NS_FIELD_NUMBER: _ClassVar[int]
    PASS_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    sequences_per_pass: float
    pass_fixed_ns: int
    pass_token_ns: int
    def __init__(self, sequences_per_pass: _Optional[float] = ..., pass_fixed_ns: _Optional[int] = ..., pass_token_ns: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("start", "proposal")
    START_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    start: VerifyStart
    proposal: Proposal
    def __init__(self, start: _Optional[_Union[VerifyStart, _Mapping]] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...
