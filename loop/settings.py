"""The settings of one ILF round (and of the comparison and the retraining policy, which run rounds)."""
from __future__ import annotations

from dataclasses import dataclass

from ilf import data

# refinements: pi_Refine's passing refinements (ILF); refinements+human: the same, plus the passing
# human refinement attached to the feedback for tasks pi_Refine could not fix; human: the paper's human
# refinements; gold: MBPP's programs.
TRAIN_SOURCES = ("refinements", "refinements+human", "human", "gold")


@dataclass
class RoundSettings:
    eval_tasks: int = 20             # first N tasks of the evaluation split; 0 means all (MBPP_Test: 100)
    eval_split: str = "test"         # "test": MBPP_Test (11-110); "dev": for choosing settings (data.EVALUATION_SPLITS)
    eval_samples: int = 1            # samples per task; the paper uses 30
    eval_temperature: float = 0.0    # the paper uses 0.8 with 30 samples
    train_tasks: int = 24            # annotated MBPP_Train tasks to refine; 0 means all 128
    refine_samples: int = 2
    refine_temperature: float = 0.8
    max_new_tokens: int = 128
    train_on: str = "refinements"    # one of TRAIN_SOURCES
    method: str = "lora"
    learning_rate: float = 0.0       # 0: the training service's default for the method
    epochs: int = 0
    batch_size: int = 0
    seed: int = 1234
    timeout_s: float = 3.0           # per program, as in the paper
    switch: bool = True
    train_refiner: bool = True       # fine-tune pi_Refine on MBPP_Refine before refining (paper)
    concurrency: int = 8             # requests in flight to a service, so it can batch them
    promote_margin: float | None = None  # if set: switch only when pass@1 drops by at most this much

    def __post_init__(self):
        if self.train_on not in TRAIN_SOURCES:
            raise ValueError(f"train_on must be one of {TRAIN_SOURCES}")
        if self.eval_split not in data.EVALUATION_SPLITS:
            raise ValueError(f"eval_split must be one of {tuple(data.EVALUATION_SPLITS)}")

    @property
    def ks(self) -> list[int]:
        return [k for k in (1, 5, 10) if k <= self.eval_samples] or [1]
