"""Generation service: engine (continuous batching, seeds), model versions and swaps, gRPC API."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from conftest import free_port
from ilf.grpc_util import channel
from ilf.modeling import load_version
from reference_generation import sample
from ilf.registry import ModelVersion
from ilf.sampling import Sampling
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.generation.engine import Engine

PROMPT = "def add(a, b):"


# helpers shared with test_generation_serving.py
def make_lora(registry, base_version: str, model_dir: Path, target: Path, version: str, seed: int) -> str:
    """Registers a random (non-zero) LoRA adapter on model_dir's weights as `version`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(target)
    registry.register(ModelVersion(version=version, kind="lora", base_version=base_version), files_dir=target)
    return version


def start_server(backend=None):
    from services.generation.server import build_server
    server = build_server(free_port(), backend=backend)
    server.start()
    assert server.ready.wait(120), "the generation backend did not start"
    return server


def stub_for(server) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(channel(f"127.0.0.1:{server.port}"))


def params(**kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"n": 1, "max_new_tokens": 8, **kwargs})


@pytest.fixture
def base_model(local_registry):
    from ilf import config
    version = local_registry.ensure_base(config.get("ILF_BASE_MODEL")).version
    return load_version(local_registry, version)


@pytest.fixture
def engine():
    engine = Engine(max_rows=32, max_queue=4)
    yield engine
    engine.stop()


@pytest.fixture
def served(ilf_env):
    server = start_server()
    yield server, stub_for(server)
    server.stop(0)


# engine
def test_greedy_matches_transformers_generate(engine, base_model):
    expected = sample(base_model, PROMPT, n=1, max_new_tokens=12)[0]
    got = engine.submit(base_model, PROMPT, Sampling(n=2, max_new_tokens=12)).result()
    assert [g.text for g in got] == [expected.text] * 2
    assert got[0].finish_reason == "length" and got[0].generated_tokens == 12
    assert got[0].prompt_tokens == expected.prompt_tokens


def test_seeded_samples_do_not_depend_on_batch_neighbours(engine, base_model):
    settings = Sampling(n=3, temperature=0.9, top_p=0.95, top_k=100, max_new_tokens=16, seed=7)
    alone = [s.text for s in engine.submit(base_model, PROMPT, settings).result()]
    assert len(set(alone)) == 3, "the n samples of one request must differ"
    # other requests (different prompt lengths, settings) start before and after it and join mid-flight
    others = [engine.submit(base_model, "x" * (k * 7), Sampling(n=2, temperature=1.0, max_new_tokens=20 + k,
                                                               repetition_penalty=1.3)) for k in range(1, 4)]
    time.sleep(0.05)
    batched = engine.submit(base_model, PROMPT, settings)
    late = engine.submit(base_model, "import os", Sampling(n=1, max_new_tokens=5))
    assert [s.text for s in batched.result()] == alone
    for handle in [*others, late]:
        handle.result()
    # sample i of a seeded request is an n = 1 request with seed + i
    second = engine.submit(base_model, PROMPT, Sampling(n=1, temperature=0.9, top_p=0.95, top_k=100,
                                                        max_new_tokens=16, seed=8)).result()[0]
    assert second.text == alone[1]


def test_greedy_is_exact_when_joining_a_running_batch(engine, base_model):
    expected = sample(base_model, "print(", n=1, max_new_tokens=20)[0].text
    long_running = engine.submit(base_model, "a much longer prompt than the other one " * 3,
                                 Sampling(n=4, temperature=1.0, max_new_tokens=40))
    time.sleep(0.1)
    assert engine.submit(base_model, "print(", Sampling(n=1, max_new_tokens=20)).result()[0].text == expected
    long_running.result()


def test_stop_sequence_and_finish_reasons(engine, base_model):
    free = engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=12)).result()[0]
    stop = free.text[4:7]
    cut = engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=12, stop=(stop,))).result()[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    assert cut.generated_tokens < 12


def test_cancel_stops_the_rows(engine, base_model):
    handle = engine.submit(base_model, PROMPT, Sampling(n=4, temperature=1.0, max_new_tokens=2000))
    next(iter(handle))
    handle.cancel()
    deadline = time.monotonic() + 5
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 0


def test_full_queue_is_resource_exhausted(base_model):
    from ilf.errors import ResourceExhausted
    engine = Engine(max_rows=1, max_queue=2)
    try:
        running = engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=400))
        next(iter(running))   # admitted: the next two wait in the queue
        waiting = [engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=400)) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="queue is full"):
            engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=400))
        for handle in [running, *waiting]:
            handle.cancel()
    finally:
        engine.stop()


