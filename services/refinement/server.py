"""gRPC servicer of the refinement service, a thin layer over Refiner."""
from __future__ import annotations

import logging
import threading

from ilf import config
from ilf.grpc_util import Server, setup_logging
from ilf.registry import Registry
from ilf.store import open_store
from ilf.v1 import common_pb2, refinement_pb2, refinement_pb2_grpc
from services.refinement.refiner import Refiner, TaskSpec

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": common_pb2.FINISH_REASON_LENGTH, "eos": common_pb2.FINISH_REASON_EOS,
                  "stop": common_pb2.FINISH_REASON_STOP}


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
            refinements=[refinement_pb2.RefinedProgram(program=r.program, completion=common_pb2.Completion(
                text=r.sample.text, finish_reason=FINISH_REASONS[r.sample.finish_reason],
                generated_tokens=r.sample.generated_tokens, prompt_tokens=r.sample.prompt_tokens)) for r in refined],
            model_version=version, prompt=prompt)

    def SwitchModel(self, request, context):
        return refinement_pb2.RefinementModelStatus(serving_version=self.refiner.switch(request.model_version))

    def GetModelStatus(self, request, context):
        loaded = self.refiner.loaded
        return refinement_pb2.RefinementModelStatus(serving_version=loaded.version if loaded else "")


def build_server(port: int) -> Server:
    """The server, not started; the first model loads in the background and health turns SERVING after it."""
    refiner = Refiner(Registry(open_store()))
    server = Server(["ilf.v1.Refinement"], port)
    server.add(refinement_pb2_grpc.add_RefinementServicer_to_server, RefinementServicer(refiner))

    def load_first_model():
        try:
            refiner.switch(refiner.start_version())
        except Exception:  # noqa: BLE001 - stays NOT_SERVING, and says why
            log.exception("the first refinement model failed to load")
            return
        server.set_serving(True)
    threading.Thread(target=load_first_model, name="load-model", daemon=True).start()
    return server


def main(argv=None) -> None:
    setup_logging()
    build_server(int(config.get("ILF_REFINEMENT_PORT"))).run_until_signal()
