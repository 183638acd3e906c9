"""Model-written feedback: the feedback service asks a generation service (tiny random model), records the author."""
from __future__ import annotations

import grpc
import pytest

from ilf import data
from ilf.grpc_util import channel
from ilf.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, generation_pb2, generation_pb2_grpc
from services.feedback import server as feedback_server

# The random model's greedy choice may be whitespace; sampling with a seed writes words, the same each time.
PARAMS = common_pb2.SamplingParams(temperature=1.0, max_new_tokens=16, seed=7)


@pytest.fixture
def stubs(ilf_env, monkeypatch):
    from services.execution.server import build_server as build_execution
    from services.generation.server import build_server as build_generation
    execution = build_execution(0)
    execution.start()
    generation = build_generation(0)
    generation.start()
    assert generation.ready.wait(300), "the tiny model did not load"
    monkeypatch.setenv("ILF_EXECUTION_ADDR", f"127.0.0.1:{execution.port}")
    monkeypatch.setenv("ILF_GENERATION_ADDR", f"127.0.0.1:{generation.port}")
    feedback = feedback_server.build_server(0)
    feedback.start()
    yield (feedback_pb2_grpc.FeedbackStub(channel(f"127.0.0.1:{feedback.port}")),
           generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{generation.port}")))
    feedback.stop(0)
    generation.stop(0)
    execution.stop(grace=None)


def test_model_written_feedback_is_recorded_with_its_model_version_and_checked(stubs):
    feedback, generation = stubs
    serving = generation.GetModelStatus(generation_pb2.GetModelStatusRequest(), timeout=10).serving_version
    note = data.annotations("train")[0]
    request = feedback_pb2.GenerateFeedbackRequest(task_id=note.task_id, program=note.failing_program,
                                                   params=PARAMS, shots=2)
    record = feedback.GenerateFeedback(request, timeout=300)
    assert record.author_kind == feedback_pb2.AUTHOR_KIND_MODEL and record.source == "generated"
    assert record.model_version == serving and not record.annotator_id and not record.human_refinement
    assert record.feedback.strip() and record.split == "train"
    assert record.tests.checked and record.tests.tests_passed < record.tests.tests_total
    # Sampling with the same seed writes the same feedback: the same record.
    assert feedback.GenerateFeedback(request, timeout=300).record_id == record.record_id
    listed = feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(
        filter=feedback_pb2.FeedbackFilter(author_kind=feedback_pb2.AUTHOR_KIND_MODEL)), timeout=10).records
    assert [r.record_id for r in listed] == [record.record_id]
    assert not feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(
        filter=feedback_pb2.FeedbackFilter(author_kind=feedback_pb2.AUTHOR_KIND_HUMAN)), timeout=10).records

    # Rejections, in the same test because loading the model is the slow part.
    cases = [
        (dict(program=note.refinement_program), grpc.StatusCode.INVALID_ARGUMENT, "passes all"),
        (dict(shots=3), grpc.StatusCode.INVALID_ARGUMENT, "shots"),
        (dict(task_id=0), grpc.StatusCode.NOT_FOUND, "no task 0"),
        (dict(model_version="no-such-version"), grpc.StatusCode.NOT_FOUND, "generation service answered NOT_FOUND"),
    ]
    for changes, code, reason in cases:
        request = feedback_pb2.GenerateFeedbackRequest(
            **{**dict(task_id=note.task_id, program=note.failing_program, params=PARAMS), **changes})
        with pytest.raises(grpc.RpcError) as error:
            feedback.GenerateFeedback(request, timeout=300)
        assert error.value.code() == code, error.value.details()
        assert reason in error.value.details()
