from ilf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RefineRequest(_message.Message):
    __slots__ = ("task", "failing_program", "feedback", "params")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FAILING_PROGRAM_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    failing_program: str
    feedback: str
    params: _common_pb2.SamplingParams
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, _Mapping]] = ..., failing_program: _Optional[str] = ..., feedback: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class RefinedProgram(_message.Message):
    __slots__ = ("program", "completion")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    program: str
    completion: _common_pb2.Completion
    def __init__(self, program: _Optional[str] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ...) -> None: ...

class RefineResponse(_message.Message):
    __slots__ = ("refinements", "model_version", "prompt")
    REFINEMENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    refinements: _containers.RepeatedCompositeFieldContainer[RefinedProgram]
    model_version: str
    prompt: str
    def __init__(self, refinements: _Optional[_Iterable[_Union[RefinedProgram, _Mapping]]] = ..., model_version: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class RefinementSwitchRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class RefinementStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefinementModelStatus(_message.Message):
    __slots__ = ("serving_version",)
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    def __init__(self, serving_version: _Optional[str] = ...) -> None: ...
