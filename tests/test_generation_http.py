"""The generation service's HTTP port as a newcomer meets it: the same defaults and the same refusals on gRPC,
TGI's routes and OpenAI's; bad JSON answered in the protocol's error shape; TGI's stop semantics and /info."""
from __future__ import annotations

import logging

import grpc
import pytest
import requests

from ilf.sampling import DEFAULT_MAX_NEW_TOKENS
from ilf.v1 import common_pb2, generation_pb2
from test_generation import PROMPT, start_server, stub_for


@pytest.fixture
def http_served(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    yield server, stub_for(server), server.service.http.url
    server.stop(0)


def test_unset_fields_take_the_same_defaults_on_every_protocol(http_served):
    """Only a prompt: one greedy sample of DEFAULT_MAX_NEW_TOKENS tokens (unless it ends first), on all three."""
    _, stub, url = http_served
    grpc_reply = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT))
    assert len(grpc_reply.completions) == 1
    completion = grpc_reply.completions[0]
    assert completion.generated_tokens == DEFAULT_MAX_NEW_TOKENS or \
        completion.finish_reason != common_pb2.FINISH_REASON_LENGTH
    tgi = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"details": True}}, timeout=60)
    assert tgi.json()["generated_text"] == completion.text
    assert tgi.json()["details"]["generated_tokens"] == completion.generated_tokens
    openai = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT}, timeout=60).json()
    assert [c["text"] for c in openai["choices"]] == [completion.text]
    assert openai["usage"]["completion_tokens"] == completion.generated_tokens


@pytest.mark.parametrize("grpc_fields, tgi_parameters, openai_fields, field", [
    ({"max_new_tokens": 10**6}, {"max_new_tokens": 10**6}, {"max_tokens": 10**6}, "max_new_tokens"),
    ({"temperature": -1.0}, {"temperature": -1.0}, {"temperature": -1.0}, "temperature"),
    ({"temperature": 1.0, "top_p": 1.5}, {"top_p": 1.5}, {"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"stop": [""]}, {"stop": [""]}, {"stop": [""]}, "stop"),
    ({"repetition_penalty": -1.0}, {"repetition_penalty": -1.0}, {"repetition_penalty": -1.0}, "repetition_penalty"),
])
def test_explicit_invalid_values_are_refused_alike(http_served, grpc_fields, tgi_parameters, openai_fields, field):
    _, stub, url = http_served
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=common_pb2.SamplingParams(**grpc_fields)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.value.details()
    assert message.startswith(f"{field} ")
    tgi = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": tgi_parameters}, timeout=30)
    assert tgi.status_code == 422 and tgi.json() == {"error": message, "error_type": "validation"}
    openai = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, **openai_fields}, timeout=30)
    name = {"max_new_tokens": "max_tokens"}.get(field, field)
    assert openai.status_code == 400
    assert openai.json()["error"] == {"message": name + message[len(field):], "type": "invalid_request_error",
                                      "param": name, "code": None}


def test_n_samples_at_temperature_0_are_refused_on_every_protocol(http_served):
    """n greedy samples would be n identical completions; the message says what to do instead."""
    _, stub, url = http_served
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=common_pb2.SamplingParams(n=3)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n must be 1 at temperature 0" in error.value.details() and "temperature above 0" in error.value.details()
    openai = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "n": 3}, timeout=30)
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "n"
    sampled = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=common_pb2.SamplingParams(
        n=3, temperature=1.0, max_new_tokens=4)))
    assert len(sampled.completions) == 3


def test_text_generation_client_max_new_tokens_0_is_refused(http_served):
    from text_generation import Client
    from text_generation.errors import ValidationError
    _, _, url = http_served
    with pytest.raises(ValidationError, match="max_new_tokens must be between 1"):
        Client(url).generate(PROMPT, max_new_tokens=0)


@pytest.mark.parametrize("route", ["/", "/generate", "/generate_stream"])
def test_bad_json_is_a_422_in_tgis_error_shape(http_served, route, caplog):
    _, _, url = http_served
    with caplog.at_level(logging.ERROR):
        reply = requests.post(f"{url}{route}", data="not json", timeout=30)
        assert reply.status_code == 422 and reply.json()["error_type"] == "validation"
        assert "not valid JSON" in reply.json()["error"]
        for body, field in [({"inputs": 5}, "inputs"), ({"inputs": PROMPT, "parameters": {"max_new_tokens": "ten"}},
                                                        "max_new_tokens"),
                            ({"inputs": PROMPT, "parameters": {"max_tokens": 5}}, "max_tokens"),
                            ({"inputs": PROMPT, "parameters": [1]}, "parameters")]:
            reply = requests.post(f"{url}{route}", json=body, timeout=30)
            assert reply.status_code == 422 and reply.json()["error"].startswith(f"{field} "), reply.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a bad request logged an error"


def test_bad_json_is_a_400_in_openais_error_shape(http_served):
    _, _, url = http_served
    for route in ("/v1/completions", "/v1/chat/completions"):
        reply = requests.post(f"{url}{route}", data="{not json", timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
        assert "not valid JSON" in reply.json()["error"]["message"]
    reply = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": "ten"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_stop_sequences_end_the_text_as_in_tgi(http_served):
    """TGI's generated_text keeps the stop sequence; gRPC and OpenAI end before it; all three stop at it."""
    from text_generation import Client
    _, stub, url = http_served
    free = stub.Generate(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=common_pb2.SamplingParams(max_new_tokens=12))).completions[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    before = free[:free.find(stop)]
    params = common_pb2.SamplingParams(max_new_tokens=12, stop=[stop])
    grpc_reply = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params)).completions[0]
    assert grpc_reply.text == before and grpc_reply.finish_reason == common_pb2.FINISH_REASON_STOP
    client = Client(url)
    tgi = client.generate(PROMPT, max_new_tokens=12, stop_sequences=[stop])
    assert tgi.generated_text == before + stop and tgi.details.finish_reason.value == "stop_sequence"
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=12, stop_sequences=[stop]))
    assert streamed[-1].generated_text == before + stop
    openai = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "stop": stop},
                           timeout=30).json()["choices"][0]
    assert openai["text"] == before and openai["finish_reason"] == "stop" and openai["stop_reason"] == stop


def test_info_has_tgis_fields_with_the_served_models_values(http_served):
    server, _, url = http_served
    info = requests.get(f"{url}/info", timeout=10).json()
    loaded = server.service.backend.models.serving
    assert info["model_id"] == loaded.version and info["model_dtype"] == str(next(loaded.model.parameters()).dtype)
    assert info["model_device_type"] == loaded.device.split(":")[0]
    assert info["max_total_tokens"] == loaded.model.config.max_position_embeddings
    assert info["max_input_tokens"] == info["max_total_tokens"] - 1 and info["max_best_of"] == 1
    assert {"model_sha", "model_pipeline_tag", "max_stop_sequences", "max_client_batch_size", "router", "version",
            "sha", "docker_label"} <= set(info)
    too_many = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {
        "stop": [f"s{i}" for i in range(info["max_stop_sequences"] + 1)]}}, timeout=30)
    assert too_many.status_code == 422 and "at most" in too_many.json()["error"]
