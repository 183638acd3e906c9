"""ILF_DTYPE: what auto picks, bf16 greedy agreeing with fp32 where rounding cannot flip a token, and the dtype
named in every response."""
from __future__ import annotations

import pytest
import requests
import torch

from ilf import config
from ilf.modeling import cpu_has_bf16, load_version, model_dtype
from ilf.sampling import Sampling
from ilf.v1 import generation_pb2
from services.generation.batch import Batch
from services.generation.request import GenerationHandle
from test_generation import PROMPT, params, start_server, stub_for


def test_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    monkeypatch.setenv("ILF_DTYPE", "auto")
    assert model_dtype("cuda") == torch.bfloat16
    flags = open("/proc/cpuinfo").read().split()
    assert cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert model_dtype("cpu") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    for name in ("float32", "bfloat16", "float16"):
        monkeypatch.setenv("ILF_DTYPE", name)
        assert model_dtype("cpu") == getattr(torch, name)
    monkeypatch.setenv("ILF_DTYPE", "double")
    with pytest.raises(config.ConfigError, match="ILF_DTYPE"):
        model_dtype("cpu")


def greedy_logits(loaded, prompt_ids: torch.Tensor, forced: list[int]) -> list[torch.Tensor]:
    """The next-token logits after the prompt and after each forced token."""
    batch = Batch.prefill(loaded, prompt_ids, GenerationHandle(n=1, model_version=loaded.version, seeds=[0]),
                          Sampling(n=1, max_new_tokens=len(forced) + 1))
    logits = [batch.logits[0].clone()]
    for token in forced:
        batch.step(torch.tensor([token], device=loaded.device))
        logits.append(batch.logits[0].clone())
    return logits


@torch.inference_mode()
def test_bf16_greedy_agrees_with_fp32_wherever_the_top_token_leads_by_more_than_the_rounding(local_registry):
    version = local_registry.ensure_base(config.get("ILF_BASE_MODEL")).version
    fp32 = load_version(local_registry, version, dtype=torch.float32)
    bf16 = load_version(local_registry, version, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    prompt_ids = fp32.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(fp32.device)
    forced = []   # fp32's greedy continuation, fed to both so every position compares the same context
    for _ in range(24):
        forced.append(int(greedy_logits(fp32, prompt_ids, forced)[-1].argmax()))
    reference, rounded = greedy_logits(fp32, prompt_ids, forced[:-1]), greedy_logits(bf16, prompt_ids, forced[:-1])
    clear = 0
    for exact, approximate, token in zip(reference, rounded, forced):
        top = exact.topk(2).values
        error = float((exact - approximate.float()).abs().max())
        assert error < 0.05 * float(exact.abs().max()), "bf16 logits must stay close to fp32"
        if float(top[0] - top[1]) > 4 * error:
            clear += 1
            assert int(approximate.argmax()) == token
    assert clear >= 20, "the tiny model's greedy tokens lead clearly; most positions must be compared"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_dtype_is_named_in_every_response(ilf_env, monkeypatch, dtype):
    monkeypatch.setenv("ILF_DTYPE", dtype)
    monkeypatch.setenv("ILF_GENERATION_HTTP_PORT", "0")
    server = start_server()
    try:
        stub = stub_for(server)
        request = generation_pb2.GenerateRequest(prompt=PROMPT, params=params(n=2, temperature=0.8, seed=1))
        assert stub.Generate(request).dtype == dtype
        assert {m.dtype for m in stub.GenerateStream(request)} == {dtype}
        url = server.service.http.url
        assert requests.get(f"{url}/info", timeout=5).json()["model_dtype"] == f"torch.{dtype}"
        reply = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 3, "details": True}}, timeout=60).json()
        assert reply["details"]["dtype"] == dtype
    finally:
        server.stop(0)
