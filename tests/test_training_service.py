"""The training service over gRPC with the local launcher and the tiny model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import free_port
from ilf.datasets import put_dataset
from ilf.grpc_util import channel, wait_healthy
from ilf.v1 import training_pb2, training_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
RECORDS = [{"prompt": f"Write a function that doubles then adds {i}.\n",
            "completion": f"def f(x):\n    return 2 * x + {i}\n"} for i in range(8)]
SMALL = training_pb2.Hyperparameters(batch_size=4, epochs=1, max_seq_len=64, lora_rank=4)
FINAL = (training_pb2.RUN_STATE_SUCCEEDED, training_pb2.RUN_STATE_FAILED, training_pb2.RUN_STATE_CANCELLED)


@pytest.fixture
def training_env(ilf_env, local_registry, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_POLL_S", "0.2")
    base = local_registry.ensure_base(os.environ["ILF_BASE_MODEL"])
    dataset = put_dataset(local_registry.store, RECORDS, name="doubles")
    return {"registry": local_registry, "store": local_registry.store, "base": base.version, "dataset": dataset}


class Service:
    """`python -m services.training` as a separate process, as deployments run it."""

    def __init__(self):
        self.port = free_port()
        env = {**os.environ, "ILF_TRAINING_PORT": str(self.port), "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-m", "services.training"], cwd=REPO, env=env)
        self.address = f"127.0.0.1:{self.port}"
        wait_healthy(self.address, timeout_s=60)
        self.channel = channel(self.address)
        self.stub = training_pb2_grpc.TrainingStub(self.channel)

    def stop(self, sig=signal.SIGTERM):
        self.channel.close()
        self.process.send_signal(sig)
        self.process.wait(timeout=30)


@pytest.fixture
def service(training_env):
    started = Service()
    yield started
    if started.process.poll() is None:
        started.stop()


def wait_for(stub, run_id, states=FINAL, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id))
        if run.state in states:
            return run
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} still {training_pb2.RunState.Name(run.state)}")


def submit(stub, env, hyperparameters=SMALL, **overrides):
    request = dict(dataset=env["dataset"], base_model_version=env["base"], hyperparameters=hyperparameters,
                   purpose="generation")
    return stub.SubmitRun(training_pb2.SubmitRunRequest(**{**request, **overrides}))


def test_lora_run_end_to_end_through_a_separate_service_process(service, training_env):
    from ilf.modeling import load_version
    run = submit(service.stub, training_env)
    assert run.state == training_pb2.RUN_STATE_QUEUED and run.hyperparameters.method == "lora"
    assert run.hyperparameters.learning_rate == pytest.approx(2e-4) and run.hyperparameters.batch_size == 4
    seen = list(service.stub.WatchRun(training_pb2.GetRunRequest(run_id=run.run_id), timeout=240))
    final = seen[-1]
    assert final.state == training_pb2.RUN_STATE_SUCCEEDED, final.error + "\n".join(final.log_tail)
    assert training_pb2.RUN_STATE_RUNNING in {r.state for r in seen}
    assert final.progress.step == final.progress.total_steps == 2 and final.progress.loss > 0
    assert final.launcher == "local" and final.artifacts == f"runs/{run.run_id}/"
    record = training_env["registry"].get(final.output_model_version)
    assert record.kind == "lora" and record.base_version == training_env["base"]
    assert record.lineage["run_id"] == run.run_id and record.lineage["purpose"] == "generation"
    assert load_version(training_env["registry"], record.version).model is not None
    listed = service.stub.ListRuns(training_pb2.ListRunsRequest()).runs
    assert [r.run_id for r in listed] == [run.run_id]


@pytest.mark.parametrize("overrides, code, message", [
    ({"dataset": "datasets/missing.jsonl"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ({"dataset": ""}, grpc.StatusCode.INVALID_ARGUMENT, "dataset"),
    ({"base_model_version": "v-unknown"}, grpc.StatusCode.NOT_FOUND, "not registered"),
    ({"hyperparameters": training_pb2.Hyperparameters(method="qlora")}, grpc.StatusCode.INVALID_ARGUMENT, "method"),
    ({"hyperparameters": training_pb2.Hyperparameters(learning_rate=3.0)}, grpc.StatusCode.INVALID_ARGUMENT,
     "learning_rate"),
    ({"hyperparameters": training_pb2.Hyperparameters(lora_dropout=1.5)}, grpc.StatusCode.INVALID_ARGUMENT, "dropout"),
    ({"hyperparameters": training_pb2.Hyperparameters(method="full", merge_weights=True)},
     grpc.StatusCode.INVALID_ARGUMENT, "merge_weights"),
    ({"purpose": "poetry"}, grpc.StatusCode.INVALID_ARGUMENT, "purpose"),
])
def test_bad_requests_are_rejected_with_a_clear_status(training_env, overrides, code, message):
    from services.training.server import build_server
    server = build_server(0)
    server.start()
    try:
        with channel(f"127.0.0.1:{server.port}") as ch:
            stub = training_pb2_grpc.TrainingStub(ch)
            with pytest.raises(grpc.RpcError) as caught:
                submit(stub, training_env, **overrides)
            assert caught.value.code() == code and message in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetRun(training_pb2.GetRunRequest(run_id="run-nope"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(0)


def test_full_fine_tuning_uses_the_paper_defaults(training_env):
    from ilf.training_spec import with_defaults
    hp = with_defaults({"method": "full"})
    assert (hp.learning_rate, hp.batch_size, hp.epochs, hp.max_seq_len) == (5e-6, 32, 2, 1024)
    assert with_defaults({}).learning_rate == 2e-4


def test_trainer_crash_fails_the_run_with_exit_code_and_log_tail(service, training_env):
    training_env["store"].put("datasets/broken.jsonl", b'{"prompt": "a", "completion": "b"}\nnot json\n')
    run = submit(service.stub, training_env, dataset="datasets/broken.jsonl")
    final = wait_for(service.stub, run.run_id)
    assert final.state == training_pb2.RUN_STATE_FAILED
    assert "crashed with exit code 1" in final.error and "JSONDecodeError" in final.error
    assert any("JSONDecodeError" in line for line in final.log_tail)
    assert not final.output_model_version


def test_killed_trainer_is_reported_as_out_of_memory(service, training_env):
    run = submit(service.stub, training_env, hyperparameters=training_pb2.Hyperparameters(
        batch_size=1, epochs=50, max_seq_len=64, lora_rank=4))
    wait_for(service.stub, run.run_id, states=(training_pb2.RUN_STATE_RUNNING,))
    pid = training_env["store"].get_json(f"runs/{run.run_id}/state.json")["handle"]["pid"]
    os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
    final = wait_for(service.stub, run.run_id)
    assert final.state == training_pb2.RUN_STATE_FAILED and "OOMKilled" in final.error


def test_cancel_stops_the_trainer(service, training_env):
    run = submit(service.stub, training_env, hyperparameters=training_pb2.Hyperparameters(
        batch_size=1, epochs=50, max_seq_len=64, lora_rank=4))
    wait_for(service.stub, run.run_id, states=(training_pb2.RUN_STATE_RUNNING,))
    cancelled = service.stub.CancelRun(training_pb2.GetRunRequest(run_id=run.run_id))
    assert cancelled.state == training_pb2.RUN_STATE_CANCELLED
    pid = training_env["store"].get_json(f"runs/{run.run_id}/state.json")["handle"]["pid"]
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.CancelRun(training_pb2.GetRunRequest(run_id=run.run_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_deadline_exceeded_fails_the_run(training_env, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_DEADLINE_S", "2")
    started = Service()
    try:
        run = submit(started.stub, training_env)
        final = wait_for(started.stub, run.run_id, timeout=60)
        assert final.state == training_pb2.RUN_STATE_FAILED and "DeadlineExceeded" in final.error
    finally:
        started.stop()


def test_run_survives_a_restart_of_the_service(training_env):
    first = Service()
    run = submit(first.stub, training_env, hyperparameters=training_pb2.Hyperparameters(
        batch_size=1, epochs=3, max_seq_len=64, lora_rank=4))
    wait_for(first.stub, run.run_id, states=(training_pb2.RUN_STATE_RUNNING,))
    first.stop(signal.SIGKILL)  # the service dies; the trainer it started keeps going
    second = Service()
    try:
        assert second.stub.GetRun(training_pb2.GetRunRequest(run_id=run.run_id)).state == training_pb2.RUN_STATE_RUNNING
        final = wait_for(second.stub, run.run_id)
        assert final.state == training_pb2.RUN_STATE_SUCCEEDED, final.error
        assert training_env["registry"].get(final.output_model_version).lineage["run_id"] == run.run_id
    finally:
        second.stop()
