"""Checks on feedback before it is stored: sizes, the task, and the program's and refinement's test results.

Programs run through the execution service (gRPC); this service never runs code itself.
"""
from __future__ import annotations

import grpc

from ilf.errors import IlfError, InvalidArgument, upstream_error
from ilf.tasksets import Task
from ilf.v1 import execution_pb2, execution_pb2_grpc
from services.feedback.records import TestSummary

MAX_ANNOTATOR_CHARS = 200
EXECUTION_CALL_S = 120.0

def check_text(name: str, value: str, limit: int, *, required: bool = True) -> None:
    if required and not value.strip():
        raise InvalidArgument(f"{name} is empty")
    if len(value) > limit:
        raise InvalidArgument(f"{name} is longer than {limit} characters ({len(value)})")


def failure_of(result: execution_pb2.ExecuteResponse) -> str:
    """The first reason the program did not pass, in one line."""
    if result.error_type:
        return f"the program did not load: {result.error_type}: {result.error_message}".strip()
    for test in result.tests:
        if test.verdict != execution_pb2.VERDICT_PASSED:
            verdict = execution_pb2.Verdict.Name(test.verdict).removeprefix("VERDICT_")
            detail = ": ".join(p for p in (test.error_type, test.error_message) if p)
            if test.actual:
                detail += f" (got {test.actual}" + (f", expected {test.expected})" if test.expected else ")")
            return f"test {test.index + 1}: {verdict}" + (f" {detail}" if detail else "")
    return ""


class FeedbackChecks:
    """Runs programs against their task's tests through an Execution stub and rejects bad submissions."""

    def __init__(self, execution: execution_pb2_grpc.ExecutionStub, *, max_feedback_chars: int,
                 max_program_chars: int):
        self.execution = execution
        self.max_feedback_chars = max_feedback_chars     # ILF_MAX_FEEDBACK_CHARS
        self.max_program_chars = max_program_chars       # ILF_MAX_PROGRAM_CHARS

    def _run_async(self, task: Task, program: str):
        request = execution_pb2.ExecuteRequest(program=program, test_setup_code=task.test_setup_code,
                                               tests=list(task.tests))
        return self.execution.Execute.future(request, timeout=EXECUTION_CALL_S)

    def run_each(self, runs: list[tuple[Task, str]]) -> list[execution_pb2.ExecuteResponse | IlfError]:
        """The result of every (task, program) in order, or the error its call got; the calls run concurrently."""
        calls = [self._run_async(task, program) for task, program in runs]
        results = []
        for call in calls:
            try:
                results.append(self._result(call))
            except IlfError as error:
                results.append(error)
        return results

    def run_batch(self, runs: dict[str, tuple[Task, str]], timeout_s: float = 0.0,
                  call_s: float = 1800.0) -> dict[str, execution_pb2.ExecuteResponse]:
        """Results by id of many (task, program) pairs in one streamed ExecuteBatch call."""
        requests = [execution_pb2.ExecuteRequest(program=program, test_setup_code=task.test_setup_code,
                                                 tests=list(task.tests), timeout_s=timeout_s, request_id=rid)
                    for rid, (task, program) in runs.items()]
        results = {}
        try:
            for finished in self.execution.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests),
                                                        timeout=call_s):
                results.update((r.request_id, r) for r in finished.results)
        except grpc.RpcError as error:
            raise upstream_error("execution", error) from None
        return results

    @staticmethod
    def _result(call) -> execution_pb2.ExecuteResponse:
        try:
            return call.result()
        except grpc.RpcError as error:
            raise upstream_error("execution", error) from None

    def failing_run(self, task: Task, program: str) -> execution_pb2.ExecuteResponse:
        """The program's results; INVALID_ARGUMENT when it passes (feedback is for failing programs)."""
        check_text("program", program, self.max_program_chars)
        return self._require_failure(task, self._result(self._run_async(task, program)))

    @staticmethod
    def _require_failure(task: Task, result: execution_pb2.ExecuteResponse) -> execution_pb2.ExecuteResponse:
        if result.passed:
            raise InvalidArgument(f"the program passes all {len(task.tests)} tests of task {task.task_id}: "
                                  "feedback is for programs that fail them")
        return result

    def check_submission(self, task: Task, program: str, feedback: str, annotator_id: str,
                         human_refinement: str) -> TestSummary:
        """Raises INVALID_ARGUMENT with the reason; returns the test results to store."""
        check_text("feedback", feedback, self.max_feedback_chars)
        check_text("annotator_id", annotator_id, MAX_ANNOTATOR_CHARS)
        check_text("program", program, self.max_program_chars)
        check_text("human_refinement", human_refinement, self.max_program_chars, required=False)
        # Program and refinement run at the same time.
        program_call = self._run_async(task, program)
        refinement_call = self._run_async(task, human_refinement) if human_refinement.strip() else None
        result = self._require_failure(task, self._result(program_call))
        if refinement_call:
            refined = self._result(refinement_call)
            if not refined.passed:
                raise InvalidArgument(f"the human refinement does not pass the tests of task {task.task_id}: "
                                      f"{failure_of(refined)}")
        return summary_of(task, result, refinement_passed=refinement_call is not None)


def summary_of(task: Task, result: execution_pb2.ExecuteResponse, *,
               refinement_passed: bool = False) -> TestSummary:
    return TestSummary(checked=True, tests_total=len(task.tests),
                       tests_passed=sum(t.verdict == execution_pb2.VERDICT_PASSED for t in result.tests),
                       failure=failure_of(result), refinement_passed=refinement_passed)
