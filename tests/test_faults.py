"""Faults survived: the object store going away mid-upload, a generation decode step failing.

Covered elsewhere, not repeated here: a corrupt model version refused with serving unchanged
(test_generation.py::test_full_version_and_failed_loads_keep_serving); a trainer that crashes, is
OOM-killed or passes its deadline, and the training service killed mid-run with the run surviving
(test_training_service.py, test_training_kubernetes.py).
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from conftest import SeaweedS3
from ilf.errors import Unavailable
from ilf.store import MANIFEST, S3Store


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of this test's own, since the test stops it."""
    server = SeaweedS3(tmp_path / "s3")
    server.start()
    yield server
    server.stop()


def s3_store(server: SeaweedS3, retry_s: float) -> S3Store:
    return S3Store("faults", server.endpoint, server.access_key, server.secret_key, retry_s=retry_s)


def folder(path, files: int, seed: str):
    path.mkdir()
    for i in range(files):
        (path / f"part-{i}.bin").write_bytes(f"{seed}-{i}-".encode() * 5000)
    return path


def stop_during_upload(store: S3Store, server: SeaweedS3, after_puts: int, restart_after_s: float | None):
    """Stops the server when the upload reaches its `after_puts`-th object; restarts it later if asked."""
    real_put = store.client.put_object
    calls = []

    def put_object(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == after_puts:
            server.stop()
            if restart_after_s is not None:
                threading.Timer(restart_after_s, server.start).start()
        return real_put(*args, **kwargs)
    store.client.put_object = put_object
    return calls


def test_s3_outage_during_upload_is_retried_and_nothing_is_lost(own_s3, tmp_path):
    store = s3_store(own_s3, retry_s=120)
    before = store.publish_dir("models/before", folder(tmp_path / "before", 3, "before"))
    stop_during_upload(store, own_s3, after_puts=2, restart_after_s=3)
    started = time.monotonic()
    manifest = store.publish_dir("models/during", folder(tmp_path / "during", 4, "during"))
    assert time.monotonic() - started > 3  # it waited for the server to come back
    fresh = s3_store(own_s3, retry_s=5)
    assert fresh.fetch_dir("models/during", tmp_path / "fetched-during")["files"] == manifest["files"]
    assert fresh.fetch_dir("models/before", tmp_path / "fetched-before")["files"] == before["files"]


def test_s3_outage_longer_than_the_retries_fails_cleanly(own_s3, tmp_path):
    store = s3_store(own_s3, retry_s=2)
    before = store.publish_dir("models/before", folder(tmp_path / "before", 2, "before"))
    stop_during_upload(store, own_s3, after_puts=2, restart_after_s=None)
    with pytest.raises(Unavailable, match="unreachable"):
        store.publish_dir("models/half", folder(tmp_path / "half", 4, "half"))
    own_s3.start()
    fresh = s3_store(own_s3, retry_s=5)
    assert not fresh.exists(f"models/half/{MANIFEST}")  # the half-written artifact never became visible
    with pytest.raises(Exception, match="no manifest"):
        fresh.fetch_dir("models/half", tmp_path / "fetched-half")
    assert fresh.fetch_dir("models/before", tmp_path / "fetched-before")["files"] == before["files"]


@pytest.fixture
def generation(ilf_env):
    from ilf.grpc_util import channel
    from ilf.v1 import generation_pb2_grpc
    from services.generation.server import build_server
    server = build_server(0)
    server.start()
    assert server.ready.wait(120)
    with channel(f"127.0.0.1:{server.port}") as ch:
        yield server, generation_pb2_grpc.GenerationStub(ch)
    server.stop(0)


def call_without_retries(server, request):
    """Generate over a channel that does not retry UNAVAILABLE (ilf.grpc_util.channel's do), so the fault shows."""
    from ilf.v1 import generation_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_retries", 0)]) as plain:
        return generation_pb2_grpc.GenerationStub(plain).Generate(request, timeout=60)


def test_failed_decode_step_fails_its_requests_and_the_engine_recovers(generation, monkeypatch):
    from ilf.v1 import common_pb2, generation_pb2
    from services.generation.engine import Engine
    server, stub = generation
    real_step = Engine._step
    failures = []

    def failing_step(self, batch):
        if not failures:
            failures.append(batch)
            raise RuntimeError("simulated worker crash (CUDA error, say)")
        return real_step(self, batch)
    monkeypatch.setattr(Engine, "_step", failing_step)
    request = generation_pb2.GenerateRequest(prompt="def f(x):", params=common_pb2.SamplingParams(
        n=2, temperature=0.8, max_new_tokens=8))
    # The engine fails the step's requests with UNAVAILABLE (the request was fine) and recovers by itself.
    with pytest.raises(grpc.RpcError) as error:
        call_without_retries(server, request)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "simulated worker crash" in error.value.details()
    # Callers of ilf.grpc_util.channel retry UNAVAILABLE on idempotent calls: they never see the fault.
    failures.clear()
    assert len(stub.Generate(request, timeout=60).completions) == 2
    assert len(failures) == 1


def test_scheduler_failure_fails_in_flight_requests_and_serving_continues(generation, monkeypatch):
    from ilf.v1 import common_pb2, generation_pb2
    from services.generation.engine import Engine
    server, stub = generation
    real_admit = Engine._admit
    faults = []

    def admit_with_fault(self):
        real_admit(self)
        if self._batches and not faults:
            faults.append(self)
            raise RuntimeError("simulated scheduler bug")
    monkeypatch.setattr(Engine, "_admit", admit_with_fault)
    request = generation_pb2.GenerateRequest(prompt="def f(x):", params=common_pb2.SamplingParams(
        n=2, temperature=0.8, max_new_tokens=8))
    with pytest.raises(grpc.RpcError) as error:
        call_without_retries(server, request)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "simulated scheduler bug" in error.value.details()
    assert len(stub.Generate(request, timeout=60).completions) == 2


def test_dead_scheduler_thread_is_replaced_without_a_restart_by_hand(generation, monkeypatch):
    """The scheduler thread itself dies (here by SystemExit); the watchdog starts a new one."""
    from ilf.v1 import common_pb2, generation_pb2
    from services.generation.engine import Engine
    server, stub = generation
    engine = server.service.backend.engine
    real_admit = Engine._admit
    kills = []

    def admit_then_die(self):
        real_admit(self)
        if self._batches and not kills:
            kills.append(threading.current_thread())
            raise SystemExit("simulated scheduler thread death")
    monkeypatch.setattr(Engine, "_admit", admit_then_die)
    request = generation_pb2.GenerateRequest(prompt="def f(x):", params=common_pb2.SamplingParams(
        n=2, temperature=0.8, max_new_tokens=8))
    with pytest.raises(grpc.RpcError) as error:
        call_without_retries(server, request)  # in flight when its thread died: answered by the watchdog
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "scheduler died" in error.value.details()
    assert not kills[0].is_alive() and engine.scheduler_restarts == 1
    assert len(stub.Generate(request, timeout=60).completions) == 2
