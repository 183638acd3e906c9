"""The fine-tuning job: reads runs/<id>/spec.json and its dataset, trains, registers the result.

Everything it needs travels through the store (spec, dataset, progress, checkpoints, outputs), so
the same job runs as a local process or in a Kubernetes pod.
"""
from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ilf import modeling
from ilf.datasets import read_dataset
from ilf.errors import InvalidArgument
from ilf.registry import ModelVersion, Registry
from ilf.store import ArtifactStore
from ilf.training_spec import Hyperparameters, RunSpec
from trainer import data, memory
from trainer.distributed import ParallelLoss, World, step_passes
from trainer.dropout import quarter_lora_dropout

log = logging.getLogger("trainer")

PROGRESS_EVERY_S = 2.0
LOG_LINES_KEPT = 50


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


class Progress:
    """runs/<id>/progress.json, rewritten at most every PROGRESS_EVERY_S seconds, plus a log tail.

    Starts from what an earlier attempt wrote, so a resumed run keeps its log. Of several trainer
    processes only rank 0 writes (writes=False for the others).
    """

    def __init__(self, store: ArtifactStore, run_id: str, *, writes: bool = True):
        self.store, self.key, self.writes = store, f"{run_prefix(run_id)}/progress.json", writes
        self.fields: dict = store.get_json(self.key) if store.exists(self.key) else {"log": []}
        self.fields.update(phase="starting", error="")
        self.last_write = 0.0

    def update(self, *, force: bool = False, **fields) -> None:
        self.fields.update(fields)
        if self.writes and (force or time.monotonic() - self.last_write >= PROGRESS_EVERY_S):
            self.fields["updated_at"] = time.time()
            self.store.put_json(self.key, self.fields, overwrite=True)
            self.last_write = time.monotonic()

    def log_line(self, line: str) -> None:
        self.fields["log"] = (self.fields["log"] + [line])[-LOG_LINES_KEPT:]


class _ProgressLogHandler(logging.Handler):
    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record):
        self.progress.log_line(self.format(record))
        self.progress.update(force=record.levelno >= logging.WARNING)


class CompletionLoss(torch.nn.Module):
    """completion_loss as a module, so DDP and FSDP can wrap the whole loss (see ParallelLoss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return completion_loss(self.model, batch)


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the labelled (completion + EOS) positions.

    The output projection runs only on those positions: prompt tokens carry no loss, so their
    vocabulary-sized logits would be wasted work and memory.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != data.IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")


def training_compute_dtype(device: str | None = None) -> torch.dtype:
    """The dtype the matmuls run in: bfloat16 autocast where ILF_DTYPE resolves to a 16-bit type, else float32.

    Weights, LoRA adapters, gradients and optimizer state stay float32 (the master copy); only the products
    run in bf16, which has float32's range, so no loss scaling is needed (float16 would need it, so a float16
    setting trains in bf16 too). device: ILF_DEVICE's when not given.
    """
    return torch.float32 if modeling.model_dtype(device) == torch.float32 else torch.bfloat16


def prepare_model(loaded: modeling.LoadedModel, hp: Hyperparameters, gradient_checkpointing: bool):
    model = loaded.model
    if hp.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM"))
        if loaded.device == "cpu":  # CUDA's dropout is fused and cheap; CPU's Bernoulli mask is not
            quarter_lora_dropout(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, which frozen LoRA embeddings lack.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# Checkpoints hold full (unsharded) tensors keyed by parameter name, whatever the number of processes:
# torch.distributed.checkpoint's state_dict helpers gather FSDP shards into rank 0's CPU memory and
# scatter them back on resume, and treat a replicated or single-process model the same way.
def _checkpoint_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **options)


def _save_checkpoint(store: ArtifactStore, run_id: str, model, optimizer, scheduler, state: dict, world: World) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    options = _checkpoint_options(cpu_offload=True, ignore_frozen_params=True)  # every rank takes part
    trainable = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = world.gather(torch.get_rng_state())  # each rank's dropout draws go on from where they were
    if world.is_writer:
        buffer = io.BytesIO()
        torch.save({**state, "trainable": trainable, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "rng": rng}, buffer)
        store.put(f"{run_prefix(run_id)}/checkpoint.pt", buffer.getvalue(), overwrite=True)


def _load_checkpoint(store: ArtifactStore, run_id: str, model, optimizer, scheduler, world: World) -> dict | None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    key = f"{run_prefix(run_id)}/checkpoint.pt"
    if not store.exists(key):
        return None
    # Only rank 0 reads the tensors; the state dict helpers broadcast them to the other ranks.
    checkpoint = torch.load(io.BytesIO(store.get(key)), map_location="cpu", weights_only=False) if world.is_writer else {}
    options = _checkpoint_options(strict=False, broadcast_from_rank0=world.size > 1)
    set_model_state_dict(model, checkpoint.pop("trainable", {}), options=options)
    set_optimizer_state_dict(model, optimizer, checkpoint.pop("optimizer", {}), options=options)
    checkpoint = world.from_writer(checkpoint)
    scheduler.load_state_dict(checkpoint.pop("scheduler"))
    rng = checkpoint.pop("rng")
    # A run resumed with another number of processes deals examples out differently anyway.
    torch.set_rng_state(rng[world.rank] if len(rng) == world.size else rng[0])
    return checkpoint


def save_loss_curve(losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(range(1, len(losses) + 1), losses, marker="o" if len(losses) < 40 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per completion token")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train(store: ArtifactStore, run_id: str, *, checkpoint_every: int = 20, micro_batch_tokens: int = 2048,
          gradient_checkpointing: bool | None = None, world: World = World()) -> ModelVersion | None:
    """Trains the run and registers its model; under torchrun, every rank calls this and rank 0 returns the model.

    gradient_checkpointing None: on only when a micro-batch's activations would not fit comfortably (memory.py)."""
    registry = Registry(store)
    spec = RunSpec.from_json(store.get_json(f"{run_prefix(run_id)}/spec.json"))
    progress = Progress(store, run_id, writes=world.is_writer)
    handler = _ProgressLogHandler(progress)
    log.addHandler(handler)
    # The run's log lines are part of its progress, whatever the root level; other ranks would only repeat them.
    log.setLevel(logging.INFO if world.is_writer else logging.WARNING)
    try:
        record = _train(store, registry, spec, progress, checkpoint_every, micro_batch_tokens, gradient_checkpointing,
                        world)
    finally:
        log.removeHandler(handler)
    progress.update(phase="succeeded", force=True)
    return record


