"""The trainer under torchrun: two processes (gloo, CPU) train like one on the same global batch and seed.

Each run is `python -m torch.distributed.run --standalone --nproc-per-node N -m trainer ...`, the
command the Kubernetes launcher gives a multi-GPU pod, against a local store. LoRA runs use DDP,
full fine-tuning FSDP. Two processes add up each step's gradient in another order than one does,
so they agree to float32 rounding, not bitwise: within TOLERANCE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ilf.datasets import put_dataset
from ilf.training_spec import Hyperparameters, RunSpec

REPO = Path(__file__).resolve().parents[1]
RECORDS = [{"prompt": f"Write a function that subtracts {i}.\n", "completion": f"def sub(x):\n    return x - {i}\n"}
           for i in range(12)]
# 12 records of different lengths, 4 a step, 2 epochs: 6 steps; a 96-token budget cuts each rank's share in two.
STEPS, MICRO_BATCH_TOKENS = 6, 96
# The largest absolute difference allowed in any step's loss and any trained weight (measured: below 2e-6), and
# the largest relative one in a step's gradient norm: clip_grad_norm_ sums 1.6M squares in float32 and is itself
# only good to about 1e-5 (one process: 2.3062959 against 2.3063136 in float64; two processes: 2.3063049).
TOLERANCE, NORM_TOLERANCE = 1e-5, 1e-4
# Raises in every rank at the 5th optimizer step, after the checkpoint of step 4: a run that dies mid-way.
CRASH_AT_STEP_FIVE = """
import sys, torch
from trainer.__main__ import main
step, calls = torch.optim.AdamW.step, []
def crashing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
        raise RuntimeError("simulated crash")
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = crashing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_step_is_dealt_out_whole_and_every_rank_runs_as_many_passes(size):
    from trainer import data
    from trainer.distributed import World, step_passes
    step = [data.Example(list(range(n)), list(range(n))) for n in (5, 50, 7, 48, 6, 30, 9)]
    passes = [step_passes(step, 64, World(rank=rank, size=size)) for rank in range(size)]
    assert len({len(p) for p in passes}) == 1  # collectives pair up across ranks
    weighted = sorted(len(e.input_ids) for p in passes for micro, weight in p if weight for e in micro)
    assert weighted == [5, 6, 7, 9, 30, 48, 50]  # every example once, in one rank's share
    shortest = min(step, key=lambda e: len(e.input_ids))
    assert all(micro == [shortest] for p in passes for micro, weight in p if not weight)  # padding
    if size == 1:
        assert passes[0] == [(micro, 1.0) for micro in data.micro_batches(step, 64)]


def test_a_rank_without_examples_still_takes_part():
    from trainer import data
    from trainer.distributed import World, step_passes
    step = [data.Example([1, 2], [1, 2])]
    assert step_passes(step, 64, World(rank=1, size=2)) == [(step, 0.0)]


@pytest.fixture
def runs(local_registry, monkeypatch):
    monkeypatch.setenv("ILF_TRAINER_MICRO_BATCH_TOKENS", str(MICRO_BATCH_TOKENS))
    monkeypatch.setenv("ILF_TRAINER_CHECKPOINT_STEPS", "2")
    # float32 whatever the CPU: these runs compare rank arithmetic to 1e-5, below bf16's rounding (auto is bf16 on
    # CPUs with AVX512_BF16, where the one- and two-process sums round differently)
    monkeypatch.setenv("ILF_DTYPE", "float32")
    store = local_registry.store
    base = local_registry.ensure_base(os.environ["ILF_BASE_MODEL"]).version
    dataset = put_dataset(store, RECORDS, name="subs")

    def write(run_id: str, **hyperparameters) -> str:
        hp = Hyperparameters(batch_size=4, epochs=2, max_seq_len=128, lora_rank=4, seed=3, **hyperparameters)
        spec = RunSpec(run_id=run_id, dataset=dataset, base_model_version=base, hyperparameters=hp,
                       output_version=f"out-{run_id}")
        store.put_json(f"runs/{run_id}/spec.json", spec.to_json())
        return run_id
    return {"registry": local_registry, "store": store, "write": write}


