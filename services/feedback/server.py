"""gRPC servicer of the feedback service, a thin layer over FeedbackService."""
from __future__ import annotations

import logging

from ilf.grpc_util import Server, Service, channel, serve, timestamp, unix_seconds
from ilf.store import ArtifactStore, open_store
from ilf.tasksets import TaskSet
from ilf.v1 import common_pb2, execution_pb2, execution_pb2_grpc, feedback_pb2, feedback_pb2_grpc, generation_pb2_grpc
from services.feedback.checks import FeedbackChecks
from services.feedback.config import FeedbackConfig
from services.feedback.queue import STATES, Item, State
from services.feedback.records import FeedbackRecord, FeedbackStore, Filter
from services.feedback.service import FeedbackService
from services.feedback.web import annotation_page
from services.feedback.writer import FeedbackWriter

log = logging.getLogger(__name__)

AUTHOR_KINDS = {"human": feedback_pb2.AUTHOR_KIND_HUMAN, "model": feedback_pb2.AUTHOR_KIND_MODEL}
AUTHOR_KIND_NAMES = {number: name for name, number in AUTHOR_KINDS.items()}


def record_proto(record: FeedbackRecord) -> feedback_pb2.FeedbackRecord:
    fields = record.to_dict()
    return feedback_pb2.FeedbackRecord(**{**fields, "author_kind": AUTHOR_KINDS[record.author_kind],
                                          "tests": feedback_pb2.TestSummary(**fields["tests"]),
                                          "created_at": timestamp(record.created_at)})


def filter_of(message: feedback_pb2.FeedbackFilter) -> Filter:
    return Filter(task_id=message.task_id, split=message.split,
                  author_kind=AUTHOR_KIND_NAMES.get(message.author_kind, ""), since=unix_seconds(message.since),
                  task_set=message.task_set)


def task_set_proto(task_set: TaskSet, *, include_tasks: bool = False, imported: bool = False
                   ) -> feedback_pb2.TaskSetInfo:
    tasks = [common_pb2.Task(task_id=t.task_id, text=t.text, tests=t.tests, test_setup_code=t.test_setup_code,
                             code_prefix=t.code_prefix, task_set=task_set.name) for t in task_set.tasks]
    return feedback_pb2.TaskSetInfo(name=task_set.name, label=task_set.label, tasks_per_split=task_set.counts(),
                                    created_at=timestamp(task_set.created_at), tasks=tasks if include_tasks else [],
                                    imported=imported)


# QUEUE_STATE_QUEUED, _LEASED, _ANSWERED by the queue's state names
QUEUE_STATES = {name: feedback_pb2.QueueState.Value(f"QUEUE_STATE_{name.upper()}") for name in STATES}
QUEUE_STATE_NAMES = {number: name for name, number in QUEUE_STATES.items()}