def _train(store, registry, spec: RunSpec, progress, checkpoint_every, micro_batch_tokens, gradient_checkpointing,
           world: World) -> ModelVersion | None:
    hp, run_id = spec.hyperparameters, spec.run_id
    if store.exists(f"models/{spec.output_version}/MANIFEST.json"):
        # An earlier attempt registered the model and died before it could report: nothing to redo.
        log.info("model %s is already registered; nothing to do", spec.output_version)
        return registry.get(spec.output_version)

    torch.manual_seed(hp.seed)
    modeling.configure_torch()
    progress.update(phase="loading", force=True)
    log.info("loading %s and dataset %s", spec.base_model_version, spec.dataset)
    # The first rank of each node loads first: it fetches the version into the node's model cache, which the
    # node's other ranks then only read.
    if world.local_rank:
        world.barrier()
    loaded = modeling.load_version(registry, spec.base_model_version, merge=True)
    if not world.local_rank:
        world.barrier()
    tokenizer = loaded.tokenizer
    examples, dropped = data.tokenize(tokenizer, read_dataset(store, spec.dataset), hp.max_seq_len)
    if not examples:
        raise InvalidArgument(f"no record of {spec.dataset} keeps a completion token within max_seq_len={hp.max_seq_len}")
    if dropped:
        log.warning("dropped %d records whose completion starts beyond max_seq_len", dropped)

    compute_dtype = training_compute_dtype(loaded.device)
    if gradient_checkpointing is None:
        activations = memory.activation_bytes(loaded.model.config, micro_batch_tokens, compute_dtype)
        available = memory.available_bytes(loaded.device, world.size)
        # every rank does what the first decides, so that they run the same passes
        gradient_checkpointing = world.from_writer(memory.needs_checkpointing(activations, available))
        decided = f" (auto: about {activations / 2**30:.1f} GiB of activations per micro-batch of {micro_batch_tokens} " \
                  f"tokens, {available / 2**30:.1f} GiB available)"
    else:
        decided = ""
    model = prepare_model(loaded, hp, gradient_checkpointing)
    parallel = ParallelLoss(CompletionLoss(model), world, shard=hp.method == "full", device=loaded.device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding, which swaps the parameters
    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0)
    # Linear decay to zero over the run, as in the authors' (Hugging Face Trainer) setup.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))

    state = {"step": 0, "losses": [], "gradient_norms": [], "tokens": 0, "train_seconds": 0.0}
    resumed = _load_checkpoint(store, run_id, model, optimizer, scheduler, world)
    if resumed:
        state = dict(resumed)
        log.info("resumed from the checkpoint at step %d/%d", state["step"], total_steps)
    log.info("%s fine-tuning: %d examples, %d steps of %d, %d trainable parameters, compute %s (float32 weights), "
             "gradient checkpointing %s%s%s",
             hp.method, len(examples), total_steps, hp.batch_size, sum(p.numel() for p in trainable),
             modeling.dtype_name(compute_dtype),
             "on" if gradient_checkpointing else "off", decided,
             f", {world.size} processes ({'FSDP' if parallel.sharded else 'DDP'})" if world.size > 1 else "")

    device, pad_id = loaded.device, tokenizer.pad_token_id
    autocast = torch.autocast(device.split(":")[0], dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {run_id}", unit="step", mininterval=1,
               disable=not world.is_writer)
    first_step, session_start, session_tokens = state["step"], time.monotonic(), 0
    for step in range(state["step"], total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        batch_examples = data.epoch_steps(examples, hp.batch_size, hp.seed, epoch)[index]
        label_count = sum(e.completion_tokens for e in batch_examples)
        passes = step_passes(batch_examples, micro_batch_tokens, world)
        step_loss, step_tokens = 0.0, 0
        for number, (micro, weight) in enumerate(passes, 1):
            batch = {k: v.to(device) for k, v in data.collate(micro, pad_id).items()}
            with parallel.accumulating(sync=number == len(passes)):
                with autocast:
                    loss = parallel(batch) / label_count * weight  # mean over the whole step's tokens
                # DDP and FSDP average the ranks' gradients, and the step's gradient is their sum.
                (loss * world.size).backward()
            step_loss += loss.item()
            step_tokens += int(weight) * sum(len(e.input_ids) for e in micro)
        step_loss, step_tokens = world.sum([step_loss, step_tokens])
        session_tokens += int(step_tokens)
        gradient_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0).item()  # before clipping
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.monotonic() - session_start
        tokens_per_second = session_tokens / max(elapsed, 1e-9)
        state.update(step=step + 1, losses=state["losses"] + [step_loss],
                     gradient_norms=state["gradient_norms"] + [gradient_norm])
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
        done = step + 1 == total_steps
        progress.update(phase="training", step=step + 1, total_steps=total_steps, epoch=(step + 1) / steps_per_epoch,
                        loss=step_loss, tokens_per_second=tokens_per_second,
                        eta_seconds=elapsed / (step + 1 - first_step) * (total_steps - step - 1), force=done)
        if (step + 1) % checkpoint_every == 0 and not done:
            _save_checkpoint(store, run_id, model, optimizer, scheduler,
                             {**state, "tokens": state["tokens"] + session_tokens,
                              "train_seconds": state["train_seconds"] + elapsed}, world)
            log.info("checkpoint at step %d", step + 1)
    bar.close()
    elapsed = time.monotonic() - session_start
    tokens, train_seconds = state["tokens"] + session_tokens, state["train_seconds"] + elapsed
    metrics = {"final_loss": state["losses"][-1], "losses": state["losses"], "gradient_norms": state["gradient_norms"],
               "steps": total_steps, "examples": len(examples), "dropped_examples": dropped, "tokens": tokens,
               "train_seconds": train_seconds, "tokens_per_second": tokens / max(train_seconds, 1e-9),
               "resumed_at_step": first_step if resumed else None, "processes": world.size,
               "compute_dtype": modeling.dtype_name(compute_dtype), "gradient_checkpointing": gradient_checkpointing,
               "micro_batch_tokens": micro_batch_tokens}
    progress.update(phase="saving", force=True)
    # Sharded weights are gathered into rank 0's memory, with every rank taking part; then the others are done.
    weights = _full_weights(model) if parallel.sharded else None
    if not world.is_writer:
        return None
    return _publish(store, registry, spec, model, tokenizer, metrics, weights)


