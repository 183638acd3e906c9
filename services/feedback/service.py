"""Plain-Python core of the feedback service: checks, then stores, each kind of feedback."""
from __future__ import annotations

from ilf.v1 import common_pb2
from services.feedback.checks import FeedbackChecks, summary_of, task_of
from services.feedback.records import FeedbackRecord, FeedbackStore, new_record
from services.feedback.writer import FeedbackWriter, feedback_prompt


class FeedbackService:
    def __init__(self, records: FeedbackStore, checks: FeedbackChecks, writer: FeedbackWriter):
        self.records = records
        self.checks = checks
        self.writer = writer

    def submit(self, task_id: int, program: str, feedback: str, annotator_id: str,
               human_refinement: str = "") -> FeedbackRecord:
        """A person's feedback, stored once it passes the checks; resubmitting it returns the stored record."""
        tests = self.checks.check_submission(task_id, program, feedback, annotator_id, human_refinement)
        record, _ = self.records.add(new_record(
            task_id=task_id, program=program, feedback=feedback.strip(), author_kind="human", source="submitted",
            annotator_id=annotator_id.strip(), human_refinement=human_refinement, tests=tests))
        return record

    def generate(self, task_id: int, program: str, params: common_pb2.SamplingParams, *, shots: int = 0,
                 model_version: str = "") -> FeedbackRecord:
        """Feedback written by the generation service's model from the task, the program and its test results."""
        task = task_of(task_id)
        result = self.checks.failing_run(task, program)
        feedback, version = self.writer.write(feedback_prompt(task, program, result, shots), params, model_version)
        record, _ = self.records.add(new_record(
            task_id=task_id, program=program, feedback=feedback, author_kind="model", source="generated",
            model_version=version, tests=summary_of(task, result)))
        return record