def torchrun(run_id: str, processes: int, *, crash: bool = False) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    trainer = ["--no-python", sys.executable, "-c", CRASH_AT_STEP_FIVE] if crash else ["-m", "trainer"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *trainer, "--store", os.environ["ILF_STORE"], "--run-id", run_id], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def trained(runs, run_id: str) -> dict:
    """The run's loss and gradient norm curves, its trained weights (the adapter, or the whole model), its metrics."""
    from safetensors.torch import load_file

    from ilf.modeling import local_files
    record = runs["registry"].get(f"out-{run_id}")
    files = local_files(runs["registry"], record.version)
    curves = json.loads(runs["store"].get(f"runs/{run_id}/metrics.json"))
    return {"losses": curves["losses"], "gradient_norms": curves["gradient_norms"], "metrics": record.metrics,
            "weights": load_file(files / ("adapter_model.safetensors" if record.kind == "lora" else "model.safetensors"))}


def differences(one: dict, two: dict) -> dict[str, float]:
    """The largest difference between two runs' losses, trained weights (absolute) and gradient norms (relative).

    The gradient norms (before clipping) catch what the others would not: AdamW and clipping are
    blind to the gradient's scale, so a step's gradient averaged instead of summed over the ranks
    would train the same weights.
    """
    assert len(one["losses"]) == len(two["losses"]) == len(two["gradient_norms"]) == STEPS
    assert one["weights"].keys() == two["weights"].keys()
    return {"losses": max(abs(a - b) for a, b in zip(one["losses"], two["losses"])),
            "gradient_norms": max(abs(a - b) / a for a, b in zip(one["gradient_norms"], two["gradient_norms"])),
            "weights": max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in one["weights"])}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_like_one(runs, method):
    learning_rate = 1e-3 if method == "full" else 2e-3  # big enough that the weights visibly move in 6 steps
    for run_id, processes in ((f"{method}-one", 1), (f"{method}-two", 2)):
        runs["write"](run_id, method=method, learning_rate=learning_rate, lora_dropout=0.0)
        finished = torchrun(run_id, processes)
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = trained(runs, f"{method}-one"), trained(runs, f"{method}-two")
    found = differences(one, two)
    for processes, run in (("one process", one), ("two processes", two)):
        print(f"{method}, {processes}: losses {run['losses']}, gradient norms {run['gradient_norms']}")
    print(f"{method}: largest differences {found}")
    assert found["losses"] <= TOLERANCE and found["weights"] <= TOLERANCE and found["gradient_norms"] <= NORM_TOLERANCE
    assert one["losses"][-1] < one["losses"][0]  # it did learn: the comparison is not between two untrained models
    assert (one["metrics"]["processes"], two["metrics"]["processes"]) == (1, 2)
    assert one["metrics"]["tokens"] == two["metrics"]["tokens"]
    # Only rank 0 wrote the run's log: each line once.
    log = runs["store"].get_json(f"runs/{method}-two/progress.json")["log"]
    assert sum("fine-tuning:" in line for line in log) == 1 and "2 processes" in " ".join(log)


def test_a_resumed_two_process_run_ends_where_an_uninterrupted_one_does(runs):
    # LoRA dropout on: the ranks' random draws must also go on from where they were.
    runs["write"]("whole", learning_rate=2e-3, lora_dropout=0.1)
    runs["write"]("resumed", learning_rate=2e-3, lora_dropout=0.1)
    assert torchrun("whole", 2).returncode == 0
    crashed = torchrun("resumed", 2, crash=True)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert "simulated crash" in runs["store"].get_json("runs/resumed/progress.json")["error"]
    assert runs["store"].exists("runs/resumed/checkpoint.pt") and not runs["store"].exists("models/out-resumed/MANIFEST.json")
    finished = torchrun("resumed", 2)
    assert finished.returncode == 0, finished.stderr[-3000:]
    whole, resumed = trained(runs, "whole"), trained(runs, "resumed")
    assert resumed["metrics"]["resumed_at_step"] == 4 and whole["metrics"]["resumed_at_step"] is None
    found = differences(whole, resumed)
    print(f"resumed vs uninterrupted, two processes: largest differences {found}")
    assert found["losses"] <= TOLERANCE and found["weights"] <= TOLERANCE and found["gradient_norms"] <= NORM_TOLERANCE