def _full_weights(model) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from its shards; a tied weight (embeddings = output layer) once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    weights = get_model_state_dict(model, options=_checkpoint_options(cpu_offload=True))
    # Gathered, the tied names hold two copies, which save_pretrained would both write: keep the first name.
    seen, repeated = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            repeated.add(name)
        seen.add(id(parameter))
    return {name: tensor for name, tensor in weights.items() if name not in repeated}


def _publish(store, registry, spec: RunSpec, model, tokenizer, metrics, weights: dict | None) -> ModelVersion:
    """Uploads the run's outputs and registers the model: `weights` when given (gathered from shards), else the model's."""
    hp, run_id = spec.hyperparameters, spec.run_id
    with tempfile.TemporaryDirectory(prefix="ilf-train-") as tmp:
        run_dir, model_dir = Path(tmp) / "run", Path(tmp) / "model"
        run_dir.mkdir()
        save_loss_curve(metrics["losses"], run_dir / "loss_curve.png")
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if weights is None:
            model = model.to("cpu")
        if hp.method == "lora":
            model.save_pretrained(model_dir)  # adapter_config.json + adapter_model.safetensors (PEFT layout)
            if hp.merge_weights:
                merged = model.merge_and_unload()
                merged.save_pretrained(model_dir / "merged", safe_serialization=True)
                tokenizer.save_pretrained(model_dir / "merged")
        else:
            model.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
        for path in run_dir.iterdir():
            store.put(f"{run_prefix(run_id)}/{path.name}", path.read_bytes(), overwrite=True)
        summary = {k: v for k, v in metrics.items() if k not in ("losses", "gradient_norms")}
        record = registry.register(ModelVersion(
            version=spec.output_version, kind=hp.method, base_version=spec.base_model_version,
            lineage={"dataset": spec.dataset, "run_id": run_id, "hyperparameters": hp.to_json(), "purpose": spec.purpose,
                     "merged_weights": "merged/" if hp.merge_weights else None},
            metrics=summary), model_dir)
    log.info("registered %s (final loss %.4f, %.0f tokens/s)", record.version, metrics["final_loss"],
             metrics["tokens_per_second"])
    return record
