"""The trainer on the real SmolLM2-135M-Instruct (slow: converts the embedded GGUF once, ~1 min)."""
from __future__ import annotations

import json

import pytest

from ilf.datasets import put_dataset

pytestmark = pytest.mark.slow


def test_lora_on_smollm2_lowers_the_loss_and_yields_a_loadable_adapter(local_registry, monkeypatch):
    import torch
    from peft import PeftConfig

    from ilf import data, prompts
    from ilf.modeling import load_version, local_files
    from ilf.training_spec import with_defaults
    from trainer.train import train
    monkeypatch.delenv("ILF_BASE_MODEL")
    store = local_registry.store
    base = local_registry.ensure_base("embedded:smollm2-135m-instruct")
    pairs = []
    for task in data.split_tasks("train")[:4]:
        prefix = prompts.code_prefix(task.code, prompts.entry_point(task.tests, task.code))
        pairs.append({"prompt": prompts.generation_prompt(task.text, task.tests, prefix),
                      "completion": task.code[len(prefix):]})
    hp = with_defaults({"batch_size": 4, "epochs": 4, "max_seq_len": 512})  # the same 4 examples, 4 steps
    store.put_json("runs/smol/spec.json", {
        "run_id": "smol", "dataset": put_dataset(store, pairs, name="mbpp4"), "base_model_version": base.version,
        "purpose": "generation", "hyperparameters": hp.to_json(), "output_version": "smol-lora"})
    record = train(store, "smol")
    losses = json.loads(store.get("runs/smol/metrics.json"))["losses"]
    assert losses[-1] < losses[0]
    adapter = PeftConfig.from_pretrained(local_files(local_registry, record.version))
    assert adapter.r == 16 and {"q_proj", "v_proj", "down_proj"} <= set(adapter.target_modules)
    loaded = load_version(local_registry, record.version)
    ids = loaded.tokenizer(pairs[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(ids).logits).all()
