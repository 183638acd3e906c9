from ilf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "params", "model_version")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    params: _common_pb2.SamplingParams
    model_version: str
    def __init__(self, prompt: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions", "model_version", "dtype")
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Completion]
    model_version: str
    dtype: str
    def __init__(self, completions: _Optional[_Iterable[_Union[_common_pb2.Completion, _Mapping]]] = ..., model_version: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("index", "token_text", "token_id", "completion", "model_version", "dtype")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_text: str
    token_id: int
    completion: _common_pb2.Completion
    model_version: str
    dtype: str
    def __init__(self, index: _Optional[int] = ..., token_text: _Optional[str] = ..., token_id: _Optional[int] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ..., model_version: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class SwitchModelRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("serving_version", "loaded_versions", "history", "last_swap_duration_seconds", "last_load_error", "loading_versions", "backend")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    LAST_SWAP_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOADING_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    history: _containers.RepeatedScalarFieldContainer[str]
    last_swap_duration_seconds: float
    last_load_error: str
    loading_versions: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    def __init__(self, serving_version: _Optional[str] = ..., loaded_versions: _Optional[_Iterable[str]] = ..., history: _Optional[_Iterable[str]] = ..., last_swap_duration_seconds: _Optional[float] = ..., last_load_error: _Optional[str] = ..., loading_versions: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ...) -> None: ...
