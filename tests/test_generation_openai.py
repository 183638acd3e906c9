"""The OpenAI protocol: the official `openai` client against the generation service's /v1 routes, and the
openai backend fronting another generation service (as it fronts vLLM) with the same gRPC contract."""
from __future__ import annotations

import time

import grpc
import openai
import pytest
import requests
import torch

from ilf.registry import ModelVersion
from ilf.v1 import common_pb2, generation_pb2
from test_generation import PROMPT, _bigger_model, make_lora, params, start_server, stub_for

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
CLIENT_TOKEN, OPERATOR_TOKEN = "client-token-0123456789abcdef", "operator-token-0123456789abcdef"
FRONT_TOKEN = "front-token-0123456789abcdef"


def client_for(server, api_key: str = "unused") -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429s and 5xx by itself
    return openai.OpenAI(base_url=f"{server.service.http.url}/v1", api_key=api_key, max_retries=0)


def generate(stub, **kwargs) -> generation_pb2.GenerateResponse:
    model_version = kwargs.pop("model_version", "")
    return stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(**kwargs),
                                                        model_version=model_version))


def streamed_texts(chunks, n: int, *, chat: bool) -> tuple[list[str], list[str | None], list]:
    """Per-choice text and finish_reason of a stream, and its usage chunks."""
    texts, reasons, usages = [""] * n, [None] * n, []
    for chunk in chunks:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if chat else choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons, usages