def item_proto(item: Item, state: State, task_text: str, *, show_lease: bool = False) -> feedback_pb2.QueueItem:
    tests = [feedback_pb2.ItemTest(test=t["test"], result=execution_pb2.TestResult(
        index=t["index"], verdict=execution_pb2.Verdict.Value(f"VERDICT_{t['verdict']}"), error_type=t["error_type"],
        error_message=t["error_message"], duration_s=t["duration_s"], actual=t["actual"], expected=t["expected"]))
        for t in item.tests]
    return feedback_pb2.QueueItem(
        item_id=item.item_id, task_set=item.task_set, task_id=item.task_id, task_text=task_text, program=item.program,
        model_version=item.model_version, tests=tests, load_error=item.load_error, state=QUEUE_STATES[state.state],
        lease_id=state.lease_id if show_lease else "", leased_by=state.leased_by,
        lease_expires_at=timestamp(state.lease_expires_at), skipped_by=state.skipped_by, record_id=state.record_id,
        answered_by=state.answered_by, created_at=timestamp(item.created_at))


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, service: FeedbackService):
        self.service = service

    def SubmitFeedback(self, request, context):
        return record_proto(self.service.submit(request.task_id, request.program, request.feedback,
                                                request.annotator_id, request.human_refinement,
                                                task_set=request.task_set))

    def GetFeedback(self, request, context):
        return record_proto(self.service.records.get(request.record_id))

    def ListFeedback(self, request, context):
        records = self.service.records.list(filter_of(request.filter))
        return feedback_pb2.ListFeedbackResponse(records=[record_proto(r) for r in records])

    def ExportDataset(self, request, context):
        key, count = self.service.records.export(filter_of(request.filter))
        return feedback_pb2.ExportDatasetResponse(key=key, records=count)

    def ImportPaperAnnotations(self, request, context):
        imported, present, per_split = self.service.records.import_paper_annotations()
        return feedback_pb2.ImportPaperAnnotationsResponse(imported=imported, already_present=present,
                                                           per_split=per_split)

    def GenerateFeedback(self, request, context):
        return record_proto(self.service.generate(request.task_id, request.program, request.params,
                                                  shots=request.shots, model_version=request.model_version,
                                                  task_set=request.task_set))

    def ImportTaskSet(self, request, context):
        task_set, new = self.service.import_task_set(request.jsonl, request.label)
        return task_set_proto(task_set, imported=new)

    def GetTaskSet(self, request, context):
        return task_set_proto(self.service.task_sets.get(request.name), include_tasks=request.include_tasks)

    def ListTaskSets(self, request, context):
        return feedback_pb2.ListTaskSetsResponse(task_sets=[task_set_proto(s) for s in self.service.task_sets.list()])

    def Collect(self, request, context):
        done = self.service.collect(request.task_set, request.params, max_tasks=request.max_tasks,
                                    task_ids=tuple(request.task_ids), model_version=request.model_version,
                                    timeout_s=request.timeout_s)
        return feedback_pb2.CollectResponse(model_version=done.model_version, tasks=done.tasks, samples=done.samples,
                                            failing=done.failing, queued=done.queued, duplicates=done.duplicates,
                                            item_ids=done.item_ids)

    def _item(self, item: Item, state: State, *, show_lease: bool = False) -> feedback_pb2.QueueItem:
        text = self.service.task_sets.get(item.task_set).task(item.task_id).text
        return item_proto(item, state, text, show_lease=show_lease)

    def ListQueue(self, request, context):
        rows = self.service.queue.list(task_set=request.task_set, state=QUEUE_STATE_NAMES.get(request.state, ""),
                                       limit=request.limit)
        return feedback_pb2.ListQueueResponse(items=[self._item(item, state) for item, state in rows])

    def LeaseItem(self, request, context):
        item, state = self.service.queue.lease(request.annotator_id, task_set=request.task_set,
                                               item_id=request.item_id, lease_s=request.lease_seconds)
        return self._item(item, state, show_lease=True)

    def SkipItem(self, request, context):
        return self._item(*self.service.queue.skip(request.item_id, request.lease_id, request.reason))

    def AnswerItem(self, request, context):
        return record_proto(self.service.answer(request.item_id, request.lease_id, request.annotator_id,
                                                request.feedback, request.human_refinement))

    def AnswerWithModel(self, request, context):
        records, silent = self.service.answer_with_model(
            task_set=request.task_set, max_items=request.max_items, older_than_s=request.older_than_s,
            params=request.params, shots=request.shots, model_version=request.model_version)
        return feedback_pb2.AnswerWithModelResponse(records=[record_proto(r) for r in records], silent=silent)


class FeedbackGrpcService(Service):
    names = (feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name,)

    def __init__(self, service: FeedbackService, settings: FeedbackConfig):
        self.service = service
        self.settings = settings
        self.web = annotation_page(service, settings)

    def add_to(self, grpc_server) -> None:
        feedback_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(self.service), grpc_server)

    def load(self) -> str:
        # Nothing to load: it serves at once, and answers UNAVAILABLE per call while a service it needs is down.
        if self.web:
            self.web.start()
        return (f"execution at {self.settings.execution_addr}, generation at {self.settings.generation_addr}"
                + (f", annotation page at {self.web.url}" if self.web else ""))

    def close(self) -> None:
        if self.web:
            self.web.stop()


def build_server(port: int | None = None, store: ArtifactStore | None = None,
                 settings: FeedbackConfig | None = None) -> Server:
    """The server, not started; it reaches execution and generation at ILF_EXECUTION_ADDR and ILF_GENERATION_ADDR."""
    settings = settings or FeedbackConfig.from_env()
    service = FeedbackService(
        FeedbackStore(store or open_store()),
        FeedbackChecks(execution_pb2_grpc.ExecutionStub(channel(settings.execution_addr)),
                       max_feedback_chars=settings.max_feedback_chars, max_program_chars=settings.max_program_chars),
        FeedbackWriter(generation_pb2_grpc.GenerationStub(channel(settings.generation_addr)),
                       max_feedback_chars=settings.max_feedback_chars),
        accept_test_split=settings.accept_test_split)
    return Server(FeedbackGrpcService(service, settings), settings, port)


def main(argv=None) -> None:
    serve(build_server)
