"""Batch operations on the tiny model: prefill, merge, select and step give each row what it gets alone."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ilf.modeling import LoadedModel
from services.generation.batch import Batch
from ilf.sampling import Sampling
from services.generation.request import GenerationHandle


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return LoadedModel(version="tiny", model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                       device="cpu")


def prefill(loaded, prompt: str, n: int, seed: int = 0) -> Batch:
    settings = Sampling(n=n, temperature=1.0, seed=seed)
    handle = GenerationHandle(n=n, model_version=loaded.version, seeds=[seed + i for i in range(n)])
    input_ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return Batch.prefill(loaded, input_ids, handle, settings)


def next_logits(loaded, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@torch.inference_mode()
def test_prefill_gives_each_sample_a_row_with_its_own_seed(loaded):
    batch = prefill(loaded, "def add(a, b):", n=3, seed=10)
    assert len(batch.rows) == 3 and [row.index for row in batch.rows] == [0, 1, 2]
    draws = [torch.rand(1, generator=row.generator).item() for row in batch.rows]
    assert draws == [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in (10, 11, 12)]
    expected = next_logits(loaded, batch.rows[0].prompt_ids)
    assert all(torch.allclose(batch.logits[i], expected, atol=1e-5) for i in range(3))


@torch.inference_mode()
def test_merged_and_filtered_rows_decode_as_if_alone(loaded):
    long_prompt, short_prompt = "def a_much_longer_function_name(first, second):", "x ="
    batch = prefill(loaded, long_prompt, n=2)
    fed = [[], []]
    batch.step(torch.tensor([100, 101]))
    fed[0].append(100), fed[1].append(101)
    batch.merge(prefill(loaded, short_prompt, n=2))    # joins one step late
    fed += [[], []]
    for step in range(3):
        tokens = torch.tensor([200 + 7 * step + i for i in range(len(batch.rows))])
        for i, token in enumerate(tokens.tolist()):
            fed[i].append(token)
        batch.step(tokens)
    for i, row in enumerate(batch.rows):
        assert torch.allclose(batch.logits[i], next_logits(loaded, row.prompt_ids + fed[i]), atol=1e-4)
    # only the short prompt's rows left: the long prompt's cache goes
    batch.select([2, 3])
    assert len(batch.cache.prompts) == 1 and batch.cache.prompts[0].length == len(batch.rows[0].prompt_ids)
    batch.step(torch.tensor([5, 6]))
    for i, tokens in enumerate((fed[2] + [5], fed[3] + [6])):
        assert torch.allclose(batch.logits[i], next_logits(loaded, batch.rows[i].prompt_ids + tokens), atol=1e-4)


@torch.inference_mode()
def test_the_n_samples_of_a_request_share_one_copy_of_its_prompt_cache(loaded):
    one, thirty = prefill(loaded, "def add(a, b):", n=1), prefill(loaded, "def add(a, b):", n=30)
    assert len(thirty.cache.prompts) == 1 and thirty.cache.prompt_nbytes == one.cache.prompt_nbytes > 0
    assert thirty.cache.groups() == [(thirty.cache.prompts[0], 0, 30)]
    for step in range(3):
        thirty.step(torch.full((30,), 100 + step))
    # what grows with n is the generated tokens only
    config = loaded.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size //
                                                                            config.num_attention_heads) * 4
    assert thirty.cache.generated_nbytes >= 30 * 3 * per_token
    assert thirty.cache.generated_nbytes <= 32 * 64 * per_token   # spare rows and columns: one block of each


@torch.inference_mode()
def test_fail_ends_every_row_of_the_request(loaded):
    batch = prefill(loaded, "x", n=2)
    handle = batch.rows[0].handle
    batch.fail(RuntimeError("boom"))
    assert batch.rows == []
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            handle.poll()


def test_a_model_the_decode_step_cannot_run_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ilf.errors import FailedPrecondition
    from services.generation.decode import decoder_for
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(FailedPrecondition, match="Llama-style"):
        decoder_for(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_packed_linear_computes_what_f_linear_does_for_any_row_count(dtype):
    import torch.nn.functional as F

    from ilf.modeling import cpu_flags
    from services.generation.decode import ONEDNN_BF16_FLAG_SETS, PackedLinear
    generator = torch.Generator().manual_seed(0)
    weight, bias = (torch.randn(96, 40, generator=generator).to(dtype), torch.randn(96, generator=generator).to(dtype))
    linear = PackedLinear(weight, bias)
    # float32 packs wherever oneDNN runs; bf16 only where oneDNN has its AVX-512 (or AVX-NE-CONVERT) kernels
    onednn_bf16 = any(flags <= cpu_flags() for flags in ONEDNN_BF16_FLAG_SETS)
    assert linear.packed == (torch.backends.mkldnn.is_available() and (dtype == torch.float32 or onednn_bf16))
    for rows in (1, 7, 32, 100):
        x = torch.randn(rows, 40, generator=generator).to(dtype)
        expected, got = F.linear(x, weight, bias), linear(x)
        assert got.dtype == dtype and got.shape == expected.shape
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)   # the same products, rounded once
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
