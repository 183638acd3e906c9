"""Calls that need no token (health checking, reflection) can never take a server's capacity from authenticated
calls: a stranger who holds dozens of Health.Watch or reflection streams open does not make an authenticated
Execute wait, on a real execution server with authentication on."""
from __future__ import annotations

import queue
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ilf.grpc_util import channel
from ilf.v1 import execution_pb2, execution_pb2_grpc
from services.execution.server import build_server
from test_execution import DOUBLE, executor  # noqa: F401 - the shared executor fixture

CLIENT_TOKEN = "client-token-0123456789abcdef"
OPEN_STREAMS = 40          # more than the 32 threads a server had for all its calls
CHANNELS = 8               # spread over connections, as a stranger would
AUTHENTICATED_CALL_S = 10.0


@pytest.fixture
def server(executor, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{CLIENT_TOKEN} client capacity-test\n")
    monkeypatch.setenv("ILF_AUTH_TOKENS_FILE", str(tokens))
    monkeypatch.delenv("ILF_AUTH_TOKEN", raising=False)
    running = build_server(0, executor)
    running.start()
    assert running.ready.wait(60)
    yield f"127.0.0.1:{running.port}"
    running.stop(0)


def authenticated_calls_keep_working(address: str, monkeypatch) -> None:
    monkeypatch.setenv("ILF_AUTH_TOKEN", CLIENT_TOKEN)
    with channel(address) as ch:
        stub = execution_pb2_grpc.ExecutionStub(ch)
        for i in range(3):
            started = time.monotonic()
            reply = stub.Execute(execution_pb2.ExecuteRequest(program=DOUBLE, tests=[f"assert double({i}) == {2 * i}"]),
                                 timeout=AUTHENTICATED_CALL_S)
            assert reply.passed and time.monotonic() - started < AUTHENTICATED_CALL_S
        info = stub.GetSandboxInfo(execution_pb2.GetSandboxInfoRequest(), timeout=AUTHENTICATED_CALL_S)
        assert info.workers >= 1
    monkeypatch.delenv("ILF_AUTH_TOKEN")


def open_streams(address: str, start) -> tuple[list, list]:
    """OPEN_STREAMS streams without a token over CHANNELS connections; returns (channels, calls)."""
    channels = [channel(address) for _ in range(CHANNELS)]
    calls = [start(channels[i % CHANNELS]) for i in range(OPEN_STREAMS)]
    time.sleep(1.0)  # every stream has reached the server (or been refused)
    return channels, calls


def close(channels, calls) -> None:
    for call in calls:
        call.cancel()
    for ch in channels:
        ch.close()


def test_open_health_watch_streams_do_not_starve_authenticated_calls(server, monkeypatch):
    def watch(ch):
        return health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
    channels, calls = open_streams(server, watch)
    try:
        authenticated_calls_keep_working(server, monkeypatch)
    finally:
        close(channels, calls)


def test_open_reflection_streams_do_not_starve_authenticated_calls(server, monkeypatch):
    held = []

    def reflect(ch):
        requests: queue.Queue = queue.Queue()
        requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        held.append(requests)  # never closed: the stream stays open, waiting for the next request
        return reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(requests.get, None))
    channels, calls = open_streams(server, reflect)
    try:
        authenticated_calls_keep_working(server, monkeypatch)
    finally:
        for requests in held:
            requests.put(None)
        close(channels, calls)


def test_a_refused_stream_says_why(server):
    channels, calls = open_streams(server, lambda ch: health_pb2_grpc.HealthStub(ch).Watch(
        health_pb2.HealthCheckRequest(service="")))
    try:
        codes = []
        for call in calls:
            try:
                next(call)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    finally:
        close(channels, calls)
