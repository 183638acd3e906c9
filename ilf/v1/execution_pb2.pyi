from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_PASSED: _ClassVar[Verdict]
    VERDICT_FAILED: _ClassVar[Verdict]
    VERDICT_ERROR: _ClassVar[Verdict]
    VERDICT_TIMEOUT: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
VERDICT_PASSED: Verdict
VERDICT_FAILED: Verdict
VERDICT_ERROR: Verdict
VERDICT_TIMEOUT: Verdict

class ExecuteRequest(_message.Message):
    __slots__ = ("program", "test_setup_code", "tests", "timeout_s", "memory_mb", "request_id")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    TEST_SETUP_CODE_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    program: str
    test_setup_code: str
    tests: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    memory_mb: int
    request_id: str
    def __init__(self, program: _Optional[str] = ..., test_setup_code: _Optional[str] = ..., tests: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ..., memory_mb: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ExecuteBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ExecuteRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ExecuteRequest, _Mapping]]] = ...) -> None: ...

class TestResult(_message.Message):
    __slots__ = ("index", "verdict", "error_type", "error_message", "duration_s", "actual", "expected")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    index: int
    verdict: Verdict
    error_type: str
    error_message: str
    duration_s: float
    actual: str
    expected: str
    def __init__(self, index: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., duration_s: _Optional[float] = ..., actual: _Optional[str] = ..., expected: _Optional[str] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("request_id", "passed", "tests", "duration_s", "stdout", "stderr", "output_truncated", "error_type", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    passed: bool
    tests: _containers.RepeatedCompositeFieldContainer[TestResult]
    duration_s: float
    stdout: str
    stderr: str
    output_truncated: bool
    error_type: str
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., passed: _Optional[bool] = ..., tests: _Optional[_Iterable[_Union[TestResult, _Mapping]]] = ..., duration_s: _Optional[float] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., output_truncated: _Optional[bool] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class ExecuteBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExecuteResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ExecuteResponse, _Mapping]]] = ...) -> None: ...

class GetSandboxInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IsolationLayer(_message.Message):
    __slots__ = ("name", "active", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    active: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., active: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class SandboxInfo(_message.Message):
    __slots__ = ("layers", "workers")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[IsolationLayer]
    workers: int
    def __init__(self, layers: _Optional[_Iterable[_Union[IsolationLayer, _Mapping]]] = ..., workers: _Optional[int] = ...) -> None: ...
