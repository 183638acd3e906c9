"""Feedback service: records in the store, checks through a real execution service, the paper's annotations, export."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import grpc
import pytest

from conftest import free_port
from ilf import config, data
from ilf.datasets import read_dataset
from ilf.errors import AlreadyExists, InvalidArgument, NotFound
from ilf.grpc_util import channel
from ilf.store import open_store
from ilf.v1 import execution_pb2, feedback_pb2, feedback_pb2_grpc
from services.feedback import server as feedback_server
from services.feedback.checks import failure_of
from services.feedback.records import FeedbackStore, Filter, new_record
from services.feedback.writer import MAX_REPORTED_CHARS, feedback_prompt, results_report

ROOT = Path(__file__).resolve().parents[1]
PAPER_SPLITS = {"prompt": 2, "test": 21, "refine": 44, "train": 128}
EXPORT_FIELDS = {"record_id", "task_id", "program", "feedback", "human_refinement", "author_kind", "annotator_id",
                 "model_version"}


@pytest.fixture(scope="module")
def execution_address():
    from services.execution.server import build_server
    server = build_server(0)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=None)


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    monkeypatch.setenv("ILF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ILF_CACHE", str(tmp_path / "cache"))
    url = f"file://{tmp_path / 'store'}"
    monkeypatch.setenv("ILF_STORE", url)
    # These tests submit the paper's annotations of MBPP_Test programs; by default such feedback is refused
    # (test_feedback_on_a_test_task_is_refused_by_default).
    monkeypatch.setenv("ILF_FEEDBACK_ACCEPT_TEST_SPLIT", "true")
    return url


@pytest.fixture
def start_feedback(store_url, execution_address, monkeypatch):
    """Starts feedback servers over the test's store (each call is a fresh process-like start); stops them after."""
    monkeypatch.setenv("ILF_EXECUTION_ADDR", execution_address)
    servers = []

    def start() -> feedback_pb2_grpc.FeedbackStub:
        server = feedback_server.build_server(0)
        server.start()
        servers.append(server)
        return feedback_pb2_grpc.FeedbackStub(channel(f"127.0.0.1:{server.port}"))
    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def feedback(start_feedback):
    return start_feedback()


def annotation(split: str = "test", index: int = 0) -> data.Annotation:
    return data.annotations(split)[index]


def submit_request(note: data.Annotation, **changes) -> feedback_pb2.SubmitFeedbackRequest:
    fields = dict(task_id=note.task_id, program=note.failing_program, feedback=note.feedback,
                  annotator_id="reviewer-1", human_refinement=note.refinement_program)
    return feedback_pb2.SubmitFeedbackRequest(**{**fields, **changes})


def rejected(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=60)
    return error.value


# ---------------------------------------------------------------- plain functions

def test_record_id_depends_on_content_only():
    note = annotation()
    first = new_record(task_id=note.task_id, program=note.failing_program, feedback=note.feedback,
                       author_kind="human", source="submitted", annotator_id="a")
    again = new_record(task_id=note.task_id, program=note.failing_program, feedback=note.feedback,
                       author_kind="human", source="paper", annotator_id="a")
    other = new_record(task_id=note.task_id, program=note.failing_program, feedback=note.feedback + " Also X.",
                       author_kind="human", source="submitted", annotator_id="a")
    assert first.record_id == again.record_id != other.record_id
    assert first.split == "test" and len(first.record_id) == 24
    with pytest.raises(InvalidArgument):
        new_record(task_id=11, program="x", feedback="y", author_kind="robot", source="submitted")


