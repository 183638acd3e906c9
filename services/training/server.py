"""gRPC servicer of the training service, a thin layer over RunManager."""
from __future__ import annotations

import logging

from ilf.grpc_util import Server, Service, serve, timestamp
from ilf.metrics import track
from ilf.store import open_store
from ilf.training_spec import HYPERPARAMETER_FIELDS
from ilf.v1 import training_pb2, training_pb2_grpc
from services.training import metrics
from services.training.config import TrainingConfig
from services.training.launchers import make_launcher
from services.training.runs import RunManager

log = logging.getLogger(__name__)


def to_proto(run: dict) -> training_pb2.Run:
    return training_pb2.Run(
        run_id=run["run_id"], state=training_pb2.RunState.Value(f"RUN_STATE_{run['state']}"), dataset=run["dataset"],
        base_model_version=run["base_model_version"], purpose=run["purpose"],
        hyperparameters=training_pb2.Hyperparameters(**run["hyperparameters"]),
        progress=training_pb2.Progress(**run["progress"]),
        output_model_version=run["output_model_version"], error=run["error"], created_at=timestamp(run["created_at"]),
        updated_at=timestamp(run["updated_at"]), log_tail=run["log_tail"], artifacts=f"runs/{run['run_id']}/",
        launcher=(run["handle"] or {}).get("launcher", ""))


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, runs: RunManager):
        self.runs = runs

    def SubmitRun(self, request, context):
        requested = {k: getattr(request.hyperparameters, k) for k in HYPERPARAMETER_FIELDS}
        return to_proto(self.runs.submit(request.dataset, request.base_model_version, requested, request.purpose))

    def GetRun(self, request, context):
        return to_proto(self.runs.get(request.run_id))

    def WatchRun(self, request, context):
        for run in self.runs.watch(request.run_id, is_active=context.is_active):
            yield to_proto(run)

    def CancelRun(self, request, context):
        return to_proto(self.runs.cancel(request.run_id))

    def ListRuns(self, request, context):
        return training_pb2.ListRunsResponse(runs=[to_proto(r) for r in self.runs.list()])


class TrainingService(Service):
    names = ("ilf.v1.Training",)

    def __init__(self, settings: TrainingConfig):
        self.runs = RunManager(open_store(), make_launcher(settings), max_concurrent=settings.max_concurrent,
                               poll_s=settings.poll_s)
        track(self.runs, metrics.RUNS)

    def add_to(self, grpc_server) -> None:
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(self.runs), grpc_server)

    def load(self) -> str:
        self.runs.start()   # runs left by an earlier process are followed again
        active = [run for run in self.runs.list() if run["state"] in ("QUEUED", "RUNNING")]
        return f"{len(active)} queued or running run(s) followed"

    def close(self) -> None:
        self.runs.stop()


def build_server(port: int | None = None, settings: TrainingConfig | None = None) -> Server:
    """The server, not started; on start run monitoring (including runs left by an earlier process) begins."""
    settings = settings or TrainingConfig.from_env()
    return Server(TrainingService(settings), settings, port)


def main(argv=None) -> None:
    serve(build_server)
