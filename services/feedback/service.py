"""Plain-Python core of the feedback service: checks, then stores, each kind of feedback; task sets; the queue."""
from __future__ import annotations

from ilf import tasksets
from ilf.errors import FailedPrecondition, InvalidArgument
from ilf.metrics import track
from ilf.v1 import common_pb2
from services.feedback import metrics
from services.feedback.checks import FeedbackChecks, failure_of, summary_of
from services.feedback.collect import Collection, collect
from services.feedback.queue import QUEUED, Item, Queue, State
from services.feedback.records import FeedbackRecord, FeedbackStore, new_record
from services.feedback.writer import FeedbackWriter, feedback_prompt


class FeedbackService:
    def __init__(self, records: FeedbackStore, checks: FeedbackChecks, writer: FeedbackWriter, *,
                 accept_test_split: bool = False):
        self.records = records
        self.accept_test_split = accept_test_split
        self.checks = checks
        self.writer = writer
        self.task_sets = tasksets.TaskSets(records.store)
        self.queue = Queue(records.store)
        track(self.queue, metrics.QUEUE)

    def submit(self, task_id: int, program: str, feedback: str, annotator_id: str,
               human_refinement: str = "", *, task_set: str = "", source: str = "submitted",
               program_model_version: str = "", queue_item: str = "") -> FeedbackRecord:
        """A person's feedback, stored once it passes the checks; resubmitting it returns the stored record."""
        tasks = self.task_sets.get(task_set)
        task = tasks.task(task_id)
        if task.split == "test" and not self.accept_test_split:
            raise FailedPrecondition(
                f"task {task_id} of {tasks.name} is in the test split: no round trains on it, and feedback there "
                "would leak held-out tasks into training; give feedback on a train task, or set "
                "ILF_FEEDBACK_ACCEPT_TEST_SPLIT=true to store it anyway")
        tests = self.checks.check_submission(task, program, feedback, annotator_id, human_refinement)
        record, _ = self.records.add(new_record(
            task_id=task_id, program=program, feedback=feedback.strip(), author_kind="human", source=source,
            annotator_id=annotator_id.strip(), human_refinement=human_refinement, tests=tests, task_set=tasks,
            program_model_version=program_model_version, queue_item=queue_item))
        return record

    def generate(self, task_id: int, program: str, params: common_pb2.SamplingParams, *, shots: int = 0,
                 model_version: str = "", task_set: str = "", source: str = "generated",
                 program_model_version: str = "", queue_item: str = "") -> FeedbackRecord:
        """Feedback written by the generation service's model from the task, the program and its test results."""
        tasks = self.task_sets.get(task_set)
        task = tasks.task(task_id)
        result = self.checks.failing_run(task, program)
        feedback, version = self.writer.write(feedback_prompt(task, program, result, shots), params, model_version)
        record, _ = self.records.add(new_record(
            task_id=task_id, program=program, feedback=feedback, author_kind="model", source=source,
            model_version=version, tests=summary_of(task, result), task_set=tasks,
            program_model_version=program_model_version, queue_item=queue_item))
        return record

    # task sets

    def import_task_set(self, body: bytes, label: str = "") -> tuple[tasksets.TaskSet, bool]:
        """Validates every row (tests through the execution service; a reference solution must pass), then
        stores the task set whole; INVALID_ARGUMENT names every bad row by line with the reason."""
        rows, errors = tasksets.parse_jsonl(body)
        # A row without a reference still runs (an empty program), so the execution service checks its tests.
        runs = [(task, task.reference if task.reference.strip() else "pass") for _, task in rows]
        for (line, task), result in zip(rows, self.checks.run_each(runs) if rows else []):
            if isinstance(result, InvalidArgument):
                errors.append((line, f"the execution service refused it: {result}"))
            elif isinstance(result, Exception):
                raise result  # the execution service is down: the caller may retry
            elif task.reference.strip() and not result.passed:
                errors.append((line, f"the reference solution fails: {failure_of(result)}"))
        if errors:
            raise tasksets.rejection(errors)
        return self.task_sets.put([task for _, task in rows], label)

    # the annotation queue

    def collect(self, task_set: str, params: common_pb2.SamplingParams, *, max_tasks: int = 0,
                task_ids: tuple[int, ...] = (), model_version: str = "", timeout_s: float = 0.0) -> Collection:
        return collect(self.task_sets.get(task_set), self.writer.generation, self.checks, self.queue, params,
                       max_tasks=max_tasks, task_ids=task_ids, model_version=model_version, timeout_s=timeout_s)

    def answer(self, item_id: str, lease_id: str, annotator_id: str, feedback: str,
               human_refinement: str = "") -> FeedbackRecord:
        """A person's answer to a leased item, checked as SubmitFeedback is; the same answer again returns
        the stored record."""
        self.queue.get(item_id)  # NOT_FOUND before anything else
        with self.queue.item_lock(item_id):
            item, state = self.queue.get(item_id)
            if state.record_id:
                return self._repeated_answer(item, state, annotator_id, feedback, human_refinement)
            self.queue.check_lease(item_id, lease_id)
            record = self.submit(item.task_id, item.program, feedback, annotator_id, human_refinement,
                                 task_set=item.task_set, source="queue", program_model_version=item.model_version,
                                 queue_item=item_id)
            self.queue.answered(item_id, record.record_id, "human", lease_id=lease_id)
            return record

    def _repeated_answer(self, item: Item, state: State, annotator_id: str, feedback: str,
                         human_refinement: str) -> FeedbackRecord:
        stored = self.records.get(state.record_id)
        if (stored.author_kind, stored.annotator_id, stored.feedback, stored.human_refinement) == (
                "human", annotator_id.strip(), feedback.strip(), human_refinement):
            return stored
        raise FailedPrecondition(f"queue item {item.item_id} is already answered by {stored.author_kind} "
                                 f"feedback (record {stored.record_id})")

    def answer_with_model(self, *, task_set: str = "", max_items: int = 0, older_than_s: float = 0.0,
                          params: common_pb2.SamplingParams, shots: int = 0,
                          model_version: str = "") -> tuple[list[FeedbackRecord], int]:
        """Model-written feedback for queued items no one holds (oldest first); returns (records, silent)."""
        now = self.queue.clock()
        waiting = [item for item, _ in self.queue.list(task_set=task_set, state=QUEUED)
                   if now - item.created_at >= older_than_s][:max_items or None]
        records, silent = [], 0
        for item in waiting:
            try:
                record = self.generate(item.task_id, item.program, params, shots=shots, model_version=model_version,
                                       task_set=item.task_set, source="queue-model",
                                       program_model_version=item.model_version, queue_item=item.item_id)
            except FailedPrecondition:  # the model wrote only whitespace: the item waits for a person
                silent += 1
                continue
            with self.queue.item_lock(item.item_id):
                if self.queue.get(item.item_id)[1].state != QUEUED:
                    continue  # someone leased or answered it meanwhile; their answer wins
                self.queue.answered(item.item_id, record.record_id, "model")
            records.append(record)
        return records, silent