def test_records_are_immutable_and_survive_a_restart(tmp_path):
    store = open_store(f"file://{tmp_path}")
    records = FeedbackStore(store)
    record = new_record(task_id=11, program="def f(): pass", feedback="wrong", author_kind="human",
                        source="submitted", annotator_id="a")
    assert records.add(record) == (record, True)
    assert records.add(record)[1] is False
    with pytest.raises(AlreadyExists):
        store.put_json(f"feedback/records/{record.record_id}.json", {"feedback": "rewritten"})
    # A crash mid-write leaves at most a temporary file, which no reader takes for a record.
    (tmp_path / "feedback" / "records" / ".tmp-partial").write_text('{"task_id": ')
    restarted = FeedbackStore(open_store(f"file://{tmp_path}"))
    assert restarted.list() == [record]
    assert restarted.get(record.record_id) == record
    with pytest.raises(NotFound):
        restarted.get("0" * 24)
    with pytest.raises(InvalidArgument):
        restarted.get("../../etc/passwd")


def test_records_on_s3_survive_a_restart(s3_env):
    records = FeedbackStore(open_store())
    record = records.add(new_record(task_id=11, program="def f(): pass", feedback="wrong", author_kind="human",
                                    source="submitted", annotator_id="a"))[0]
    restarted = FeedbackStore(open_store())
    assert restarted.list() == [record] and restarted.add(record) == (record, False)
    key, count = restarted.export()
    assert count == 1 and read_dataset(open_store(), key) == [record.to_dict()]


def test_filters(tmp_path):
    records = FeedbackStore(open_store(f"file://{tmp_path}"))
    human = records.add(new_record(task_id=11, program="p", feedback="f", author_kind="human", source="submitted",
                                   annotator_id="a"))[0]
    model = records.add(new_record(task_id=311, program="p", feedback="f", author_kind="model", source="generated",
                                   model_version="v1"))[0]
    # MBPP_Train tasks without a paper annotation are the dev split, never trained on
    unannotated = records.add(new_record(task_id=400, program="p", feedback="f", author_kind="human",
                                         source="submitted", annotator_id="a"))[0]
    assert records.list(Filter(split="train")) == [model]
    assert records.list(Filter(split="dev")) == [unannotated]
    assert records.list(Filter(task_set="mbpp")) == records.list() and not records.list(Filter(task_set="ts-other"))
    assert records.list(Filter(author_kind="human")) == [human, unannotated]
    assert records.list(Filter(task_id=11)) == [human]
    assert records.list(Filter(since=model.created_at)) == [model, unannotated]
    assert records.list(Filter(since=model.created_at + 1)) == []
    for bad in (dict(split="holdout"), dict(author_kind="robot")):
        with pytest.raises(InvalidArgument):
            Filter(**bad)


def test_failure_summary_and_feedback_prompt():
    task = data.task(11)
    result = execution_pb2.ExecuteResponse(passed=False, tests=[
        execution_pb2.TestResult(index=0, verdict=execution_pb2.VERDICT_PASSED),
        execution_pb2.TestResult(index=1, verdict=execution_pb2.VERDICT_ERROR, error_type="TypeError",
                                 error_message="bad operand"),
        execution_pb2.TestResult(index=2, verdict=execution_pb2.VERDICT_FAILED, error_type="AssertionError")])
    assert failure_of(result) == "test 2: ERROR TypeError: bad operand"
    report = results_report(task, result)
    assert report.splitlines()[1] == f"{task.tests[1].strip()}  # ERROR (TypeError)"
    assert failure_of(execution_pb2.ExecuteResponse(error_type="SyntaxError", error_message="bad")) \
        == "the program did not load: SyntaxError: bad"
    zero_shot = feedback_prompt(task, "def remove_Occ(s, ch): return s", result)
    two_shot = feedback_prompt(task, "def remove_Occ(s, ch): return s", result, shots=2)
    assert zero_shot.endswith("FEEDBACK:\n") and zero_shot.count("FEEDBACK:") == 1
    assert two_shot.endswith(zero_shot.split("\n\n", 1)[1]) and two_shot.count("FEEDBACK:") == 3
    assert "\r" not in two_shot and report in two_shot
    with pytest.raises(InvalidArgument):
        feedback_prompt(task, "x", result, shots=3)


def test_the_service_imports_no_other_service():
    for path in (ROOT / "services" / "feedback").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("services.") or name.startswith("services.feedback"), f"{path}: {name}"


