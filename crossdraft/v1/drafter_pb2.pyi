from crossdraft.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrafterServiceGetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrafterServiceGetInfoResponse(_message.Message):
    __slots__ = ("model_id", "tokenizer_fingerprint", "vocab_size", "algorithms", "max_context", "device", "dtype", "active_sessions", "max_sessions", "cache")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
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
    device: str
    dtype: str
    active_sessions: int
    max_sessions: int
    cache: _common_pb2.CacheUsage
    def __init__(self, model_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., algorithms: _Optional[_Iterable[_Union[_common_pb2.Algorithm, str]]] = ..., max_context: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., cache: _Optional[_Union[_common_pb2.CacheUsage, _Mapping]] = ...) -> None: ...

class RunSessionRequest(_message.Message):
    __slots__ = ("session_id", "verifier_address", "prompt", "prompt_ids", "committed_ids", "params", "algorithm", "max_new_tokens", "draft_tokens", "resume_draft_tokens", "may_hand_back")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAY_HAND_BACK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    verifier_address: str
    prompt: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    algorithm: _common_pb2.Algorithm
    max_new_tokens: int
    draft_tokens: int
    resume_draft_tokens: int
    may_hand_back: bool
    def __init__(self, session_id: _Optional[str] = ..., verifier_address: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., committed_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., algorithm: _Optional[_Union[_common_pb2.Algorithm, str]] = ..., max_new_tokens: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., resume_draft_tokens: _Optional[int] = ..., may_hand_back: _Optional[bool] = ...) -> None: ...

class RunSessionResponse(_message.Message):
    __slots__ = ("token_offset", "ids", "text", "finished", "finish_reason", "algorithm", "why", "stats", "next_draft_tokens", "seal", "handed_back", "come_back_below")
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    NEXT_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    HANDED_BACK_FIELD_NUMBER: _ClassVar[int]
    COME_BACK_BELOW_FIELD_NUMBER: _ClassVar[int]
    token_offset: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: bytes
    finished: bool
    finish_reason: _common_pb2.FinishReason
    algorithm: _common_pb2.Algorithm
    why: str
    stats: _common_pb2.Stats
    next_draft_tokens: int
    seal: bytes
    handed_back: bool
    come_back_below: float
    def __init__(self, token_offset: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., text: _Optional[bytes] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., algorithm: _Optional[_Union[_common_pb2.Algorithm, str]] = ..., why: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.Stats, _Mapping]] = ..., next_draft_tokens: _Optional[int] = ..., seal: _Optional[bytes] = ..., handed_back: _Optional[bool] = ..., come_back_below: _Optional[float] = ...) -> None: ...
