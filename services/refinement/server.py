"""gRPC servicer of the refinement service, a thin layer over Refiner."""
from __future__ import annotations

import logging
import time

from ilf.errors import NotFound, Unavailable
from ilf.fleet import PointerFollower
from ilf.grpc_util import Server, Service, channel, serve
from ilf.registry import Registry, base_version_id
from ilf.sampling import Sampling
from ilf.store import open_store
from ilf.v1 import generation_pb2_grpc, refinement_pb2, refinement_pb2_grpc
from services.refinement.config import RefinementConfig
from services.refinement.refiner import CHANNEL, Refiner, TaskSpec

log = logging.getLogger(__name__)


class RefinementServicer(refinement_pb2_grpc.RefinementServicer):
    def __init__(self, refiner: Refiner):
        self.refiner = refiner

    def Refine(self, request, context):
        refined, prompt, version = self.refiner.refine(
            TaskSpec(request.task.task_id, request.task.text, tuple(request.task.tests), request.task.code_prefix,
                     request.task.task_set),
            request.failing_program, request.feedback, Sampling.from_proto(request.params))
        return refinement_pb2.RefineResponse(
            refinements=[refinement_pb2.RefinedProgram(program=r.program, completion=r.completion) for r in refined],
            model_version=version, prompt=prompt)

    def SwitchModel(self, request, context):
        return refinement_pb2.RefinementModelStatus(serving_version=self.refiner.switch(request.model_version))

    def GetModelStatus(self, request, context):
        return refinement_pb2.RefinementModelStatus(serving_version=self.refiner.version or "")


class RefinementService(Service):
    names = ("ilf.v1.Refinement",)

    def __init__(self, settings: RefinementConfig):
        self.settings = settings
        generation = generation_pb2_grpc.GenerationStub(channel(settings.generation_addr))
        self.refiner = Refiner(Registry(open_store()), generation, settings)
        self.follower = PointerFollower(self.refiner.registry, CHANNEL, self.refiner.follow, settings.serving_poll_s,
                                        describe=self.refiner.describe)

    def add_to(self, grpc_server) -> None:
        refinement_pb2_grpc.add_RefinementServicer_to_server(RefinementServicer(self.refiner), grpc_server)

    def load(self) -> str:
        # The generation service may start after this one: keep asking until it loads the model.
        version = self.refiner.start_version()
        log.info("loading pi_Refine %s through the generation service at %s", version, self.settings.generation_addr)
        while True:
            try:
                self.refiner.switch(version)
                self.follower.start(self.refiner.registry.serving(CHANNEL), lambda pointer: None)
                return f"pi_Refine {version}"
            except Unavailable as error:
                log.info("waiting for the generation service: %s", error)
                time.sleep(2)
            except NotFound:
                if version != base_version_id(self.settings.base_model):
                    raise
                log.info("waiting for the generation service to load and register the base model %s", version)
                time.sleep(2)


    def close(self) -> None:
        self.follower.stop()


def build_server(port: int | None = None, settings: RefinementConfig | None = None) -> Server:
    """The server, not started; on start the first model loads in the background and health turns SERVING."""
    settings = settings or RefinementConfig.from_env()
    return Server(RefinementService(settings), settings, port)


def main(argv=None) -> None:
    serve(build_server)
