"""Task sets: tasks (text, tests, optional setup code, code prefix or entry point, split) as data.

MBPP with the paper's splits is built in under the name "mbpp", the default wherever a task set is
named. A user's task set is a JSONL file, one task per line, validated (see parse_jsonl; the feedback
service also runs every test and reference solution through the execution service), then stored
immutably under tasksets/<name>.json, where the name is a hash of the tasks: the same tasks imported
twice are one task set.

A JSONL row (only task_id, text, tests and split are required):

    {"task_id": 1, "text": "Write a function to reverse a string.", "split": "train",
     "tests": ["assert reverse('ab') == 'ba'"], "test_setup_code": "",
     "code_prefix": "def reverse(s):", "entry_point": "reverse", "reference": "def reverse(s):\\n    return s[::-1]"}

The prompt ends with code_prefix when given; else with the reference solution's lines up to the entry
point's `def` line; else with a `def` line derived from how the first test calls the entry point.
"""
from __future__ import annotations

import ast
import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from ilf import data, prompts
from ilf.errors import AlreadyExists, InvalidArgument, NotFound
from ilf.store import ArtifactStore

MBPP = "mbpp"
# train: collected and trained on; refine: pi_Refine's training tasks; test: evaluation; dev: evaluation
# while choosing settings (never trained on); prompt: few-shot examples only (MBPP 1-10).
SPLITS = ("train", "refine", "test", "dev", "prompt")
PREFIX = "tasksets/"
FIELDS = {"task_id", "text", "tests", "split", "test_setup_code", "code_prefix", "entry_point", "reference"}
REQUIRED = ("task_id", "text", "tests", "split")
MAX_TASKS = 10000
MAX_TEXT_CHARS = 8000
MAX_TESTS = 100            # the execution service's ILF_EXECUTION_MAX_TESTS default
MAX_CODE_CHARS = 64000
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class Task:
    task_id: int
    text: str
    tests: tuple[str, ...]
    split: str
    code_prefix: str             # resolved: what the generation prompt ends with
    test_setup_code: str = ""
    entry_point: str = ""
    reference: str = ""          # a whole reference program, when known (MBPP's gold code)

    def to_dict(self) -> dict:
        row = asdict(self)
        row["tests"] = list(self.tests)
        return row


@dataclass(frozen=True)
class TaskSet:
    name: str                    # "mbpp", or ts-<hash of the tasks>
    label: str                   # what the importer called it
    tasks: tuple[Task, ...]      # by task id
    created_at: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "_by_id", {t.task_id: t for t in self.tasks})

    def task(self, task_id: int) -> Task:
        found = self._by_id.get(task_id)
        if found is None:
            raise NotFound(f"task set {self.name} has no task {task_id}")
        return found

    def split(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}")
        return [t for t in self.tasks if t.split == split]

    def split_of(self, task_id: int) -> str:
        return self.task(task_id).split

    def split_label(self, split: str) -> str:
        """How reports name the tasks of a split (MBPP keeps the paper's names)."""
        if self.name == MBPP and split in data.EVALUATION_SPLITS:
            return data.EVALUATION_SPLITS[split]
        return f"{self.label or self.name} {split} split"

    def counts(self) -> dict[str, int]:
        counts = {}
        for t in self.tasks:
            counts[t.split] = counts.get(t.split, 0) + 1
        return counts


@lru_cache(maxsize=1)
def mbpp() -> TaskSet:
    """MBPP with the paper's splits: prompt 1-10, test 11-110, refine 111-310, train the 128 annotated tasks
    of 311-974, dev the other 536 (the evaluation split for choosing settings, never trained on)."""
    annotated = {a.task_id for a in data.annotations("train")}
    tasks = []
    for task_id, row in sorted(data.mbpp().items()):
        split = data.split_of(task_id)
        if split == "train" and task_id not in annotated:
            split = "dev"
        entry = prompts.entry_point(row.tests, row.code)
        tasks.append(Task(task_id=task_id, text=row.text, tests=row.tests, split=split,
                          code_prefix=prompts.code_prefix(row.code, entry), test_setup_code=row.test_setup_code,
                          entry_point=entry, reference=row.code))
    return TaskSet(name=MBPP, label="MBPP", tasks=tuple(tasks))


class RowError(ValueError):
    pass


def _string(row: dict, name: str, limit: int, *, required: bool = False) -> str:
    value = row.get(name, "")
    if not isinstance(value, str):
        raise RowError(f"{name} must be a string")
    if required and not value.strip():
        raise RowError(f"{name} is empty")
    if len(value) > limit:
        raise RowError(f"{name} is longer than {limit} characters")
    return value


