"""Task sets: MBPP built in, a user's JSONL checked row by row (and through the real execution service), stored once."""
from __future__ import annotations

import json

import grpc
import pytest

from ilf import data, prompts, tasksets
from ilf.errors import InvalidArgument, NotFound
from ilf.store import open_store
from ilf.v1 import common_pb2, execution_pb2, execution_pb2_grpc, feedback_pb2
from ilf.grpc_util import channel
from test_feedback import execution_address, rejected, start_feedback, store_url  # noqa: F401 - fixtures

# A small task set a team could bring: one task per way of giving the prompt's code prefix.
USER_TASKS = [
    {"task_id": 1, "text": "Return the sum of two numbers.", "split": "train",
     "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "reference": "def add(a, b):\n    return a + b"},
    {"task_id": 2, "text": "Reverse a string.", "split": "train", "code_prefix": "def reverse(s):",
     "tests": ["assert reverse('ab') == 'ba'", "assert reverse('') == ''"],
     "reference": "def reverse(s):\n    return s[::-1]"},
    {"task_id": 3, "text": "Return the square of a number.", "split": "train", "entry_point": "square",
     "tests": ["assert square(3) == 9", "assert square(-2) == 4"]},
    {"task_id": 4, "text": "Return the larger of two numbers.", "split": "test",
     "tests": ["assert larger(1, 2) == 2", "assert larger(5, 3) == 5"],
     "reference": "def larger(a, b):\n    return a if a > b else b"},
    {"task_id": 5, "text": "Count the vowels in a string.", "split": "test",
     "tests": ["assert vowels('banana') == 3", "assert vowels('xyz') == 0"],
     "reference": "def vowels(s):\n    return sum(c in 'aeiou' for c in s)"},
    {"task_id": 6, "text": "Return the last element of a list.", "split": "dev", "test_setup_code": "ITEMS = [1, 2, 3]",
     "tests": ["assert last(ITEMS) == 3"], "reference": "def last(items):\n    return items[-1]"},
]


def user_jsonl(rows=USER_TASKS) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def user_task_set() -> tasksets.TaskSet:
    """The parsed user task set (as an import would store it), without a service."""
    tasks, errors = tasksets.parse_jsonl(user_jsonl())
    assert not errors
    return tasksets.TaskSet(name=tasksets.content_name([t for _, t in tasks]), label="", tasks=tuple(t for _, t in tasks))


def passing_program(task: tasksets.Task) -> str:
    """A correct program that continues the task's prompt (what a person's refinement looks like)."""
    if task.reference:
        return prompts.reference_program(task)
    return prompts.task_prompt(task, strip=False) + "    return a * a\n"


# ---------------------------------------------------------------- plain functions

def test_mbpp_is_built_in_with_the_papers_splits():
    mbpp = tasksets.mbpp()
    assert mbpp.name == tasksets.MBPP and mbpp.counts() == {"prompt": 10, "test": 100, "refine": 200, "train": 128,
                                                           "dev": 536}
    assert {t.task_id for t in mbpp.split("train")} == {a.task_id for a in data.annotations("train")}
    task = mbpp.task(11)
    assert prompts.task_prompt(task) == prompts.mbpp_prompt(data.task(11))
    assert prompts.reference_program(task).startswith(prompts.task_prompt(task, strip=False))
    with pytest.raises(NotFound, match="no task 5000"):
        mbpp.task(5000)


def test_a_task_sets_prompt_ends_with_its_code_prefix_however_it_is_given():
    tasks = {t.task_id: t for t in user_task_set().tasks}
    assert tasks[1].code_prefix == "def add(a, b):"           # from the reference solution's def line
    assert tasks[2].code_prefix == "def reverse(s):"          # given
    assert tasks[3].code_prefix == "def square(a):"           # derived from how the first test calls it
    assert prompts.task_prompt(tasks[3]) == '"""\nReturn the square of a number.\n\n>>> Example: square(3) = 9\n' \
                                            '"""\n\ndef square(a):'
    assert tasks[6].test_setup_code == "ITEMS = [1, 2, 3]" and tasks[6].split == "dev"


def test_the_name_is_the_content():
    first = tasksets.content_name([t for _, t in tasksets.parse_jsonl(user_jsonl())[0]])
    shuffled = tasksets.content_name([t for _, t in tasksets.parse_jsonl(user_jsonl(USER_TASKS[::-1]))[0]])
    changed = tasksets.content_name([t for _, t in tasksets.parse_jsonl(
        user_jsonl([{**USER_TASKS[0], "text": "Add."}, *USER_TASKS[1:]]))[0]])
    assert first == shuffled != changed and first.startswith("ts-")


BAD_ROWS = [
    (b'not json', "not JSON"),
    (json.dumps({**USER_TASKS[0], "task_id": 7, "tests": ["add(1, 2)"]}), "test 1 is not exactly one assert"),
    (json.dumps({**USER_TASKS[0], "task_id": 8, "split": "holdout"}), "split must be one of"),
    (json.dumps({**USER_TASKS[0], "task_id": 9, "test": []}), "unknown field(s) ['test']"),
    (json.dumps({"task_id": 10, "text": "x", "split": "train"}), "missing field(s) ['tests']"),
    (json.dumps({**USER_TASKS[0], "task_id": "eleven"}), "task_id must be a positive integer"),
    (json.dumps(USER_TASKS[0]), "task_id 1 is also on line 1"),
    (json.dumps({"task_id": 12, "text": "x", "split": "train", "tests": ["assert f(1) == 1"]}), "no code prefix"),
]


def test_bad_rows_are_reported_by_line_with_the_reason():
    body = user_jsonl(USER_TASKS[:1]) + b"\n".join(r if isinstance(r, bytes) else r.encode() for r, _ in BAD_ROWS)
    tasks, errors = tasksets.parse_jsonl(body)
    assert [line for line, _ in tasks] == [1]
    assert [line for line, _ in errors] == list(range(2, 2 + len(BAD_ROWS)))
    for (_, reason), (_, expected) in zip(errors, BAD_ROWS):
        assert expected in reason
    assert tasksets.parse_jsonl(b"\n\n")[1] == [(0, "the file has no tasks")]
    assert "line 3: test 1 is not exactly one assert" in str(tasksets.rejection(errors))


def test_stored_task_sets_are_immutable_and_read_back(tmp_path):
    sets = tasksets.TaskSets(open_store(f"file://{tmp_path}"))
    stored, new = sets.put(list(user_task_set().tasks), "mine")
    assert new and stored.label == "mine" and stored.tasks == user_task_set().tasks
    again, new = sets.put(list(user_task_set().tasks), "another label")
    assert not new and again.label == "mine"
    assert [s.name for s in tasksets.TaskSets(open_store(f"file://{tmp_path}")).list()] == ["mbpp", stored.name]
    for name, reason in (("ts-0000000000000000", "import it first"), ("../x", "no task set")):
        with pytest.raises(NotFound, match=reason):
            sets.get(name)
    with pytest.raises(InvalidArgument, match="split must be one of"):
        stored.split("holdout")


# ---------------------------------------------------------------- over gRPC, with the real execution service

def test_import_validates_through_the_execution_service_and_stores_once(start_feedback, store_url):
    feedback = start_feedback()
    info = feedback.ImportTaskSet(feedback_pb2.ImportTaskSetRequest(jsonl=user_jsonl(), label="team"), timeout=120)
    assert info.name == user_task_set().name and info.imported and info.label == "team"
    assert dict(info.tasks_per_split) == {"train": 3, "test": 2, "dev": 1}
    again = feedback.ImportTaskSet(feedback_pb2.ImportTaskSetRequest(jsonl=user_jsonl()), timeout=120)
    assert again.name == info.name and not again.imported
    listed = feedback.ListTaskSets(feedback_pb2.ListTaskSetsRequest(), timeout=30).task_sets
    assert [s.name for s in listed] == ["mbpp", info.name] and listed[0].tasks_per_split["train"] == 128
    shown = feedback.GetTaskSet(feedback_pb2.GetTaskSetRequest(name=info.name, include_tasks=True), timeout=30)
    assert [t.task_id for t in shown.tasks] == [1, 2, 3, 4, 5, 6]
    assert shown.tasks[2].code_prefix == "def square(a):" and shown.tasks[0].task_set == info.name
    # a service started later reads it from the store
    assert start_feedback().GetTaskSet(feedback_pb2.GetTaskSetRequest(name=info.name), timeout=30).label == "team"


def test_a_task_set_with_bad_rows_is_refused_whole_with_every_reason(start_feedback, store_url):
    feedback = start_feedback()
    huge = {**USER_TASKS[0], "task_id": 20, "tests": ["assert add(1, 2) == '" + "x" * 120_000 + "'"]}
    failing = {**USER_TASKS[0], "task_id": 21, "reference": "def add(a, b):\n    return a - b"}
    rows = user_jsonl(USER_TASKS[:2]) + b"{oops\n" + user_jsonl([huge, failing])
    error = rejected(feedback.ImportTaskSet, feedback_pb2.ImportTaskSetRequest(jsonl=rows))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 bad row(s), nothing was imported" in error.details()
    assert "line 3: not JSON" in error.details()
    assert "line 4: the execution service refused it" in error.details()
    assert "line 5: the reference solution fails: test 1: FAILED AssertionError (got -1, expected 3)" in error.details()
    assert [s.name for s in feedback.ListTaskSets(feedback_pb2.ListTaskSetsRequest(), timeout=30).task_sets] == ["mbpp"]
    assert not open_store(store_url).list("tasksets/")


def test_unknown_task_sets_and_tasks_are_not_found_with_the_reason(start_feedback):
    feedback = start_feedback()
    note = data.annotations("test")[0]
    cases = [
        (feedback.GetTaskSet, feedback_pb2.GetTaskSetRequest(name="ts-0123456789abcdef"), "import it first"),
        (feedback.SubmitFeedback, feedback_pb2.SubmitFeedbackRequest(
            task_set="ts-0123456789abcdef", task_id=1, program="def f(): pass", feedback="x", annotator_id="a"),
         "no task set 'ts-0123456789abcdef'"),
        (feedback.SubmitFeedback, feedback_pb2.SubmitFeedbackRequest(
            task_id=9999, program=note.failing_program, feedback="x", annotator_id="a"), "mbpp has no task 9999"),
        (feedback.Collect, feedback_pb2.CollectRequest(task_set="nope"), "no task set 'nope'"),
        (feedback.Collect, feedback_pb2.CollectRequest(task_ids=[311, 9999], params=common_pb2.SamplingParams(
            n=1, max_new_tokens=8)), "mbpp has no task 9999"),
    ]
    for call, request, reason in cases:
        error = rejected(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND and reason in error.details(), error.details()


def test_collecting_on_named_tasks_takes_train_tasks_only_each_once(start_feedback):
    feedback = start_feedback()
    params = common_pb2.SamplingParams(n=1, max_new_tokens=8)
    for task_ids, reason in [([311, 11, 111], "in other splits: 11 (test), 111 (refine)"),
                             ([311, 312, 311], "names a task twice: [311]")]:
        error = rejected(feedback.Collect, feedback_pb2.CollectRequest(task_ids=task_ids, params=params))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.details(), error.details()


def test_a_failed_comparison_says_what_the_program_returned_and_what_was_expected(execution_address):
    execution = execution_pb2_grpc.ExecutionStub(channel(execution_address))
    reply = execution.Execute(execution_pb2.ExecuteRequest(
        program="def add(a, b):\n    return a - b", tests=["assert add(1, 2) == 3", "assert 0 == add(2, 2)",
                                                           "assert add(1, 1) > 5", "assert add(1, 1) == 0"]),
        timeout=60)
    shown = [(t.verdict, t.actual, t.expected) for t in reply.tests]
    assert shown == [(execution_pb2.VERDICT_FAILED, "-1", "3"), (execution_pb2.VERDICT_PASSED, "", ""),
                     (execution_pb2.VERDICT_FAILED, "0", "5"), (execution_pb2.VERDICT_PASSED, "", "")]