def test_the_engine_trims_the_heap_once_when_it_falls_idle(base_model):
    from services.generation.allocator import Trimmer
    engine = Engine(max_rows=4, max_queue=4, trimmer=Trimmer(interval_s=3600))
    try:
        assert engine.trimmer.trims == 0
        engine.submit(base_model, PROMPT, Sampling(n=2, max_new_tokens=8)).result()
        deadline = time.monotonic() + 10
        while engine.trimmer.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)   # idle: no further trims until work comes again
        assert engine.trimmer.trims == 1
        engine.submit(base_model, PROMPT, Sampling(n=1, max_new_tokens=4)).result()
        deadline = time.monotonic() + 10
        while engine.trimmer.trims == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.trimmer.trims == 2
    finally:
        engine.stop()


def test_the_trimmer_waits_its_interval_unless_forced():
    from services.generation.allocator import Trimmer
    now = [100.0]
    trimmer = Trimmer(interval_s=30, clock=lambda: now[0])
    assert not trimmer.maybe_trim()
    now[0] += 29
    assert not trimmer.maybe_trim()
    now[0] += 2
    assert trimmer.maybe_trim() and not trimmer.maybe_trim()
    assert trimmer.maybe_trim(force=True) and trimmer.trims == 2


def test_a_trim_hands_a_kept_heap_back_to_the_kernel():
    """In a fresh process with the service's allocator settings: freed memory stays resident until trimmed."""
    import subprocess
    import sys
    script = """
import resource, sys
from services.generation.allocator import Trimmer, keep_freed_memory
keep_freed_memory()
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() // 2**20
blocks = [bytearray(b'x' * (1 << 20)) for _ in range(400)]   # 400 MiB, touched
loaded = rss_mib()
del blocks[:-1]                                              # the heap's top block stays in use
kept = rss_mib()
Trimmer().maybe_trim(force=True)
print(loaded, kept, rss_mib())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    loaded, kept, trimmed = map(int, out.split())
    assert kept > loaded - 50, (loaded, kept)        # one arena, no mmap, high threshold: freed pages stay
    assert trimmed < kept - 300, (kept, trimmed)     # malloc_trim(0) returns them


# gRPC API
def test_generate_n_samples_names_the_version(served):
    server, stub = served
    reply = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(n=3, temperature=0.8, seed=1)))
    status = stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
    assert reply.model_version == status.serving_version and status.serving_version.startswith("base-")
    assert len(reply.completions) == 3
    assert [c.seed for c in reply.completions] == [1, 2, 3]
    assert all(c.finish_reason == common_pb2.FINISH_REASON_LENGTH and c.generated_tokens == 8
               for c in reply.completions)
    again = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(n=3, temperature=0.8, seed=1)))
    assert [c.text for c in again.completions] == [c.text for c in reply.completions]


@pytest.mark.parametrize("request_kwargs, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"params": params(n=10_000, temperature=1.0)}, "n must be between 1"),
    ({"params": params(n=2)}, "n must be 1 at temperature 0"),
    ({"params": params(max_new_tokens=10**6)}, "max_new_tokens must be between 1"),
    ({"params": params(temperature=-1)}, "temperature"),
    ({"params": params(top_p=1.5)}, "top_p"),
    ({"params": params(stop=[""])}, "stop sequences"),
])
def test_bad_requests_are_invalid_argument(served, request_kwargs, message):
    _, stub = served
    request = generation_pb2.GenerateRequest(**{"prompt": PROMPT, "params": params(), **request_kwargs})
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()


def test_unknown_and_unloaded_versions_are_not_found(served, local_registry, tiny_model_dir, tmp_path):
    server, stub = served
    with pytest.raises(grpc.RpcError) as error:
        stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version="no-such-version"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    base = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-a", seed=1)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(), model_version="lora-a"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "LoadModel first" in error.value.details()


def test_load_switch_rollback(served, local_registry, tiny_model_dir, tmp_path):
    server, stub = served
    base = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-a", seed=1)
    status = stub.LoadModel(generation_pb2.LoadModelRequest(model_version="lora-a"))
    assert status.serving_version == base and set(status.loaded_versions) == {base, "lora-a"}
    on_lora = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=12),
                                                           model_version="lora-a"))
    on_base = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=12)))
    assert on_lora.model_version == "lora-a" and on_base.model_version == base
    assert on_lora.completions[0].text != on_base.completions[0].text, "the adapter must change the output"

    status = stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version="lora-a"))
    assert status.serving_version == "lora-a" and status.history == [base] and status.last_swap_duration_seconds >= 0
    assert local_registry.serving_version("generation") == "lora-a"
    served_now = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params(max_new_tokens=12)))
    assert served_now.model_version == "lora-a" and served_now.completions[0].text == on_lora.completions[0].text

    status = stub.Rollback(generation_pb2.RollbackRequest())
    assert status.serving_version == base and local_registry.serving_version("generation") == base
    with pytest.raises(grpc.RpcError) as error:
        stub.Rollback(generation_pb2.RollbackRequest())
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_full_version_and_failed_loads_keep_serving(served, local_registry, tiny_model_dir, tmp_path):
    from transformers import AutoConfig
    server, stub = served
    base = stub.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    # a full version: a complete model folder in the store
    registered = local_registry.register(ModelVersion(version="full-a", kind="full", base_version=base),
                                         files_dir=tiny_model_dir)
    assert stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version=registered.version)).serving_version \
        == "full-a"
    # corrupt: a stored file no longer matches its manifest
    make_lora(local_registry, base, tiny_model_dir, tmp_path / "lora", "lora-corrupt", seed=2)
    stored = Path(local_registry.store.root) / "models" / "lora-corrupt" / "adapter_model.safetensors"
    stored.write_bytes(b"not the weights")
    with pytest.raises(grpc.RpcError) as error:
        stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version="lora-corrupt"))
    assert error.value.code() == grpc.StatusCode.DATA_LOSS and "still serving full-a" in error.value.details()
    # wrong base: an adapter trained on a model of another shape
    assert AutoConfig.from_pretrained(tiny_model_dir).hidden_size == 32
    bigger = tmp_path / "bigger"
    _bigger_model(tiny_model_dir, bigger)
    make_lora(local_registry, base, bigger, tmp_path / "lora-wrong", "lora-wrong-base", seed=3)
    with pytest.raises(grpc.RpcError) as error:
        stub.SwitchModel(generation_pb2.SwitchModelRequest(model_version="lora-wrong-base"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "size mismatch" in error.value.details()
    status = stub.GetModelStatus(generation_pb2.GetModelStatusRequest())
    assert status.serving_version == "full-a" and "lora-wrong-base" in status.last_load_error
    assert stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, params=params())).model_version == "full-a"


def _bigger_model(model_dir: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)


def test_stream_tokens_and_completions(served):
    _, stub = served
    messages = list(stub.GenerateStream(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=params(n=2, temperature=0.8, seed=3, max_new_tokens=6))))
    unary = stub.Generate(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=params(n=2, temperature=0.8, seed=3, max_new_tokens=6)))
    for index in (0, 1):
        mine = [m for m in messages if m.index == index]
        assert len(mine) == 6 and all(m.model_version == unary.model_version for m in mine)
        assert mine[-1].HasField("completion") and not any(m.HasField("completion") for m in mine[:-1])
        assert "".join(m.token_text for m in mine) == mine[-1].completion.text == unary.completions[index].text


def test_deadline_and_cancel_stop_compute(served):
    server, stub = served
    engine = server.service.backend.engine
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(generation_pb2.GenerateRequest(
            prompt=PROMPT, params=params(n=4, temperature=1.0, max_new_tokens=2000)), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = stub.GenerateStream(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=params(n=4, temperature=1.0, max_new_tokens=2000)))
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 5
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 0 and engine.queued == 0


def test_health_serving_after_load(ilf_env):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    server = start_server()
    try:
        health = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{server.port}"))
        reply = health.Check(health_pb2.HealthCheckRequest(service="ilf.v1.Generation"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_concurrent_requests_share_batches(served):
    server, stub = served
    engine = server.service.backend.engine
    steps_before = engine.steps
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(stub.Generate(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=params(max_new_tokens=30))))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(replies) == 6
    # 6 requests of 30 tokens each, one after another, would take about 180 steps
    assert engine.steps - steps_before < 120


@pytest.mark.slow
def test_real_smollm2_greedy_matches_transformers_and_seeds_hold(ilf_env, monkeypatch):
    """The engine on SmolLM2-135M-Instruct: greedy equals transformers generate, seeds survive batching."""
    import os
    from ilf import data, prompts
    monkeypatch.setenv("ILF_MODEL_CACHE", os.path.expanduser("~/.cache/ilf/models"))  # reuse the conversion
    from ilf.registry import Registry
    from ilf.store import open_store
    registry = Registry(open_store())
    loaded = load_version(registry, registry.ensure_base("embedded:smollm2-135m-instruct").version)
    prompt = prompts.mbpp_prompt(data.task(11))
    engine = Engine(max_rows=32, max_queue=4)
    try:
        expected = sample(loaded, prompt, n=1, max_new_tokens=48)[0]
        greedy = engine.submit(loaded, prompt, Sampling(n=1, max_new_tokens=48)).result()[0]
        assert greedy.text == expected.text and "return" in greedy.text
        settings = Sampling(n=4, temperature=0.8, max_new_tokens=32, seed=3)
        alone = [s.text for s in engine.submit(loaded, prompt, settings).result()]
        neighbour = engine.submit(loaded, prompts.mbpp_prompt(data.task(12)), Sampling(n=6, temperature=0.8,
                                                                                         max_new_tokens=40))
        assert [s.text for s in engine.submit(loaded, prompt, settings).result()] == alone
        neighbour.result()
    finally:
        engine.stop()
