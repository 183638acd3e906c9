"""gRPC clients of the services, as the round and the command line use them."""
from __future__ import annotations

from dataclasses import dataclass

from ilf import config
from ilf.grpc_util import channel
from ilf.v1 import (execution_pb2_grpc, feedback_pb2_grpc, generation_pb2_grpc, refinement_pb2_grpc,
                    training_pb2_grpc)


@dataclass
class Clients:
    generation: generation_pb2_grpc.GenerationStub
    refinement: refinement_pb2_grpc.RefinementStub
    execution: execution_pb2_grpc.ExecutionStub
    training: training_pb2_grpc.TrainingStub
    feedback: feedback_pb2_grpc.FeedbackStub

    @classmethod
    def connect(cls, generation: str | None = None, refinement: str | None = None, execution: str | None = None,
                training: str | None = None, feedback: str | None = None) -> "Clients":
        return cls(
            generation=generation_pb2_grpc.GenerationStub(channel(generation or config.get("ILF_GENERATION_ADDR"))),
            refinement=refinement_pb2_grpc.RefinementStub(channel(refinement or config.get("ILF_REFINEMENT_ADDR"))),
            execution=execution_pb2_grpc.ExecutionStub(channel(execution or config.get("ILF_EXECUTION_ADDR"))),
            training=training_pb2_grpc.TrainingStub(channel(training or config.get("ILF_TRAINING_ADDR"))),
            feedback=feedback_pb2_grpc.FeedbackStub(channel(feedback or config.get("ILF_FEEDBACK_ADDR"))),
        )
