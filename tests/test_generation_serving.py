"""Generation service as users meet it: TGI protocol and backend, hot swap under load, its own process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import free_port
from ilf.grpc_util import channel, wait_healthy
from ilf.v1 import generation_pb2, generation_pb2_grpc
from test_generation import PROMPT, make_lora, params, start_server, stub_for


def _stop(*servers):
    for server in servers:
        server.stop(0)


@pytest.fixture
def tgi_served(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    yield server, stub_for(server)
    _stop(server)


def test_text_generation_client_against_the_http_endpoint(tgi_served):
    from text_generation import Client
    from text_generation.errors import ValidationError
    server, stub = tgi_served
    client = Client(server.service.http.url)
    greedy = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=8)))
    reply = client.generate(PROMPT, max_new_tokens=8)
    assert reply.generated_text == greedy.completions[0].text
    assert reply.details.finish_reason.value == "length" and reply.details.generated_tokens == 8
    assert len(reply.details.tokens) == 8 and "".join(t.text for t in reply.details.tokens) == reply.generated_text

    seeded = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(
        n=1, temperature=0.7, seed=11, max_new_tokens=8)))
    streamed = list(client.generate_stream(PROMPT, do_sample=True, temperature=0.7, seed=11, max_new_tokens=8))
    assert streamed[-1].generated_text == seeded.completions[0].text
    assert streamed[-1].details.seed == 11 and all(r.details is None for r in streamed[:-1])
    assert "".join(r.token.text for r in streamed) == seeded.completions[0].text

    full = client.generate(PROMPT, max_new_tokens=4, return_full_text=True, stop_sequences=[])
    assert full.generated_text.startswith(PROMPT)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=10**6)
    with pytest.raises(ValidationError, match="typical_p"):
        client.generate(PROMPT, typical_p=0.5)
    import requests
    assert requests.get(f"{server.service.http.url}/info", timeout=5).json()["model_id"] == greedy.model_version
    assert requests.get(f"{server.service.http.url}/health", timeout=5).status_code == 200


def test_http_endpoint_checks_bearer_tokens_and_the_tgi_backend_sends_one(ilf_env, monkeypatch, tmp_path):
    import requests
    from text_generation import Client
    from text_generation.errors import UnknownError
    token = "client-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"{token} client team-a\n")
    monkeypatch.setenv("ILF_AUTH_TOKENS_FILE", str(tmp_path / "tokens"))
    monkeypatch.setenv("ILF_AUTH_TOKEN", token)  # what this test's gRPC stubs and the TGI backend send
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    monkeypatch.setenv("ILF_GENERATION_BACKEND", "tgi")
    monkeypatch.setenv("ILF_GENERATION_TGI_URL", server.service.http.url)
    monkeypatch.delenv("ILF_GENERATION_HTTP_PORT")
    front = start_server()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"}, {"Authorization": token}):
            with pytest.raises(UnknownError, match="bearer token"):
                Client(server.service.http.url, headers=headers).generate(PROMPT, max_new_tokens=2)
            assert requests.get(f"{server.service.http.url}/info", headers=headers, timeout=5).status_code == 401
        assert requests.get(f"{server.service.http.url}/health", timeout=5).status_code == 200  # probes need no token
        authorized = Client(server.service.http.url, headers={"Authorization": f"Bearer {token}"})
        assert authorized.generate(PROMPT, max_new_tokens=2).details.generated_tokens == 2
        request = generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=4))
        assert stub_for(front).Generate(request).completions[0].text == stub_for(server).Generate(request).completions[0].text
    finally:
        _stop(front, server)


def test_tgi_backend_through_another_generation_service(tgi_served, monkeypatch):
    server, stub = tgi_served
    monkeypatch.setenv("ILF_GENERATION_BACKEND", "tgi")
    monkeypatch.setenv("ILF_GENERATION_TGI_URL", server.service.http.url)
    monkeypatch.delenv("ILF_GENERATION_HTTP_PORT")
    front = start_server()
    try:
        front_stub = stub_for(front)
        request = generation_pb2.GenerateRequest(prompt=PROMPT, params=params(n=3, temperature=0.8, seed=5))
        direct, remote = stub.Generate(request), front_stub.Generate(request)
        assert [c.text for c in remote.completions] == [c.text for c in direct.completions]
        assert remote.model_version == direct.model_version
        streamed = list(front_stub.GenerateStream(request))
        assert sorted(m.completion.text for m in streamed if m.HasField("completion")) == \
            sorted(c.text for c in direct.completions)
        status = front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
        assert status.backend == "tgi" and status.serving_version == direct.model_version
        with pytest.raises(grpc.RpcError) as error:
            front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version="anything"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as error:
            front_stub.Generate(generation_pb2.GenerateRequest(prompt="", params=params()))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        _stop(front)


def test_full_queue_is_resource_exhausted_over_grpc(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_GENERATION_MAX_BATCH_ROWS", "1")
    monkeypatch.setenv("ILF_GENERATION_MAX_QUEUE", "1")
    server = start_server()
    try:
        stub = stub_for(server)
        long_request = generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=1000))
        running = stub.GenerateStream(long_request)
        next(running)
        waiting = stub.GenerateStream(long_request)
        deadline = time.monotonic() + 5
        while server.service.backend.engine.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(long_request)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in error.value.details()
        running.cancel()
        waiting.cancel()
    finally:
        _stop(server)


def test_hot_swap_under_load(ilf_env, monkeypatch, local_registry, tiny_model_dir, tmp_path):
    """4 streaming clients during 3 swaps and 1 failed swap: no failure, versions only move forward,
    and every output is what its named version gives for that seed."""
    monkeypatch.setenv("ILF_GENERATION_MAX_LOADED", "5")
    server = start_server()
    stub = stub_for(server)
    base = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    order = [base] + [make_lora(local_registry, base, tiny_model_dir, tmp_path / f"l{i}", f"lora-{i}", seed=i)
                      for i in range(1, 4)]
    make_lora(local_registry, base, tiny_model_dir, tmp_path / "bad", "lora-bad", seed=9)
    (Path(local_registry.store.root) / "models" / "lora-bad" / "adapter_model.safetensors").write_bytes(b"x")

    stop, failures, seen = threading.Event(), [], {c: [] for c in range(4)}

    def client(number: int) -> None:
        client_stub = generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{server.port}"))
        k = 0
        while not stop.is_set():
            seed = number * 1000 + k
            k += 1
            try:
                messages = list(client_stub.GenerateStream(generation_pb2.GenerateRequest(
                    prompt=PROMPT, params=params(temperature=0.8, seed=seed, max_new_tokens=10))))
                versions = {m.model_version for m in messages}
                assert len(versions) == 1, f"one request saw versions {versions}"
                seen[number].append((time.monotonic(), versions.pop(), seed, messages[-1].completion.text))
            except Exception as error:  # noqa: BLE001 - counted, the test fails on any
                failures.append(repr(error))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    swap_latency = []
    try:
        for version in ["lora-1", "lora-bad", "lora-2", "lora-3"]:
            time.sleep(1.0)
            asked = time.monotonic()
            if version == "lora-bad":
                with pytest.raises(grpc.RpcError) as error:
                    stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=version))
                assert error.value.code() == grpc.StatusCode.DATA_LOSS
                continue
            assert stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=version)).serving_version \
                == version
            deadline = time.monotonic() + 60
            while not any(v == version for c in seen.values() for _, v, _, _ in c):
                assert time.monotonic() < deadline and not failures, f"no response on {version}: {failures}"
                time.sleep(0.01)
            first = min(t for c in seen.values() for t, v, _, _ in c if v == version)
            swap_latency.append(first - asked)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    for results in seen.values():
        ranks = [order.index(v) for _, v, _, _ in results]
        assert ranks == sorted(ranks), "a client saw versions go backwards"
    assert {v for c in seen.values() for _, v, _, _ in c} == set(order)
    for results in seen.values():
        for _, version, seed, text in results[::3]:
            again = stub.Generate(generation_pb2.GenerateRequest(
                prompt=PROMPT, params=params(temperature=0.8, seed=seed, max_new_tokens=10), model_version=version))
            assert again.completions[0].text == text, f"{version} seed {seed} differs"
    print(f"swap latency (request to first response on the new version): {[round(s, 2) for s in swap_latency]} s")
    _stop(server)


def test_service_runs_as_its_own_process(ilf_env, tmp_path):
    port = free_port()
    env = {**os.environ, "ILF_GENERATION_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "services.generation"], env=env,
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout_s=120, service="ilf.v1.Generation")
        stub = generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{port}"))
        reply = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(n=2, temperature=0.8)))
        assert len(reply.completions) == 2 and reply.model_version.startswith("base-")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output[-2000:]
