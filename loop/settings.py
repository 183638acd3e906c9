"""The settings of one ILF round (and of the comparison and the retraining policy, which run rounds)."""
from __future__ import annotations

from dataclasses import dataclass

from ilf import tasksets

# refinements: pi_Refine's passing refinements (ILF); refinements+human: the same, plus the passing
# human refinement attached to the feedback for tasks pi_Refine could not fix; human: the paper's human
# refinements; gold: MBPP's programs.
TRAIN_SOURCES = ("refinements", "refinements+human", "human", "gold")
# Which human feedback a round refines (per task of the task set's train split): newest: the newest record on a
# program written by the serving model or one of its ancestors; all: every such record; paper: the paper's
# annotations of CodeGen's programs (MBPP only).
FEEDBACK_POLICIES = ("newest", "all", "paper")
# Whose feedback counts: human only, or model-written feedback too (for systems without annotators).
FEEDBACK_AUTHORS = ("human", "any")
EVALUATION_SPLITS = ("test", "dev")
# pi_Refine's fine-tuning on the 44 MBPP_Refine triples, chosen by `ilf refiner-sweep` on 64 annotated MBPP_Train
# tasks x 10 refinements (README, "Training pi_Refine"): share of tasks with a passing refinement 0.109 [0.05, 0.19]
# with these 12 steps, 0.125 [0.05, 0.22] with 36 (lr 1e-3, 6 epochs; within the interval, 3x the time) and
# 0.031 [0.00, 0.08] with the former 4 steps at lr 2e-4 (batch 32).
REFINER_DEFAULTS = {"learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "lora_rank": 16}


@dataclass
class RoundSettings:
    task_set: str = tasksets.MBPP    # "mbpp" or an imported task set (ts-...)
    eval_tasks: int = 20             # first N tasks of the evaluation split; 0 means all (MBPP_Test: 100)
    eval_split: str = "test"         # "test": MBPP_Test (11-110); "dev": for choosing settings without it
    eval_samples: int = 1            # samples per task; the paper uses 30
    eval_temperature: float = 0.0    # the paper uses 0.8 with 30 samples
    train_tasks: int = 24            # train-split tasks to collect on and refine; 0 means all (MBPP: 128)
    feedback: str = "newest"         # one of FEEDBACK_POLICIES
    feedback_authors: str = "human"  # one of FEEDBACK_AUTHORS
    collect_samples: int = 4         # `ilf collect`: samples per train task
    collect_temperature: float = 0.8
    refine_samples: int = 2
    refine_temperature: float = 0.8
    max_new_tokens: int = 128
    train_on: str = "refinements"    # one of TRAIN_SOURCES
    method: str = "lora"
    learning_rate: float = 0.0       # 0: the training service's default for the method
    epochs: int = 0
    batch_size: int = 0
    lora_rank: int = 0               # 0: the training service's default (16)
    # pi_Refine's own fine-tuning, chosen by `ilf refiner-sweep` on MBPP_Train (README, "Training pi_Refine")
    refiner_method: str = "lora"
    refiner_learning_rate: float = REFINER_DEFAULTS["learning_rate"]
    refiner_epochs: int = REFINER_DEFAULTS["epochs"]
    refiner_batch_size: int = REFINER_DEFAULTS["batch_size"]
    refiner_lora_rank: int = REFINER_DEFAULTS["lora_rank"]
    seed: int = 1234
    timeout_s: float = 3.0           # per program, as in the paper
    switch: bool = True
    train_refiner: bool = True       # fine-tune pi_Refine on MBPP_Refine before refining (paper)
    stack_refiner: bool = False      # train pi_Refine from its current version instead of from its base model
    concurrency: int = 8             # requests in flight to a service, so it can batch them
    promote_margin: float = 0.0      # switch only when pass@1 drops by at most this much (ILF_PROMOTE_MARGIN)

    def __post_init__(self):
        if self.train_on not in TRAIN_SOURCES:
            raise ValueError(f"train_on must be one of {TRAIN_SOURCES}")
        if self.eval_split not in EVALUATION_SPLITS:
            raise ValueError(f"eval_split must be one of {EVALUATION_SPLITS}")
        if self.feedback not in FEEDBACK_POLICIES:
            raise ValueError(f"feedback must be one of {FEEDBACK_POLICIES}")
        if self.feedback_authors not in FEEDBACK_AUTHORS:
            raise ValueError(f"feedback_authors must be one of {FEEDBACK_AUTHORS}")

    def hyperparameters(self, purpose: str = "generation") -> dict:
        """The training run's hyperparameters: pi_Refine (purpose "refinement") has its own."""
        if purpose == "refinement":
            return {"method": self.refiner_method, "learning_rate": self.refiner_learning_rate,
                    "epochs": self.refiner_epochs, "batch_size": self.refiner_batch_size,
                    "lora_rank": self.refiner_lora_rank, "seed": self.seed}
        return {"method": self.method, "learning_rate": self.learning_rate, "epochs": self.epochs,
                "batch_size": self.batch_size, "lora_rank": self.lora_rank, "seed": self.seed}

    @property
    def ks(self) -> list[int]:
        return [k for k in (1, 5, 10) if k <= self.eval_samples] or [1]
