from crossdraft.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_PENDING: _ClassVar[SessionStatus]
    SESSION_STATUS_RUNNING: _ClassVar[SessionStatus]
    SESSION_STATUS_FINISHED: _ClassVar[SessionStatus]
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_PENDING: SessionStatus
SESSION_STATUS_RUNNING: SessionStatus
SESSION_STATUS_FINISHED: SessionStatus

class GenerationSpec(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "params", "algorithm", "draft_tokens", "model", "drafter", "stop_strings")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    params: _common_pb2.SamplingParams
    algorithm: _common_pb2.Algorithm
    draft_tokens: int
    model: str
    drafter: str
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., algorithm: _Optional[_Union[_common_pb2.Algorithm, str]] = ..., draft_tokens: _Optional[int] = ..., model: _Optional[str] = ..., drafter: _Optional[str] = ..., stop_strings: _Optional[_Iterable[str]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("offset", "text", "token_offset", "ids")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    text: str
    token_offset: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offset: _Optional[int] = ..., text: _Optional[str] = ..., token_offset: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerationEnd(_message.Message):
    __slots__ = ("finish_reason", "algorithm", "why", "stats", "error_message", "text_bytes")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    algorithm: _common_pb2.Algorithm
    why: str
    stats: _common_pb2.Stats
    error_message: str
    text_bytes: int
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., algorithm: _Optional[_Union[_common_pb2.Algorithm, str]] = ..., why: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.Stats, _Mapping]] = ..., error_message: _Optional[str] = ..., text_bytes: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("spec", "session_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    spec: GenerationSpec
    session_id: str
    def __init__(self, spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("session_id", "delta", "end")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    delta: TextDelta
    end: GenerationEnd
    def __init__(self, session_id: _Optional[str] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ...) -> None: ...

class GenerateUnaryRequest(_message.Message):
    __slots__ = ("spec", "session_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    spec: GenerationSpec
    session_id: str
    def __init__(self, spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class GenerateUnaryResponse(_message.Message):
    __slots__ = ("session_id", "text", "ids", "end")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    end: GenerationEnd
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ...) -> None: ...

class AttachSessionRequest(_message.Message):
    __slots__ = ("session_id", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class AttachSessionResponse(_message.Message):
    __slots__ = ("session_id", "delta", "end")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    delta: TextDelta
    end: GenerationEnd
    def __init__(self, session_id: _Optional[str] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "status", "spec", "new_tokens", "text_bytes", "text", "ids", "end", "stats", "created_unix_ns", "updated_unix_ns", "drafter_address", "verifier_address")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: SessionStatus
    spec: GenerationSpec
    new_tokens: int
    text_bytes: int
    text: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    end: GenerationEnd
    stats: _common_pb2.Stats
    created_unix_ns: int
    updated_unix_ns: int
    drafter_address: str
    verifier_address: str
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., new_tokens: _Optional[int] = ..., text_bytes: _Optional[int] = ..., text: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.Stats, _Mapping]] = ..., created_unix_ns: _Optional[int] = ..., updated_unix_ns: _Optional[int] = ..., drafter_address: _Optional[str] = ..., verifier_address: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_output")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_output: bool
    def __init__(self, session_id: _Optional[str] = ..., include_output: _Optional[bool] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CancelSessionResponse(_message.Message):
    __slots__ = ("cancelled", "session")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    session: Session
    def __init__(self, cancelled: _Optional[bool] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...
