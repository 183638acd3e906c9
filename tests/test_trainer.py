"""The fine-tuning job on the tiny model: masking, batching, LoRA and full runs, resume, outputs."""
from __future__ import annotations

import json

import pytest
import torch

from ilf.datasets import put_dataset
from trainer import data

RECORDS = [{"prompt": f"Write a function that adds {i}.\n", "completion": f"def add(x):\n    return x + {i}\n"}
           for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def test_prompt_is_masked_and_completion_ends_with_eos(tokenizer):
    (example,), dropped = data.tokenize(tokenizer, RECORDS[:1], max_seq_len=1024)
    prompt_len = len(tokenizer(RECORDS[0]["prompt"])["input_ids"])
    assert dropped == 0
    assert example.labels[:prompt_len] == [data.IGNORE] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[prompt_len:-1]) == RECORDS[0]["completion"]


def test_records_without_room_for_the_completion_are_dropped(tokenizer):
    long_prompt = {"prompt": "word " * 50, "completion": "x"}
    examples, dropped = data.tokenize(tokenizer, [long_prompt, RECORDS[0]], max_seq_len=20)
    assert dropped == 1 and len(examples) == 1 and len(examples[0].input_ids) <= 20


def test_micro_batches_respect_the_token_budget_and_keep_every_example():
    step = [data.Example(list(range(n)), list(range(n))) for n in (5, 50, 7, 48, 6, 30)]
    batches = data.micro_batches(step, token_budget=100)
    assert sorted(len(e.input_ids) for b in batches for e in b) == [5, 6, 7, 30, 48, 50]
    for batch in batches:
        assert len(batch) * max(len(e.input_ids) for e in batch) <= 100 or len(batch) == 1
    # short and long examples do not share a micro-batch: little padding
    assert [len(e.input_ids) for e in batches[0]] == [5, 6, 7]


def test_epoch_order_is_deterministic_and_covers_everything():
    examples = [data.Example([i], [i]) for i in range(10)]
    first = data.epoch_steps(examples, 4, seed=1, epoch=0)
    assert first == data.epoch_steps(examples, 4, seed=1, epoch=0)
    assert [len(s) for s in first] == [4, 4, 2]
    assert sorted(e.input_ids[0] for s in first for e in s) == list(range(10))
    assert first != data.epoch_steps(examples, 4, seed=1, epoch=1)


def test_completion_loss_matches_the_masked_language_model_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from trainer.train import completion_loss
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples, _ = data.tokenize(tokenizer, RECORDS[:3], 1024)
    batch = data.collate(examples, tokenizer.pad_token_id)
    reference = model(**batch).loss  # transformers' mean over the labelled (non -100) positions
    ours = completion_loss(model, batch) / sum(e.completion_tokens for e in examples)
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_loss_and_gradients(tiny_model_dir, tokenizer, method):
    from transformers import AutoModelForCausalLM

    from ilf.modeling import LoadedModel
    from ilf.training_spec import with_defaults
    from trainer.train import completion_loss, prepare_model
    hp = with_defaults({"method": method, "lora_rank": 4, "lora_dropout": 0.0})
    batch = data.collate(data.tokenize(tokenizer, RECORDS[:3], 1024)[0], tokenizer.pad_token_id)

    def one_backward(checkpointing: bool) -> tuple[float, dict, int]:
        torch.manual_seed(0)  # the same LoRA initialisation both times
        loaded = LoadedModel("tiny", AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, "cpu")
        model = prepare_model(loaded, hp, gradient_checkpointing=checkpointing)
        calls, layer = [], loaded.model.get_decoder().layers[0]
        forward = layer.forward  # wrapped, not hooked: the recomputation skips module hooks
        layer.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
        loss = completion_loss(model, batch)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, len(calls)

    loss_kept, grads_kept, calls_kept = one_backward(False)
    loss_recomputed, grads_recomputed, calls_recomputed = one_backward(True)
    assert (calls_kept, calls_recomputed) == (1, 2)  # the backward pass ran the layer again
    assert loss_recomputed == pytest.approx(loss_kept, rel=1e-6)
    assert grads_kept.keys() == grads_recomputed.keys() and all(g is not None for g in grads_kept.values())
    for name, grad in grads_kept.items():
        assert torch.allclose(grads_recomputed[name], grad, atol=1e-6), name


def write_spec(store, registry, run_id: str, **hyperparameters) -> dict:
    from ilf.training_spec import with_defaults
    base = registry.ensure_base(__import__("ilf.config").config.get("ILF_BASE_MODEL"))
    hp = with_defaults({"batch_size": 4, "epochs": 2, "max_seq_len": 128, "lora_rank": 4, **hyperparameters})
    spec = {"run_id": run_id, "dataset": put_dataset(store, RECORDS, name="adds"), "base_model_version": base.version,
            "purpose": "generation", "hyperparameters": hp.to_json(), "output_version": f"out-{run_id}"}
    store.put_json(f"runs/{run_id}/spec.json", spec)
    return spec


