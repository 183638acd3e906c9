"""LoRA fine-tuning speed: our trainer vs TRL's SFTTrainer, same model, data and LoRA settings.

Data: MBPP training tasks as (generation prompt, gold body) pairs, the shape of an ILF round's
fine-tuning set. Both sides: LoRA r=16, alpha=32, dropout 0.05 on every linear layer, lr 2e-4 with
linear decay, AdamW without weight decay, gradient clipping 1.0, max_seq_len 1024, loss on the
completion only, the same effective batch and epochs, in the dtype the trainer computes in for ILF_DTYPE
(bf16 autocast over float32 weights where ILF_DTYPE resolves to a 16-bit dtype; TRL with bf16=True then).
Ours also runs in float32, for the speed-up bf16 buys and the loss curves side by side. Tokens/s counts the
same real (unpadded) tokens for all, over the training loop only (model loading and tokenisation excluded on
every side). Ours runs first, so any warm-up cost falls on it.

    .venv/bin/python benchmarks/training.py [--examples 32] [--batch-size 8] [--epochs 1] [--model tiny]

Needs TRL and datasets: `make bench-setup` installs them with transformers and torch pinned (an unpinned
install upgrades transformers to 5.x).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf import config, data, prompts  # noqa: E402
from ilf.datasets import put_dataset  # noqa: E402
from ilf.modeling import configure_torch, dtype_name, resolve_source  # noqa: E402
from ilf.registry import Registry  # noqa: E402
from ilf.store import open_store  # noqa: E402
from trainer.train import train, training_compute_dtype  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
LORA = {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
LEARNING_RATE, MAX_SEQ_LEN = 2e-4, 1024


def mbpp_pairs(count: int) -> list[dict]:
    pairs = []
    for task in data.split_tasks("train"):
        prefix = prompts.code_prefix(task.code, prompts.entry_point(task.tests, task.code))
        if task.code.startswith(prefix) and task.code[len(prefix):].strip():
            prompt = prompts.generation_prompt(task.text, task.tests, prefix)
            pairs.append({"prompt": prompt, "completion": task.code[len(prefix):]})
        if len(pairs) == count:
            break
    return pairs


def run_ours(store, base_version: str, dataset: str, batch_size: int, epochs: int, dtype: str) -> dict:
    os.environ["ILF_DTYPE"] = dtype
    run_id = f"bench-{dtype}-{int(time.time())}"
    hp = {"method": "lora", "learning_rate": LEARNING_RATE, "batch_size": batch_size, "epochs": epochs,
          "max_seq_len": MAX_SEQ_LEN, "seed": 0, "merge_weights": False, **LORA}
    store.put_json(f"runs/{run_id}/spec.json", {
        "run_id": run_id, "dataset": dataset, "base_model_version": base_version, "purpose": "generation",
        "hyperparameters": hp, "output_version": f"bench-{run_id}"})
    metrics = train(store, run_id, checkpoint_every=10**9, micro_batch_tokens=int(config.get("ILF_TRAINER_MICRO_BATCH_TOKENS"))).metrics
    return {"seconds": metrics["train_seconds"], "final_loss": metrics["final_loss"], "tokens": metrics["tokens"],
            "losses": store.get_json(f"runs/{run_id}/metrics.json")["losses"]}


def run_trl(model_dir: str, pairs: list[dict], batch_size: int, epochs: int, output_dir: str, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                     num_train_epochs=epochs, learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_ratio=0.0,
                     weight_decay=0.0, max_grad_norm=1.0, max_length=MAX_SEQ_LEN, completion_only_loss=True,
                     packing=False, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     bf16=bf16, fp16=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=peft_config)
    result = trainer.train()
    return {"seconds": result.metrics["train_runtime"], "final_loss": trainer.state.log_history[-2].get("loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default=MODEL, help="base model source; 'tiny' builds the test fixture's model")
    args = parser.parse_args()
    os.environ.setdefault("ILF_DEVICE", "cpu")
    shared_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared_data.is_dir():  # the MBPP copy beside the checkout, else ilf.data downloads it
        os.environ.setdefault("ILF_DATA_DIR", str(shared_data))
    configure_torch()
    dtype = dtype_name(training_compute_dtype())  # what the trainer computes in (float16 trains in bf16)
    with tempfile.TemporaryDirectory(prefix="ilf-bench-train-") as tmp:
        source = args.model
        if source == "tiny":
            from ilf.tiny_model import build_tiny_model
            source = str(build_tiny_model(Path(tmp) / "tiny"))
        model_dir = resolve_source(source)
        store = open_store(f"file://{tmp}/store")
        base = Registry(store).ensure_base(source)
        pairs = mbpp_pairs(args.examples)
        dataset = put_dataset(store, pairs, name="bench")
        print(f"model {source}; {len(pairs)} MBPP pairs, batch {args.batch_size}, {args.epochs} epoch(s), "
              f"torch threads {__import__('torch').get_num_threads()}, dtype {dtype}", flush=True)
        ours = {d: run_ours(store, base.version, dataset, args.batch_size, args.epochs, d)
                for d in dict.fromkeys([dtype, "float32"])}
        trl = run_trl(str(model_dir), pairs, args.batch_size, args.epochs, f"{tmp}/trl", bf16=dtype == "bfloat16")
    tokens = ours[dtype]["tokens"]  # the same real tokens went through every run
    rates = {d: tokens / run["seconds"] for d, run in ours.items()}
    trl_rate = tokens / trl["seconds"]
    for d, run in ours.items():
        print(f"ours ({d}): {run['seconds']:.1f} s, {rates[d]:.0f} tokens/s, losses "
              + " ".join(f"{loss:.4f}" for loss in run["losses"]))
    print(f"trl ({dtype}):  {trl['seconds']:.1f} s, {trl_rate:.0f} tokens/s, final loss {trl['final_loss']}")
    if dtype != "float32":
        curve, reference = ours[dtype]["losses"], ours["float32"]["losses"]
        print(f"trainer {dtype} vs float32: {rates[dtype] / rates['float32']:.2f}x tokens/s; loss curve within "
              f"{100 * max(abs(a - b) / b for a, b in zip(curve, reference)):.1f}% of float32 at every step")
    print(f"training ratio vs trl ({dtype}): {rates[dtype] / trl_rate:.2f}")


if __name__ == "__main__":
    main()
