from ilf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUTHOR_KIND_UNSPECIFIED: _ClassVar[AuthorKind]
    AUTHOR_KIND_HUMAN: _ClassVar[AuthorKind]
    AUTHOR_KIND_MODEL: _ClassVar[AuthorKind]
AUTHOR_KIND_UNSPECIFIED: AuthorKind
AUTHOR_KIND_HUMAN: AuthorKind
AUTHOR_KIND_MODEL: AuthorKind

class TestSummary(_message.Message):
    __slots__ = ("checked", "tests_total", "tests_passed", "failure", "refinement_passed")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    TESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TESTS_PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    REFINEMENT_PASSED_FIELD_NUMBER: _ClassVar[int]
    checked: bool
    tests_total: int
    tests_passed: int
    failure: str
    refinement_passed: bool
    def __init__(self, checked: _Optional[bool] = ..., tests_total: _Optional[int] = ..., tests_passed: _Optional[int] = ..., failure: _Optional[str] = ..., refinement_passed: _Optional[bool] = ...) -> None: ...

class FeedbackRecord(_message.Message):
    __slots__ = ("record_id", "schema_version", "task_id", "split", "program", "feedback", "author_kind", "annotator_id", "model_version", "human_refinement", "created_at", "tests", "source")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_KIND_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HUMAN_REFINEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    schema_version: int
    task_id: int
    split: str
    program: str
    feedback: str
    author_kind: AuthorKind
    annotator_id: str
    model_version: str
    human_refinement: str
    created_at: float
    tests: TestSummary
    source: str
    def __init__(self, record_id: _Optional[str] = ..., schema_version: _Optional[int] = ..., task_id: _Optional[int] = ..., split: _Optional[str] = ..., program: _Optional[str] = ..., feedback: _Optional[str] = ..., author_kind: _Optional[_Union[AuthorKind, str]] = ..., annotator_id: _Optional[str] = ..., model_version: _Optional[str] = ..., human_refinement: _Optional[str] = ..., created_at: _Optional[float] = ..., tests: _Optional[_Union[TestSummary, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("task_id", "program", "feedback", "annotator_id", "human_refinement")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HUMAN_REFINEMENT_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    program: str
    feedback: str
    annotator_id: str
    human_refinement: str
    def __init__(self, task_id: _Optional[int] = ..., program: _Optional[str] = ..., feedback: _Optional[str] = ..., annotator_id: _Optional[str] = ..., human_refinement: _Optional[str] = ...) -> None: ...

class GetFeedbackRequest(_message.Message):
    __slots__ = ("record_id",)
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    def __init__(self, record_id: _Optional[str] = ...) -> None: ...

class FeedbackFilter(_message.Message):
    __slots__ = ("task_id", "split", "author_kind", "since")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    split: str
    author_kind: AuthorKind
    since: float
    def __init__(self, task_id: _Optional[int] = ..., split: _Optional[str] = ..., author_kind: _Optional[_Union[AuthorKind, str]] = ..., since: _Optional[float] = ...) -> None: ...

class ListFeedbackRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: FeedbackFilter
    def __init__(self, filter: _Optional[_Union[FeedbackFilter, _Mapping]] = ...) -> None: ...

class ListFeedbackResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ...) -> None: ...

class ExportDatasetRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: FeedbackFilter
    def __init__(self, filter: _Optional[_Union[FeedbackFilter, _Mapping]] = ...) -> None: ...

class ExportDatasetResponse(_message.Message):
    __slots__ = ("key", "records")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    records: int
    def __init__(self, key: _Optional[str] = ..., records: _Optional[int] = ...) -> None: ...

class ImportPaperAnnotationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImportPaperAnnotationsResponse(_message.Message):
    __slots__ = ("imported", "already_present", "per_split")
    class PerSplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    PER_SPLIT_FIELD_NUMBER: _ClassVar[int]
    imported: int
    already_present: int
    per_split: _containers.ScalarMap[str, int]
    def __init__(self, imported: _Optional[int] = ..., already_present: _Optional[int] = ..., per_split: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GenerateFeedbackRequest(_message.Message):
    __slots__ = ("task_id", "program", "params", "shots", "model_version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    program: str
    params: _common_pb2.SamplingParams
    shots: int
    model_version: str
    def __init__(self, task_id: _Optional[int] = ..., program: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., shots: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...
