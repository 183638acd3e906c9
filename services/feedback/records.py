"""Feedback records: immutable JSON objects under feedback/records/<id>.json in the artifact store.

A record's id is a hash of what it says (task, program, feedback, author, refinement), so the same
feedback submitted twice, or the paper's annotations imported twice, is one record. Each record is
one atomic store write: after a crash mid-write it either exists whole or not at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field

from ilf import data, tasksets
from ilf.errors import AlreadyExists, InvalidArgument, NotFound
from ilf.store import ArtifactStore
from services.feedback import metrics

SCHEMA_VERSION = 1
RECORDS_PREFIX = "feedback/records/"
AUTHOR_KINDS = ("human", "model")
_RECORD_ID = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class TestSummary:
    """What the execution service said when the record was made (imported records were not re-run)."""
    checked: bool = False
    tests_total: int = 0
    tests_passed: int = 0
    failure: str = ""
    refinement_passed: bool = False


@dataclass(frozen=True)
class FeedbackRecord:
    record_id: str
    task_id: int
    split: str
    program: str
    feedback: str
    author_kind: str
    annotator_id: str
    model_version: str
    human_refinement: str
    created_at: float
    source: str
    tests: TestSummary = field(default_factory=TestSummary)
    schema_version: int = SCHEMA_VERSION
    task_set: str = tasksets.MBPP
    program_model_version: str = ""  # the model version that wrote the program (queue items)
    queue_item: str = ""             # the queue item this answers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> "FeedbackRecord":
        return cls(**{**value, "tests": TestSummary(**value.get("tests", {}))})


def new_record(*, task_id: int, program: str, feedback: str, author_kind: str, source: str, annotator_id: str = "",
               model_version: str = "", human_refinement: str = "", tests: TestSummary = TestSummary(),
               task_set: tasksets.TaskSet | None = None, program_model_version: str = "", queue_item: str = ""
               ) -> FeedbackRecord:
    """A record on a task of `task_set` (default MBPP); its id hashes what it says."""
    if author_kind not in AUTHOR_KINDS:
        raise InvalidArgument(f"author_kind must be one of {AUTHOR_KINDS}, got {author_kind!r}")
    task_set = task_set or tasksets.mbpp()
    identity = [task_id, program, feedback, author_kind, annotator_id, model_version, human_refinement]
    if task_set.name != tasksets.MBPP or program_model_version:
        identity += [task_set.name, program_model_version]  # MBPP records made before task sets keep their ids
    return FeedbackRecord(
        record_id=hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24], task_id=task_id,
        split=task_set.split_of(task_id), program=program, feedback=feedback, author_kind=author_kind,
        annotator_id=annotator_id, model_version=model_version, human_refinement=human_refinement,
        created_at=time.time(), source=source, tests=tests, task_set=task_set.name,
        program_model_version=program_model_version, queue_item=queue_item)


@dataclass(frozen=True)
class Filter:
    """Every set field narrows the selection."""
    task_id: int = 0
    split: str = ""
    author_kind: str = ""
    since: float = 0.0
    task_set: str = ""

    def __post_init__(self):
        if self.split and self.split not in tasksets.SPLITS:
            raise InvalidArgument(f"split must be one of {tasksets.SPLITS}, got {self.split!r}")
        if self.author_kind and self.author_kind not in AUTHOR_KINDS:
            raise InvalidArgument(f"author_kind must be one of {AUTHOR_KINDS}, got {self.author_kind!r}")

    def matches(self, record: FeedbackRecord) -> bool:
        return ((not self.task_id or record.task_id == self.task_id)
                and (not self.split or record.split == self.split)
                and (not self.author_kind or record.author_kind == self.author_kind)
                and (not self.task_set or record.task_set == self.task_set)
                and record.created_at >= self.since)


class FeedbackStore:
    """Records in an artifact store; read records are cached, which is safe because none ever changes."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._cache: dict[str, FeedbackRecord] = {}
        self._lock = threading.Lock()

    def add(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        """Stores the record unless one with its id exists; returns the stored record and whether it is new."""
        try:
            self.store.put_json(_key(record.record_id), record.to_dict())
        except AlreadyExists:
            return self.get(record.record_id), False
        with self._lock:
            self._cache[record.record_id] = record
        metrics.RECORDS.labels(record.author_kind).inc()
        return record, True

    def get(self, record_id: str) -> FeedbackRecord:
        if not _RECORD_ID.fullmatch(record_id):
            raise InvalidArgument(f"{record_id!r} is not a feedback record id (24 hex digits)")
        with self._lock:
            cached = self._cache.get(record_id)
        if cached:
            return cached
        try:
            record = FeedbackRecord.from_dict(self.store.get_json(_key(record_id)))
        except NotFound:
            raise NotFound(f"no feedback record {record_id}") from None
        with self._lock:
            self._cache[record_id] = record
        return record

    def list(self, selection: Filter = Filter()) -> list[FeedbackRecord]:
        """Matching records, oldest first."""
        ids = [key[len(RECORDS_PREFIX):-len(".json")] for key in self.store.list(RECORDS_PREFIX)
               if key.endswith(".json")]
        records = [r for r in map(self.get, ids) if selection.matches(r)]
        return sorted(records, key=lambda r: (r.created_at, r.record_id))

    def export(self, selection: Filter = Filter()) -> tuple[str, int]:
        """Writes the matching records as JSONL to datasets/feedback-<content hash>.jsonl; returns (key, count)."""
        records = self.list(selection)
        if not records:
            raise InvalidArgument("no feedback records match the filter: nothing to export")
        body = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records).encode()
        key = f"datasets/feedback-{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        if not self.store.exists(key):
            self.store.put(key, body)
        return key, len(records)

    def import_paper_annotations(self) -> tuple[int, int, dict[str, int]]:
        """Stores the paper's annotations as human records; returns (new, already present, records per split).

        They are not re-run: the annotation file is pinned by sha256 and each refinement passed its tests.
        """
        imported = present = 0
        per_split: dict[str, int] = {}
        for note in data.annotations():
            record = new_record(task_id=note.task_id, program=note.failing_program, feedback=note.feedback,
                                author_kind="human", source="paper", annotator_id=note.annotator,
                                human_refinement=note.refinement_program)
            stored, is_new = self.add(record)
            imported, present = imported + is_new, present + (not is_new)
            per_split[stored.split] = per_split.get(stored.split, 0) + 1
        return imported, present, per_split


def _key(record_id: str) -> str:
    return f"{RECORDS_PREFIX}{record_id}.json"
