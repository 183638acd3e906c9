"""gRPC servicer of the feedback service, a thin layer over FeedbackService."""
from __future__ import annotations

from ilf import config
from ilf.grpc_util import Server, channel, setup_logging
from ilf.store import ArtifactStore, open_store
from ilf.v1 import execution_pb2_grpc, feedback_pb2, feedback_pb2_grpc, generation_pb2_grpc
from services.feedback.checks import FeedbackChecks
from services.feedback.records import FeedbackRecord, FeedbackStore, Filter
from services.feedback.service import FeedbackService
from services.feedback.writer import FeedbackWriter

AUTHOR_KINDS = {"human": feedback_pb2.AUTHOR_KIND_HUMAN, "model": feedback_pb2.AUTHOR_KIND_MODEL}
AUTHOR_KIND_NAMES = {number: name for name, number in AUTHOR_KINDS.items()}


def record_proto(record: FeedbackRecord) -> feedback_pb2.FeedbackRecord:
    fields = record.to_dict()
    return feedback_pb2.FeedbackRecord(**{**fields, "author_kind": AUTHOR_KINDS[record.author_kind],
                                          "tests": feedback_pb2.TestSummary(**fields["tests"])})


def filter_of(message: feedback_pb2.FeedbackFilter) -> Filter:
    return Filter(task_id=message.task_id, split=message.split,
                  author_kind=AUTHOR_KIND_NAMES.get(message.author_kind, ""), since=message.since)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, service: FeedbackService):
        self.service = service

    def SubmitFeedback(self, request, context):
        return record_proto(self.service.submit(request.task_id, request.program, request.feedback,
                                                request.annotator_id, request.human_refinement))

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
                                                  shots=request.shots, model_version=request.model_version))


def build_server(port: int, store: ArtifactStore | None = None) -> Server:
    """The server, not started; it reaches execution and generation at ILF_EXECUTION_ADDR and ILF_GENERATION_ADDR."""
    service = FeedbackService(
        FeedbackStore(store or open_store()),
        FeedbackChecks(execution_pb2_grpc.ExecutionStub(channel(config.get("ILF_EXECUTION_ADDR")))),
        FeedbackWriter(generation_pb2_grpc.GenerationStub(channel(config.get("ILF_GENERATION_ADDR")))))
    server = Server([feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name], port)
    server.add(feedback_pb2_grpc.add_FeedbackServicer_to_server, FeedbackServicer(service))
    # Nothing to load: it serves at once, and answers UNAVAILABLE per call while a service it needs is down.
    server.set_serving(True)
    return server


def main(argv=None) -> None:
    setup_logging()
    build_server(int(config.get("ILF_FEEDBACK_PORT"))).run_until_signal()
