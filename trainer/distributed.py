"""Several trainer processes under torchrun: one rank per device, each step's examples split by rank.

torchrun starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE; a trainer started without
them is a world of one and trains exactly as a single process always did. With more than one:
LoRA replicates the model with DistributedDataParallel (only the adapter's gradients are
all-reduced); full fine-tuning shards weights, gradients and AdamW state with FSDP (fully_shard on
each decoder layer), so a model whose training state (about 4x its weights) does not fit one device
still trains, as long as its weights fit one device while they load. Only rank 0 writes to the store.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer import data


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0  # the device of this rank on its node
    size: int = 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes progress, checkpoints and the model (rank 0 only)."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """values added up over every rank."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64)  # a CPU tensor: gloo carries it, also next to NCCL
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, value) -> list:
        """Every rank's value (a picklable object), in rank order."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def from_writer(self, value):
        """Rank 0's value (a picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join() -> World:
    """This process's place among the trainer processes, after joining their process group if there are several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]), size=size)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)  # "cuda" now means this rank's own GPU
    # One backend per device kind: NCCL for CUDA tensors when there is a GPU, gloo for CPU ones.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return world


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def step_passes(step: list[data.Example], token_budget: int, world: World) -> list[tuple[list[data.Example], float]]:
    """This rank's forward/backward passes over an optimizer step's examples, with each pass's loss weight.

    The step's examples are sorted by length and dealt out in turn, so every rank gets a similar
    share of tokens. Collectives pair up across ranks (DDP's gradient all-reduce, FSDP's weight
    all-gathers), so every rank runs as many passes as the busiest one: a rank with fewer pads
    with weight-0 passes over the step's shortest example. A world of one runs data.micro_batches.
    """
    ordered = sorted(step, key=lambda e: len(e.input_ids))
    per_rank = [data.micro_batches(ordered[rank::world.size], token_budget) for rank in range(world.size)]
    mine = per_rank[world.rank]
    padding = max(len(passes) for passes in per_rank) - len(mine)
    return [(micro, 1.0) for micro in mine] + [(ordered[:1], 0.0)] * padding


class ParallelLoss:
    """The loss module, replicated (DDP) or sharded (FSDP) over the world; itself in a world of one.

    DDP and FSDP only synchronise what runs through the wrapped module's forward, and the
    completion loss calls the decoder and the output layer separately: so the wrapper wraps a
    module whose forward is the whole loss.
    """

    def __init__(self, loss: torch.nn.Module, world: World, *, shard: bool, device: str):
        self.world, self.sharded = world, shard and world.size > 1
        if world.size == 1:
            self.module = loss
        elif self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(device.split(":")[0], (world.size,))
            for layer in loss.model.get_decoder().layers:
                fully_shard(layer, mesh=mesh)
            self.module = fully_shard(loss, mesh=mesh)  # the rest: embeddings, final norm, output layer
        else:
            from torch.nn.parallel import DistributedDataParallel
            # Buffers are the rotary tables, equal everywhere: broadcasting them would add a collective per pass.
            self.module = DistributedDataParallel(loss, device_ids=[world.local_rank] if device.startswith("cuda")
                                                  else None, broadcast_buffers=False)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**batch)

    @contextlib.contextmanager
    def accumulating(self, sync: bool):
        """A forward/backward pass that synchronises gradients only when sync (the step's last pass)."""
        if self.world.size == 1 or sync:
            yield
        elif self.sharded:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            with self.module.no_sync():
                yield