# ---------------------------------------------------------------- over gRPC, with the real execution service

def test_import_of_the_paper_annotations_is_idempotent(feedback, store_url):
    first = feedback.ImportPaperAnnotations(feedback_pb2.ImportPaperAnnotationsRequest(), timeout=60)
    assert (first.imported, first.already_present, dict(first.per_split)) == (195, 0, PAPER_SPLITS)
    again = feedback.ImportPaperAnnotations(feedback_pb2.ImportPaperAnnotationsRequest(), timeout=60)
    assert (again.imported, again.already_present, dict(again.per_split)) == (0, 195, PAPER_SPLITS)
    for split, count in PAPER_SPLITS.items():
        listed = feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(
            filter=feedback_pb2.FeedbackFilter(split=split)), timeout=60).records
        assert len(listed) == count
    record = listed[0]
    assert record.author_kind == feedback_pb2.AUTHOR_KIND_HUMAN and record.source == "paper"
    assert record.human_refinement and record.annotator_id and not record.tests.checked

    export = feedback.ExportDataset(feedback_pb2.ExportDatasetRequest(
        filter=feedback_pb2.FeedbackFilter(split="refine")), timeout=60)
    assert export.records == 44 and export.key.startswith("datasets/feedback-")
    rows = read_dataset(open_store(store_url), export.key)
    assert len(rows) == 44 and all(EXPORT_FIELDS <= set(row) for row in rows)
    assert {row["task_id"] for row in rows} <= set(data.SPLITS["refine"])
    assert {row["author_kind"] for row in rows} == {"human"}
    same = feedback.ExportDataset(feedback_pb2.ExportDatasetRequest(
        filter=feedback_pb2.FeedbackFilter(split="refine")), timeout=60)
    assert same.key == export.key


def test_submission_is_checked_stored_and_returned_again(feedback):
    note = annotation()
    record = feedback.SubmitFeedback(submit_request(note), timeout=60)
    assert record.task_id == note.task_id and record.split == "test" and record.schema_version == 1
    assert record.author_kind == feedback_pb2.AUTHOR_KIND_HUMAN and record.annotator_id == "reviewer-1"
    assert record.tests.checked and record.tests.refinement_passed
    assert record.tests.tests_passed < record.tests.tests_total == len(data.task(note.task_id).tests)
    assert record.tests.failure.startswith("test ")
    assert feedback.GetFeedback(feedback_pb2.GetFeedbackRequest(record_id=record.record_id), timeout=10) == record
    # A retried submission (say, after a lost reply) is the same record, not a second one.
    assert feedback.SubmitFeedback(submit_request(note), timeout=60) == record
    without_refinement = feedback.SubmitFeedback(submit_request(note, human_refinement=""), timeout=60)
    assert without_refinement.record_id != record.record_id and not without_refinement.tests.refinement_passed


def test_feedback_on_a_test_task_is_refused_by_default(feedback, monkeypatch):
    """No round trains on a test split, and feedback there would leak held-out tasks: refused, saying so."""
    monkeypatch.setenv("ILF_FEEDBACK_ACCEPT_TEST_SPLIT", "false")
    refusing = feedback_server.build_server(0)
    refusing.start()
    try:
        stub = feedback_pb2_grpc.FeedbackStub(channel(f"127.0.0.1:{refusing.port}"))
        error = rejected(stub.SubmitFeedback, submit_request(annotation()))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "test split" in error.details() and "ILF_FEEDBACK_ACCEPT_TEST_SPLIT" in error.details()
        train = annotation("train")
        assert stub.SubmitFeedback(submit_request(train), timeout=60).split == "train"
    finally:
        refusing.stop(0)


