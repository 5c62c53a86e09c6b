from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    ALGORITHM_AUTO: _ClassVar[Algorithm]
    ALGORITHM_SAME: _ClassVar[Algorithm]
    ALGORITHM_TLI: _ClassVar[Algorithm]
    ALGORITHM_SLEM: _ClassVar[Algorithm]
    ALGORITHM_SLRS: _ClassVar[Algorithm]
    ALGORITHM_NONE: _ClassVar[Algorithm]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
ALGORITHM_UNSPECIFIED: Algorithm
ALGORITHM_AUTO: Algorithm
ALGORITHM_SAME: Algorithm
ALGORITHM_TLI: Algorithm
ALGORITHM_SLEM: Algorithm
ALGORITHM_SLRS: Algorithm
ALGORITHM_NONE: Algorithm
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
FINISH_REASON_STOP: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("new_tokens", "rounds", "draft_tokens", "accepted_tokens", "drafted", "accepted_counts_by_position", "draft_ns", "verify_ns", "bridge_ns", "network_ns", "total_ns")
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNTS_BY_POSITION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_NS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    new_tokens: int
    rounds: int
    draft_tokens: int
    accepted_tokens: int
    drafted: int
    accepted_counts_by_position: _containers.RepeatedScalarFieldContainer[int]
    draft_ns: int
    verify_ns: int
    bridge_ns: int
    network_ns: int
    total_ns: int
    def __init__(self, new_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted_counts_by_position: _Optional[_Iterable[int]] = ..., draft_ns: _Optional[int] = ..., verify_ns: _Optional[int] = ..., bridge_ns: _Optional[int] = ..., network_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class CacheUsage(_message.Message):
    __slots__ = ("budget_bytes", "reserved_bytes", "allocated_bytes", "queued_sessions", "refused_sessions", "max_batch_tokens", "sequences_per_pass", "passes", "max_model_len", "parked_sessions", "dtype")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_PER_PASS_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    PARKED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    queued_sessions: int
    refused_sessions: int
    max_batch_tokens: int
    sequences_per_pass: float
    passes: int
    max_model_len: int
    parked_sessions: int
    dtype: str
    def __init__(self, budget_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., queued_sessions: _Optional[int] = ..., refused_sessions: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., sequences_per_pass: _Optional[float] = ..., passes: _Optional[int] = ..., max_model_len: _Optional[int] = ..., parked_sessions: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...