@pytest.fixture
def openai_served(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    yield server, stub_for(server)
    server.stop(0)


def test_openai_client_completions_models_and_chat(openai_served):
    server, stub = openai_served
    client = client_for(server)
    serving = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    assert [m.id for m in client.models.list()] == [serving]
    assert client.models.retrieve(serving).id == serving

    greedy = generate(stub, max_new_tokens=8).completions[0]
    reply = client.completions.create(model=serving, prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.model == serving and reply.object == "text_completion"
    assert [c.text for c in reply.choices] == [greedy.text] and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (greedy.prompt_tokens, 8)
    assert reply.usage.total_tokens == greedy.prompt_tokens + 8

    # n samples with a seed: sample i is seed + i's sample, as on gRPC; model "" is the serving version
    seeded = generate(stub, n=3, temperature=0.8, seed=5, max_new_tokens=8)
    reply = client.completions.create(model="", prompt=PROMPT, n=3, temperature=0.8, seed=5, max_tokens=8)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [c.text for c in seeded.completions]
    assert reply.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=serving, prompt=PROMPT, n=3, temperature=0.8, seed=5, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    texts, reasons, usages = streamed_texts(chunks, 3, chat=False)
    assert texts == [c.text for c in seeded.completions] and reasons == ["length"] * 3
    assert len(usages) == 1 and usages[0].completion_tokens == 24 and chunks[-1].usage is not None

    # a stop sequence: the text ends before it, streamed or not, and no chunk leaks any of it
    stop = greedy.text[3:5]
    before = greedy.text[:greedy.text.find(stop)]
    stopped = client.completions.create(model=serving, prompt=PROMPT, max_tokens=8, stop=stop)
    assert stopped.choices[0].text == before and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=serving, prompt=PROMPT, max_tokens=8, stop=[stop], stream=True))
    assert streamed_texts(chunks, 1, chat=False)[:2] == ([before], ["stop"])

    # chat: the model's chat template renders the messages (one BOS token, from the template)
    loaded = server.service.backend.models.serving
    input_ids = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        expected = loaded.model.generate(input_ids, max_new_tokens=8, do_sample=False)[0, input_ids.shape[1]:]
    chat = client.chat.completions.create(model=serving, messages=MESSAGES, max_tokens=8)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == input_ids.shape[1]
    chunks = list(client.chat.completions.create(model=serving, messages=MESSAGES, max_completion_tokens=8,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_texts(chunks, 1, chat=True)[:2] == ([chat.choices[0].message.content], ["length"])


def test_openai_errors_name_the_parameter_and_the_model(openai_served, local_registry, tiny_model_dir, tmp_path):
    server, stub = openai_served
    client = client_for(server)
    for kwargs, param in [({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"temperature": -1}, "temperature"),
                          ({"presence_penalty": 0.5}, "presence_penalty"), ({"extra_body": {"best_of": 3}}, "best_of"),
                          ({"extra_body": {"max_new_tokens": 3}}, "max_new_tokens"), ({"prompt": [1, 2]}, "prompt")]:
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(**{"model": "", "prompt": PROMPT, **kwargs})
        assert error.value.status_code == 400 and error.value.body["param"] == param, kwargs
        assert error.value.body["type"] == "invalid_request_error" and param in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="", messages=[{"role": "tool", "content": "x"}])
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-version", prompt=PROMPT)
    assert error.value.body["code"] == "model_not_found"
    base = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-unloaded", seed=1)
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.completions.create(model="lora-unloaded", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("lora-unloaded")


def test_openai_routes_check_tokens_and_loading_needs_an_operator(ilf_env, monkeypatch, tmp_path, local_registry,
                                                                  tiny_model_dir):
    (tmp_path / "tokens").write_text(f"{CLIENT_TOKEN} client team-a\n{OPERATOR_TOKEN} operator ops\n")
    monkeypatch.setenv("ILF_AUTH_TOKENS_FILE", str(tmp_path / "tokens"))
    monkeypatch.setenv("ILF_AUTH_TOKEN", OPERATOR_TOKEN)  # what this test's gRPC stubs send
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    try:
        url = server.service.http.url
        for key in ("wrong-token-0123456789abcdef", ""):
            with pytest.raises(openai.AuthenticationError):
                client_for(server, key or "none").models.list()
        assert requests.post(f"{url}/v1/completions", json={"prompt": PROMPT}, timeout=10).status_code == 401
        assert requests.get(f"{url}/health", timeout=10).status_code == 200  # probes need no token
        client = client_for(server, CLIENT_TOKEN)
        base = client.models.list().data[0].id
        lora = make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-a", seed=1)
        load = {"lora_name": lora, "lora_path": "/not/read"}
        refused = requests.post(f"{url}/v1/load_lora_adapter", json=load, timeout=60,
                                headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        assert refused.status_code == 403 and "operator" in refused.json()["error"]["message"]
        loaded = requests.post(f"{url}/v1/load_lora_adapter", json=load, timeout=120,
                               headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert loaded.status_code == 200, loaded.text
        assert [m.id for m in client.models.list()] == [base, lora]   # loaded, not serving
        on_lora = client.completions.create(model=lora, prompt=PROMPT, max_tokens=12).choices[0].text
        assert on_lora == generate(stub_for(server), max_new_tokens=12, model_version=lora).completions[0].text
        assert on_lora != client.completions.create(model=base, prompt=PROMPT, max_tokens=12).choices[0].text
    finally:
        server.stop(0)


def test_full_queue_is_a_429(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_GENERATION_MAX_BATCH_ROWS", "1")
    monkeypatch.setenv("ILF_GENERATION_MAX_QUEUE", "1")
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
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
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client_for(server).completions.create(model="", prompt=PROMPT, max_tokens=4)
        running.cancel()
        waiting.cancel()
    finally:
        server.stop(0)


@pytest.fixture
def front_and_upstream(ilf_env, monkeypatch, tmp_path):
    """An upstream generation service with the OpenAI routes, and a front one whose openai backend calls it
    with an operator token of its own (it loads versions there); the tests' stubs send OPERATOR_TOKEN."""
    (tmp_path / "tokens").write_text(f"{OPERATOR_TOKEN} operator tests\n{FRONT_TOKEN} operator front\n")
    monkeypatch.setenv("ILF_AUTH_TOKENS_FILE", str(tmp_path / "tokens"))
    monkeypatch.setenv("ILF_AUTH_TOKEN", OPERATOR_TOKEN)
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    monkeypatch.setenv("ILF_GENERATION_MAX_LOADED", "5")
    monkeypatch.setenv("ILF_SERVING_POLL_S", "0.2")
    upstream = start_server()
    monkeypatch.setenv("ILF_GENERATION_BACKEND", "openai")
    monkeypatch.setenv("ILF_GENERATION_OPENAI_URL", f"{upstream.service.http.url}/v1")
    monkeypatch.setenv("ILF_GENERATION_OPENAI_TOKEN", FRONT_TOKEN)
    front = start_server()
    yield front, upstream
    front.stop(0)
    upstream.stop(0)


def test_openai_backend_through_another_generation_service(front_and_upstream):
    front, upstream = front_and_upstream
    front_stub, upstream_stub = stub_for(front), stub_for(upstream)
    status = front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
    base = upstream_stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    assert status.backend == "openai" and status.serving_version == base and base in status.loaded_versions

    greedy = generate(front_stub, max_new_tokens=12)
    direct = generate(upstream_stub, max_new_tokens=12)
    assert greedy.model_version == base and [c.text for c in greedy.completions] == [c.text for c in direct.completions]
    assert (greedy.completions[0].generated_tokens, greedy.completions[0].prompt_tokens) == \
        (direct.completions[0].generated_tokens, direct.completions[0].prompt_tokens)
    seeded = dict(n=3, temperature=0.8, seed=7, max_new_tokens=10)
    remote, local = generate(front_stub, **seeded), generate(upstream_stub, **seeded)
    assert [c.text for c in remote.completions] == [c.text for c in local.completions]
    assert [c.seed for c in remote.completions] == [7, 8, 9]
    stream = list(front_stub.GenerateStream(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(**seeded))))
    assert sorted(m.completion.text for m in stream if m.HasField("completion")) == sorted(c.text for c in local.completions)
    for index in range(3):
        assert "".join(m.token_text for m in stream if m.index == index) == local.completions[index].text
    stop = direct.completions[0].text[4:6]
    stopped = generate(front_stub, max_new_tokens=12, stop=[stop]).completions[0]
    assert stopped.text == generate(upstream_stub, max_new_tokens=12, stop=[stop]).completions[0].text
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP
    # OpenAI servers take 4 stop sequences: the backend applies the others itself
    many = ["never-1", "never-2", "never-3", "never-4", stop]
    stopped = generate(front_stub, max_new_tokens=12, stop=many).completions[0]
    assert stopped.text == direct.completions[0].text[:direct.completions[0].text.find(stop)]
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP
    # the front's own OpenAI routes pass chat through to the upstream's chat template
    chat = client_for(front, OPERATOR_TOKEN).chat.completions.create(model="", messages=MESSAGES, max_tokens=8)
    assert chat.choices[0].message.content == client_for(upstream, OPERATOR_TOKEN).chat.completions.create(
        model="", messages=MESSAGES, max_tokens=8).choices[0].message.content
    with pytest.raises(grpc.RpcError) as error:
        generate(front_stub, n=2)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # checked before any remote call


def test_openai_backend_swaps_to_lora_versions_and_keeps_serving_when_a_load_fails(
        front_and_upstream, local_registry, tiny_model_dir, tmp_path):
    front, upstream = front_and_upstream
    front_stub, upstream_stub = stub_for(front), stub_for(upstream)
    base = front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    lora = make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-a", seed=1)
    with pytest.raises(grpc.RpcError) as error:
        generate(front_stub, model_version=lora)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "LoadModel first" in error.value.details()

    status = front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=lora))
    assert status.serving_version == lora and status.history == [base] and lora in status.loaded_versions
    assert lora in upstream_stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).loaded_versions
    assert local_registry.serving_version("generation") == lora
    on_lora = generate(front_stub, max_new_tokens=12)
    assert on_lora.model_version == lora
    assert on_lora.completions[0].text == generate(upstream_stub, max_new_tokens=12, model_version=lora).completions[0].text
    assert on_lora.completions[0].text != generate(front_stub, max_new_tokens=12, model_version=base).completions[0].text

    # an adapter trained on another shape is refused (vLLM would load it): nothing changes but last_load_error
    bigger = tmp_path / "bigger"
    _bigger_model(tiny_model_dir, bigger)
    wrong = make_lora(local_registry, base, bigger, tmp_path / "lora-wrong", "lora-wrong-base", seed=3)
    with pytest.raises(grpc.RpcError) as error:
        front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=wrong))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "size mismatch" in error.value.details() and f"still serving {lora}" in error.value.details()
    status = front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
    assert status.serving_version == lora and wrong in status.last_load_error and wrong not in status.loaded_versions
    assert generate(front_stub, max_new_tokens=12).completions[0].text == on_lora.completions[0].text
    # a full version cannot be loaded into a running OpenAI server
    full = local_registry.register(ModelVersion(version="full-a", kind="full", base_version=base),
                                   files_dir=tiny_model_dir)
    with pytest.raises(grpc.RpcError) as error:
        front_stub.LoadModel(generation_pb2.LoadModelRequest(model_version=full.version))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only adapters" in error.value.details()

    # the remote server refuses the load (here: the front's token lost its operator role there)
    (tmp_path / "tokens").write_text(f"{OPERATOR_TOKEN} operator tests\n{FRONT_TOKEN} client front\n")
    other = make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora-b", "lora-b", seed=4)
    with pytest.raises(grpc.RpcError) as error:
        front_stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=other))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "answered 403" in error.value.details()
    assert f"still serving {lora}" in error.value.details()
    assert generate(front_stub, max_new_tokens=12).completions[0].text == on_lora.completions[0].text
    (tmp_path / "tokens").write_text(f"{OPERATOR_TOKEN} operator tests\n{FRONT_TOKEN} operator front\n")

    status = front_stub.Rollback(generation_pb2.RollbackRequest())
    assert status.serving_version == base and local_registry.serving_version("generation") == base
    assert generate(front_stub, max_new_tokens=12).model_version == base

    # a promotion elsewhere (`ilf promote`) moves the pointer: the front follows it
    local_registry.promote("generation", lora)
    deadline = time.monotonic() + 30
    while front_stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version != lora:
        assert time.monotonic() < deadline, "the front did not follow the serving pointer"
        time.sleep(0.1)
    assert generate(front_stub, max_new_tokens=12).completions[0].text == on_lora.completions[0].text