def test_bad_submissions_are_rejected_with_the_reason(feedback):
    note = annotation()
    task = data.task(note.task_id)
    error = rejected(feedback.SubmitFeedback, submit_request(note, task_id=9999))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "9999" in error.details()
    error = rejected(feedback.SubmitFeedback, submit_request(note, program=note.refinement_program))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "passes all 3 tests" in error.details()
    error = rejected(feedback.SubmitFeedback, submit_request(note, human_refinement=note.failing_program))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refinement does not pass" in error.details() and "test " in error.details()
    for changes, reason in [(dict(feedback="  \n"), "feedback is empty"),
                            (dict(feedback="x" * (config.get("ILF_MAX_FEEDBACK_CHARS") + 1)), "feedback is longer"),
                            (dict(annotator_id=""), "annotator_id is empty"),
                            (dict(program=""), "program is empty")]:
        error = rejected(feedback.SubmitFeedback, submit_request(note, **changes))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.details()
    assert "passes" in rejected(feedback.SubmitFeedback, submit_request(note, program=task.code)).details()
    assert not feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(), timeout=10).records
    error = rejected(feedback.GetFeedback, feedback_pb2.GetFeedbackRequest(record_id="f" * 24))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rejected(feedback.ExportDataset, feedback_pb2.ExportDatasetRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nothing to export" in error.details()


def test_a_restarted_service_sees_every_record(start_feedback):
    first = start_feedback()
    submitted = [first.SubmitFeedback(submit_request(annotation(index=i)), timeout=60) for i in range(3)]
    restarted = start_feedback()
    listed = restarted.ListFeedback(feedback_pb2.ListFeedbackRequest(), timeout=10).records
    assert list(listed) == submitted  # oldest first
    since = restarted.ListFeedback(feedback_pb2.ListFeedbackRequest(
        filter=feedback_pb2.FeedbackFilter(since=submitted[1].created_at)), timeout=10).records
    assert list(since) == submitted[1:]


def test_an_unreachable_execution_service_is_unavailable(store_url, monkeypatch):
    monkeypatch.setenv("ILF_EXECUTION_ADDR", f"127.0.0.1:{free_port()}")
    server = feedback_server.build_server(0)
    server.start()
    try:
        stub = feedback_pb2_grpc.FeedbackStub(channel(f"127.0.0.1:{server.port}"))
        error = rejected(stub.SubmitFeedback, submit_request(annotation()))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "execution service" in error.details()
    finally:
        server.stop(0)


def test_exported_records_are_the_stored_records(feedback, store_url):
    record = feedback.SubmitFeedback(submit_request(annotation()), timeout=60)
    export = feedback.ExportDataset(feedback_pb2.ExportDatasetRequest(), timeout=10)
    stored = json.loads(open_store(store_url).get(f"feedback/records/{record.record_id}.json"))
    assert export.records == 1 and read_dataset(open_store(store_url), export.key) == [stored]


def test_long_test_values_are_clipped_so_the_feedback_prompt_fits_a_small_model():
    # MBPP 493's asserts and values are kilobytes of float pairs: unclipped, its 2-shot prompt was 8,077 tokens.
    task = data.task(493)
    value = repr([[(float(i), float(-i))] * 6 for i in range(200)])
    result = execution_pb2.ExecuteResponse(passed=False, tests=[
        execution_pb2.TestResult(index=i, verdict=execution_pb2.VERDICT_FAILED, error_type="AssertionError",
                                 actual=value, expected=value) for i in range(len(task.tests))])
    report = results_report(task, result)
    assert max(len(test) for test in task.tests) > MAX_REPORTED_CHARS
    for line, test in zip(report.splitlines(), task.tests, strict=True):
        assert line.startswith(test.strip()[:MAX_REPORTED_CHARS] + " ...  # FAILED (AssertionError) got ")
        assert len(line) < 3 * (MAX_REPORTED_CHARS + 100)
    long_load_error = execution_pb2.ExecuteResponse(error_type="SyntaxError", error_message="x" * 5000)
    assert len(results_report(task, long_load_error)) == MAX_REPORTED_CHARS + len(" ...")
    assert len(feedback_prompt(task, "def f():\n" + "    pass\n" * 1000, result, shots=2)) < 12_000
