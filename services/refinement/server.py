"""gRPC servicer of the refinement service, a thin layer over Refiner."""
from __future__ import annotations

import logging
import threading
import time

from ilf import config
from ilf.errors import Unavailable
from ilf.grpc_util import Server, channel, setup_logging
from ilf.registry import Registry
from ilf.store import open_store
from ilf.v1 import generation_pb2_grpc, refinement_pb2, refinement_pb2_grpc
from services.refinement.refiner import Refiner, TaskSpec

log = logging.getLogger(__name__)


class RefinementServicer(refinement_pb2_grpc.RefinementServicer):
    def __init__(self, refiner: Refiner):
        self.refiner = refiner

    def Refine(self, request, context):
        p = request.params
        refined, prompt, version = self.refiner.refine(
            TaskSpec(request.task.task_id, request.task.text, tuple(request.task.tests), request.task.code_prefix),
            request.failing_program, request.feedback, n=p.n, temperature=p.temperature, top_p=p.top_p or 1.0,
            top_k=p.top_k, max_new_tokens=p.max_new_tokens or 256, repetition_penalty=p.repetition_penalty or 1.0,
            seed=p.seed if p.HasField("seed") else None)
        return refinement_pb2.RefineResponse(
            refinements=[refinement_pb2.RefinedProgram(program=r.program, completion=r.completion) for r in refined],
            model_version=version, prompt=prompt)

    def SwitchModel(self, request, context):
        return refinement_pb2.RefinementModelStatus(serving_version=self.refiner.switch(request.model_version))

    def GetModelStatus(self, request, context):
        return refinement_pb2.RefinementModelStatus(serving_version=self.refiner.version or "")


def build_server(port: int) -> Server:
    """The server, not started; the first model loads in the background and health turns SERVING after it."""
    generation = generation_pb2_grpc.GenerationStub(channel(config.get("ILF_REFINEMENT_GENERATION_ADDR")
                                                            or config.get("ILF_GENERATION_ADDR")))
    refiner = Refiner(Registry(open_store()), generation)
    server = Server(["ilf.v1.Refinement"], port)
    server.add(refinement_pb2_grpc.add_RefinementServicer_to_server, RefinementServicer(refiner))

    def load_first_model():
        # The generation service may start after this one: keep asking until it loads the model.
        while True:
            try:
                refiner.switch(refiner.start_version())
                break
            except Unavailable as error:
                log.info("waiting for the generation service: %s", error)
                time.sleep(2)
            except Exception:  # noqa: BLE001 - stays NOT_SERVING, and says why
                log.exception("the first refinement model failed to load")
                return
        server.set_serving(True)
    threading.Thread(target=load_first_model, name="load-model", daemon=True).start()
    return server


def main(argv=None) -> None:
    setup_logging()
    build_server(int(config.get("ILF_REFINEMENT_PORT"))).run_until_signal()