def test_lora_run_registers_a_peft_adapter_with_lineage_metrics_and_plot(local_registry):
    from peft import PeftConfig

    from ilf.modeling import load_version, local_files
    from trainer.train import train
    store = local_registry.store
    spec = write_spec(store, local_registry, "lora1", merge_weights=True)
    record = train(store, "lora1")
    assert record.kind == "lora" and record.base_version == spec["base_model_version"]
    assert record.lineage["dataset"] == spec["dataset"] and record.lineage["run_id"] == "lora1"
    assert record.metrics["steps"] == 6 and record.metrics["tokens_per_second"] > 0
    files = local_files(local_registry, record.version)
    assert (files / "adapter_config.json").exists() and (files / "adapter_model.safetensors").exists()
    assert (files / "merged" / "model.safetensors").exists()
    assert PeftConfig.from_pretrained(files).r == 4
    metrics = json.loads(store.get("runs/lora1/metrics.json"))
    assert len(metrics["losses"]) == 6
    assert store.get("runs/lora1/loss_curve.png").startswith(b"\x89PNG")
    progress = store.get_json("runs/lora1/progress.json")
    assert progress["phase"] == "succeeded" and progress["step"] == 6 and progress["log"]
    loaded = load_version(local_registry, record.version)
    assert loaded.model(torch.tensor([[1, 2, 3]], device=loaded.device)).logits.shape[-1] == len(loaded.tokenizer)


def test_full_fine_tuning_changes_every_weight_and_loss_goes_down(local_registry):
    from ilf.modeling import load_version
    from trainer.train import train
    store = local_registry.store
    spec = write_spec(store, local_registry, "full1", method="full", learning_rate=1e-3, epochs=5)
    record = train(store, "full1")
    assert record.kind == "full"
    losses = record.metrics["final_loss"], json.loads(store.get("runs/full1/metrics.json"))["losses"][0]
    assert losses[0] < losses[1]
    before = load_version(local_registry, spec["base_model_version"]).model.state_dict()
    after = load_version(local_registry, record.version).model.state_dict()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_resume_from_checkpoint_continues_where_it_stopped(local_registry, monkeypatch):
    from trainer import train as train_module
    store = local_registry.store
    write_spec(store, local_registry, "resume1", epochs=3)  # 9 steps, checkpoint every 2

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_at_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_step_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_module.train(store, "resume1", checkpoint_every=2)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    record = train_module.train(store, "resume1", checkpoint_every=2)
    assert record.metrics["resumed_at_step"] == 4 and record.metrics["steps"] == 9
    assert len(json.loads(store.get("runs/resume1/metrics.json"))["losses"]) == 9
    assert any("resumed from the checkpoint at step 4" in line for line in store.get_json("runs/resume1/progress.json")["log"])


def test_bf16_training_follows_the_float32_loss_curve(local_registry, monkeypatch):
    """Same data, seed and steps: bf16 autocast (float32 master weights) stays within 2% of fp32 at every step."""
    from trainer.train import train
    store = local_registry.store
    curves = {}
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setenv("ILF_DTYPE", dtype)
        write_spec(store, local_registry, f"dtype-{dtype}", method="full", learning_rate=1e-3, epochs=3)
        record = train(store, f"dtype-{dtype}")
        assert record.metrics["compute_dtype"] == dtype
        assert any(f"compute {dtype}" in line for line in store.get_json(f"runs/dtype-{dtype}/progress.json")["log"])
        curves[dtype] = json.loads(store.get(f"runs/dtype-{dtype}/metrics.json"))["losses"]
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    assert fp32 != bf16  # the products really ran in another precision
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.02


def test_auto_checkpointing_is_off_where_activations_fit_and_on_where_they_would_not(local_registry, monkeypatch):
    from types import SimpleNamespace

    from trainer import memory
    from trainer.train import train
    # SmolLM2-135M's 2,048-token micro-batch: 4.3 GB of bf16 activations, as measured; a 7B-sized model's: 32 GB
    smollm2, seven_b = SimpleNamespace(num_hidden_layers=30, hidden_size=576), SimpleNamespace(num_hidden_layers=32,
                                                                                              hidden_size=4096)
    assert 4.0e9 < memory.activation_bytes(smollm2, 2048, torch.bfloat16) < 4.6e9
    assert memory.activation_bytes(smollm2, 2048, torch.float32) == 2 * memory.activation_bytes(smollm2, 2048,
                                                                                                torch.bfloat16)
    assert not memory.needs_checkpointing(memory.activation_bytes(smollm2, 2048, torch.bfloat16), 16 * 2**30)
    assert memory.needs_checkpointing(memory.activation_bytes(seven_b, 2048, torch.bfloat16), 64 * 2**30)
    machine = memory.available_bytes("cpu")
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < machine <= total and memory.available_bytes("cpu", processes=2) == machine // 2

    # the trainer decides, says so, and records it: the tiny model fits; with almost no memory left it recomputes
    store = local_registry.store
    write_spec(store, local_registry, "auto-fits")
    assert train(store, "auto-fits").metrics["gradient_checkpointing"] is False
    monkeypatch.setattr(memory, "available_bytes", lambda device, processes=1: 1024)
    write_spec(store, local_registry, "auto-tight")
    record = train(store, "auto-tight")
    assert record.metrics["gradient_checkpointing"] is True
    assert any("gradient checkpointing on (auto:" in line for line in store.get_json("runs/auto-tight/progress.json")["log"])
    write_spec(store, local_registry, "explicit-off")   # a setting of true or false is followed as it is
    assert train(store, "explicit-off", gradient_checkpointing=False).metrics["gradient_checkpointing"] is False