def _check_test(index: int, test) -> str:
    if not isinstance(test, str) or not test.strip():
        raise RowError(f"test {index + 1} is not a non-empty string")
    try:
        tree = ast.parse(test)
    except SyntaxError as error:
        raise RowError(f"test {index + 1} is not valid Python: {error.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise RowError(f"test {index + 1} is not exactly one assert statement")
    return test


def task_of_row(row) -> Task:
    """One JSONL row as a Task, or RowError with the reason."""
    if not isinstance(row, dict):
        raise RowError("a row must be a JSON object")
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise RowError(f"unknown field(s) {unknown}; a row has {sorted(FIELDS)}")
    missing = [name for name in REQUIRED if name not in row]
    if missing:
        raise RowError(f"missing field(s) {missing}")
    task_id = row["task_id"]
    if type(task_id) is not int or not 0 < task_id < 2 ** 31:
        raise RowError("task_id must be a positive integer below 2**31")
    if row["split"] not in SPLITS:
        raise RowError(f"split must be one of {SPLITS}, got {row['split']!r}")
    tests = row["tests"]
    if not isinstance(tests, list) or not tests:
        raise RowError("tests must be a non-empty list of assert statements")
    if len(tests) > MAX_TESTS:
        raise RowError(f"more than {MAX_TESTS} tests")
    tests = tuple(_check_test(i, t) for i, t in enumerate(tests))
    text = _string(row, "text", MAX_TEXT_CHARS, required=True)
    setup = _string(row, "test_setup_code", MAX_CODE_CHARS)
    reference = _string(row, "reference", MAX_CODE_CHARS)
    prefix = _string(row, "code_prefix", MAX_CODE_CHARS).rstrip()
    entry = _string(row, "entry_point", 200)
    if entry and not entry.isidentifier():
        raise RowError(f"entry_point {entry!r} is not a Python name")
    try:
        if not entry and not prefix:
            entry = prompts.entry_point(tests, reference)
        if not prefix:
            prefix = (prompts.code_prefix(reference, entry) if reference.strip()
                      else prompts.signature_from_tests(entry, tests))
    except ValueError as error:
        raise RowError(f"no code prefix: give code_prefix, or an entry_point the tests call ({error})") from None
    return Task(task_id=task_id, text=text, tests=tests, split=row["split"], code_prefix=prefix,
                test_setup_code=setup, entry_point=entry, reference=reference)


def parse_jsonl(body: bytes) -> tuple[list[tuple[int, Task]], list[tuple[int, str]]]:
    """((line, task) for every valid row, (line, reason) for every bad row; line 0 is the whole file).
    Blank lines are skipped."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return [], [(0, f"the file is not UTF-8 (byte {error.start})")]
    tasks, errors, seen = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = task_of_row(json.loads(line))
            if task.task_id in seen:
                raise RowError(f"task_id {task.task_id} is also on line {seen[task.task_id]}")
            seen[task.task_id] = number
            tasks.append((number, task))
        except json.JSONDecodeError as error:
            errors.append((number, f"not JSON ({error.msg})"))
        except RowError as error:
            errors.append((number, str(error)))
    if not tasks and not errors:
        errors.append((0, "the file has no tasks"))
    if len(tasks) > MAX_TASKS:
        errors.append((0, f"more than {MAX_TASKS} tasks"))
    return tasks, errors


def rejection(errors: list[tuple[int, str]]) -> InvalidArgument:
    """One error naming every bad row by line, with the reason."""
    shown = sorted(errors)[:50]
    lines = "; ".join(f"line {line}: {reason}" if line else reason for line, reason in shown)
    more = f"; and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return InvalidArgument(f"the task set has {len(errors)} bad row(s), nothing was imported: {lines}{more}")


def content_name(tasks: list[Task]) -> str:
    body = json.dumps([t.to_dict() for t in sorted(tasks, key=lambda t: t.task_id)], sort_keys=True)
    return f"ts-{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def _key(name: str) -> str:
    return f"{PREFIX}{name}.json"


class TaskSets:
    """The built-in MBPP and the imported task sets in a store; loaded sets are cached (none ever changes)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._cache: dict[str, TaskSet] = {}
        self._lock = threading.Lock()

    def get(self, name: str = "") -> TaskSet:
        name = name or MBPP
        if name == MBPP:
            return mbpp()
        with self._lock:
            cached = self._cache.get(name)
        if cached:
            return cached
        if not name.startswith("ts-") or not all(c.isalnum() or c == "-" for c in name):
            raise NotFound(f"no task set {name!r} (the built-in one is {MBPP!r}; imported ones are named ts-...)")
        try:
            stored = self.store.get_json(_key(name))
        except NotFound:
            raise NotFound(f"no task set {name!r}: import it first (`ilf tasksets import FILE`)") from None
        task_set = TaskSet(name=name, label=stored["label"], created_at=stored["created_at"],
                           tasks=tuple(Task(**{**t, "tests": tuple(t["tests"])}) for t in stored["tasks"]))
        with self._lock:
            self._cache[name] = task_set
        return task_set

    def list(self) -> list[TaskSet]:
        names = [k[len(PREFIX):-len(".json")] for k in self.store.list(PREFIX) if k.endswith(".json")]
        return [mbpp()] + sorted((self.get(n) for n in names), key=lambda s: s.created_at)

    def put(self, tasks: list[Task], label: str = "") -> tuple[TaskSet, bool]:
        """Stores validated tasks; returns the task set and whether it is new (the same tasks again: not new)."""
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"label is longer than {MAX_LABEL_CHARS} characters")
        tasks = sorted(tasks, key=lambda t: t.task_id)
        name = content_name(tasks)
        record = {"name": name, "label": label.strip() or name, "created_at": time.time(),
                  "tasks": [t.to_dict() for t in tasks]}
        try:
            self.store.put_json(_key(name), record)
        except AlreadyExists:
            return self.get(name), False
        return self.get(name), True
