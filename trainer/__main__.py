"""Entry point of the fine-tuning job.

Exit codes: 0 the model is registered; 1 the job failed (the error is in progress.json and the
log); 137 out of memory, the code a container gets when the OOM killer ends it, so launchers read
both cases the same way. Under torchrun every process runs this; only rank 0 writes to the store,
the others' errors are in the log.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from ilf import config
from ilf.store import open_store
from trainer import distributed
from trainer.train import Progress, train

OUT_OF_MEMORY_EXIT = 137


def _is_out_of_memory(error: BaseException) -> bool:
    import torch
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="artifact store URL (default ILF_STORE)")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    store = open_store(args.store)
    world = distributed.join()  # a world of one unless started by torchrun with several processes
    try:
        train(store, args.run_id, world=world, checkpoint_every=int(config.get("ILF_TRAINER_CHECKPOINT_STEPS")),
              micro_batch_tokens=int(config.get("ILF_TRAINER_MICRO_BATCH_TOKENS")),
              gradient_checkpointing=config.get("ILF_TRAINER_GRADIENT_CHECKPOINTING"))
    except BaseException as error:  # noqa: BLE001 - every failure is reported before the exit
        out_of_memory = _is_out_of_memory(error)
        traceback.print_exc()
        reason = f"{'out of memory: ' if out_of_memory else ''}{type(error).__name__}: {error}"
        Progress(store, args.run_id, writes=world.is_writer).update(phase="failed", error=reason[:2000], force=True)
        return OUT_OF_MEMORY_EXIT if out_of_memory else 1
    finally:
        distributed.leave(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
