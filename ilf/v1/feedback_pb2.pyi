import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ilf.v1 import common_pb2 as _common_pb2
from ilf.v1 import execution_pb2 as _execution_pb2
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

class QueueState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUEUE_STATE_UNSPECIFIED: _ClassVar[QueueState]
    QUEUE_STATE_QUEUED: _ClassVar[QueueState]
    QUEUE_STATE_LEASED: _ClassVar[QueueState]
    QUEUE_STATE_ANSWERED: _ClassVar[QueueState]
AUTHOR_KIND_UNSPECIFIED: AuthorKind
AUTHOR_KIND_HUMAN: AuthorKind
AUTHOR_KIND_MODEL: AuthorKind
QUEUE_STATE_UNSPECIFIED: QueueState
QUEUE_STATE_QUEUED: QueueState
QUEUE_STATE_LEASED: QueueState
QUEUE_STATE_ANSWERED: QueueState

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
    __slots__ = ("record_id", "schema_version", "task_id", "split", "program", "feedback", "author_kind", "annotator_id", "model_version", "human_refinement", "created_at", "tests", "source", "task_set", "program_model_version", "queue_item")
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
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ITEM_FIELD_NUMBER: _ClassVar[int]
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
    created_at: _timestamp_pb2.Timestamp
    tests: TestSummary
    source: str
    task_set: str
    program_model_version: str
    queue_item: str
    def __init__(self, record_id: _Optional[str] = ..., schema_version: _Optional[int] = ..., task_id: _Optional[int] = ..., split: _Optional[str] = ..., program: _Optional[str] = ..., feedback: _Optional[str] = ..., author_kind: _Optional[_Union[AuthorKind, str]] = ..., annotator_id: _Optional[str] = ..., model_version: _Optional[str] = ..., human_refinement: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tests: _Optional[_Union[TestSummary, _Mapping]] = ..., source: _Optional[str] = ..., task_set: _Optional[str] = ..., program_model_version: _Optional[str] = ..., queue_item: _Optional[str] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("task_id", "program", "feedback", "annotator_id", "human_refinement", "task_set")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HUMAN_REFINEMENT_FIELD_NUMBER: _ClassVar[int]
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    program: str
    feedback: str
    annotator_id: str
    human_refinement: str
    task_set: str
    def __init__(self, task_id: _Optional[int] = ..., program: _Optional[str] = ..., feedback: _Optional[str] = ..., annotator_id: _Optional[str] = ..., human_refinement: _Optional[str] = ..., task_set: _Optional[str] = ...) -> None: ...

class GetFeedbackRequest(_message.Message):
    __slots__ = ("record_id",)
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    def __init__(self, record_id: _Optional[str] = ...) -> None: ...

class FeedbackFilter(_message.Message):
    __slots__ = ("task_id", "split", "author_kind", "since", "task_set")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    split: str
    author_kind: AuthorKind
    since: _timestamp_pb2.Timestamp
    task_set: str
    def __init__(self, task_id: _Optional[int] = ..., split: _Optional[str] = ..., author_kind: _Optional[_Union[AuthorKind, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task_set: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("task_id", "program", "params", "shots", "model_version", "task_set")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    program: str
    params: _common_pb2.SamplingParams
    shots: int
    model_version: str
    task_set: str
    def __init__(self, task_id: _Optional[int] = ..., program: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., shots: _Optional[int] = ..., model_version: _Optional[str] = ..., task_set: _Optional[str] = ...) -> None: ...

class TaskSetInfo(_message.Message):
    __slots__ = ("name", "label", "tasks_per_split", "created_at", "tasks", "imported")
    class TasksPerSplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TASKS_PER_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    label: str
    tasks_per_split: _containers.ScalarMap[str, int]
    created_at: _timestamp_pb2.Timestamp
    tasks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Task]
    imported: bool
    def __init__(self, name: _Optional[str] = ..., label: _Optional[str] = ..., tasks_per_split: _Optional[_Mapping[str, int]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[_common_pb2.Task, _Mapping]]] = ..., imported: _Optional[bool] = ...) -> None: ...

class ImportTaskSetRequest(_message.Message):
    __slots__ = ("jsonl", "label")
    JSONL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    jsonl: bytes
    label: str
    def __init__(self, jsonl: _Optional[bytes] = ..., label: _Optional[str] = ...) -> None: ...

class GetTaskSetRequest(_message.Message):
    __slots__ = ("name", "include_tasks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TASKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    include_tasks: bool
    def __init__(self, name: _Optional[str] = ..., include_tasks: _Optional[bool] = ...) -> None: ...

class ListTaskSetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTaskSetsResponse(_message.Message):
    __slots__ = ("task_sets",)
    TASK_SETS_FIELD_NUMBER: _ClassVar[int]
    task_sets: _containers.RepeatedCompositeFieldContainer[TaskSetInfo]
    def __init__(self, task_sets: _Optional[_Iterable[_Union[TaskSetInfo, _Mapping]]] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("task_set", "params", "max_tasks", "model_version", "timeout_s", "task_ids")
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_set: str
    params: _common_pb2.SamplingParams
    max_tasks: int
    model_version: str
    timeout_s: float
    task_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, task_set: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_tasks: _Optional[int] = ..., model_version: _Optional[str] = ..., timeout_s: _Optional[float] = ..., task_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CollectResponse(_message.Message):
    __slots__ = ("model_version", "tasks", "samples", "failing", "queued", "duplicates", "item_ids")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FAILING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    tasks: int
    samples: int
    failing: int
    queued: int
    duplicates: int
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_version: _Optional[str] = ..., tasks: _Optional[int] = ..., samples: _Optional[int] = ..., failing: _Optional[int] = ..., queued: _Optional[int] = ..., duplicates: _Optional[int] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemTest(_message.Message):
    __slots__ = ("test", "result")
    TEST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    test: str
    result: _execution_pb2.TestResult
    def __init__(self, test: _Optional[str] = ..., result: _Optional[_Union[_execution_pb2.TestResult, _Mapping]] = ...) -> None: ...

class QueueItem(_message.Message):
    __slots__ = ("item_id", "task_set", "task_id", "task_text", "program", "model_version", "tests", "load_error", "state", "lease_id", "leased_by", "lease_expires_at", "skipped_by", "record_id", "answered_by", "created_at")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASED_BY_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BY_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    task_set: str
    task_id: int
    task_text: str
    program: str
    model_version: str
    tests: _containers.RepeatedCompositeFieldContainer[ItemTest]
    load_error: str
    state: QueueState
    lease_id: str
    leased_by: str
    lease_expires_at: _timestamp_pb2.Timestamp
    skipped_by: _containers.RepeatedScalarFieldContainer[str]
    record_id: str
    answered_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, item_id: _Optional[str] = ..., task_set: _Optional[str] = ..., task_id: _Optional[int] = ..., task_text: _Optional[str] = ..., program: _Optional[str] = ..., model_version: _Optional[str] = ..., tests: _Optional[_Iterable[_Union[ItemTest, _Mapping]]] = ..., load_error: _Optional[str] = ..., state: _Optional[_Union[QueueState, str]] = ..., lease_id: _Optional[str] = ..., leased_by: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., skipped_by: _Optional[_Iterable[str]] = ..., record_id: _Optional[str] = ..., answered_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListQueueRequest(_message.Message):
    __slots__ = ("task_set", "state", "limit")
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    task_set: str
    state: QueueState
    limit: int
    def __init__(self, task_set: _Optional[str] = ..., state: _Optional[_Union[QueueState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListQueueResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[QueueItem]
    def __init__(self, items: _Optional[_Iterable[_Union[QueueItem, _Mapping]]] = ...) -> None: ...

class LeaseItemRequest(_message.Message):
    __slots__ = ("annotator_id", "task_set", "item_id", "lease_seconds")
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    annotator_id: str
    task_set: str
    item_id: str
    lease_seconds: float
    def __init__(self, annotator_id: _Optional[str] = ..., task_set: _Optional[str] = ..., item_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class SkipItemRequest(_message.Message):
    __slots__ = ("item_id", "lease_id", "reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    lease_id: str
    reason: str
    def __init__(self, item_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AnswerItemRequest(_message.Message):
    __slots__ = ("item_id", "lease_id", "annotator_id", "feedback", "human_refinement")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    HUMAN_REFINEMENT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    lease_id: str
    annotator_id: str
    feedback: str
    human_refinement: str
    def __init__(self, item_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., annotator_id: _Optional[str] = ..., feedback: _Optional[str] = ..., human_refinement: _Optional[str] = ...) -> None: ...

class AnswerWithModelRequest(_message.Message):
    __slots__ = ("task_set", "max_items", "older_than_s", "params", "shots", "model_version")
    TASK_SET_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_S_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_set: str
    max_items: int
    older_than_s: float
    params: _common_pb2.SamplingParams
    shots: int
    model_version: str
    def __init__(self, task_set: _Optional[str] = ..., max_items: _Optional[int] = ..., older_than_s: _Optional[float] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., shots: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class AnswerWithModelResponse(_message.Message):
    __slots__ = ("records", "silent")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    silent: int
    def __init__(self, records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ..., silent: _Optional[int] = ...) -> None: ...
