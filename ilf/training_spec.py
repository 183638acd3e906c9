"""What a training run trains: the spec the training service writes and the trainer reads back.

The service builds a RunSpec when a run is submitted and stores it as runs/<id>/spec.json; the
trainer (a separate process, maybe a Kubernetes pod) rebuilds it from that file. Both are frozen
dataclasses that check themselves when built (as PEFT's tuner configs do), so a bad value fails
at submit time with the field named, and the trainer never reads an unchecked one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from ilf.errors import InvalidArgument

METHODS = ("lora", "full")
PURPOSES = ("generation", "refinement")

# The authors' fine-tuning defaults (PAPER.md), except the learning rate of LoRA: its update
# starts at zero and is scaled by alpha/rank, so at the paper's full fine-tuning lr of 5e-6 an
# adapter barely moves in two epochs of a few dozen steps; 2e-4 is the usual LoRA rate.
DEFAULT_LEARNING_RATE = {"lora": 2e-4, "full": 5e-6}
LIMITS = {"learning_rate": (1e-9, 1.0), "batch_size": (1, 4096), "epochs": (1, 100), "max_seq_len": (8, 32768),
          "lora_rank": (1, 1024), "lora_alpha": (1e-3, 1e5)}


@dataclass(frozen=True)
class Hyperparameters:
    """How to fine-tune; every field is checked when the object is built."""

    method: str = "lora"            # lora: a PEFT adapter on every linear layer; full: every weight
    learning_rate: float | None = None  # AdamW peak rate, decayed linearly to zero; None: DEFAULT_LEARNING_RATE
    batch_size: int = 32            # examples per optimizer step (the global batch, however many processes)
    epochs: int = 2
    max_seq_len: int = 1024         # prompt + completion tokens kept; records with no completion left are dropped
    lora_rank: int = 16
    lora_alpha: float = 32.0        # the adapter's update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    seed: int = 0                   # LoRA initialisation and the order of examples in each epoch
    merge_weights: bool = False     # lora: also publish the merged weights under merged/ in the version

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidArgument(f"method must be lora or full, got {self.method!r}")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATE[self.method])
        for name in ("batch_size", "epochs", "max_seq_len", "lora_rank", "seed"):
            _check_type(name, getattr(self, name), int)
        for name in ("learning_rate", "lora_alpha", "lora_dropout"):
            _check_type(name, getattr(self, name), float)
            object.__setattr__(self, name, float(getattr(self, name)))
        _check_type("merge_weights", self.merge_weights, bool)
        for name, (low, high) in LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise InvalidArgument(f"{name} must be between {low:g} and {high:g}, got {getattr(self, name):g}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidArgument(f"lora_dropout must be in [0, 1), got {self.lora_dropout:g}")
        if self.seed < 0:
            raise InvalidArgument(f"seed must not be negative, got {self.seed}")
        if self.merge_weights and self.method != "lora":
            raise InvalidArgument("merge_weights applies to lora runs only (full runs are complete weights)")

    @classmethod
    def from_json(cls, fields: Mapping) -> Hyperparameters:
        return cls(**_known_fields(cls, fields, "hyperparameters"))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


HYPERPARAMETER_FIELDS = tuple(f.name for f in dataclasses.fields(Hyperparameters))


def with_defaults(requested: Mapping) -> Hyperparameters:
    """The hyperparameters of a request, where an unset (zero) field takes its default, as in proto3."""
    return Hyperparameters(**_known_fields(Hyperparameters, {k: v for k, v in requested.items() if v},
                                           "hyperparameters"))


@dataclass(frozen=True)
class RunSpec:
    """What one training run trains, fixed at submit time: a retried trainer redoes exactly this."""

    run_id: str
    dataset: str                    # artifact key of a JSONL of {prompt, completion} records
    base_model_version: str         # the registered version the run starts from
    hyperparameters: Hyperparameters
    output_version: str             # the version the trainer registers, chosen up front so a retry reuses it
    purpose: str = "generation"     # which serving channel the model is meant for; recorded in its lineage
    created_at: float | None = None  # seconds since the epoch, when the service accepted the run

    def __post_init__(self):
        if not self.dataset:
            raise InvalidArgument("dataset (an artifact key) is required")
        if not self.base_model_version:
            raise InvalidArgument("base_model_version is required")
        if self.purpose not in PURPOSES:
            raise InvalidArgument(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")
        for name in ("run_id", "output_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidArgument(f"{name} must be a non-empty string")
        if not isinstance(self.hyperparameters, Hyperparameters):
            raise InvalidArgument("hyperparameters must be a Hyperparameters object")

    @classmethod
    def from_json(cls, fields: Mapping) -> RunSpec:
        known = _known_fields(cls, fields, "run spec")
        return cls(**{**known, "hyperparameters": Hyperparameters.from_json(known.get("hyperparameters", {}))})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hyperparameters": self.hyperparameters.to_json()}


def _known_fields(cls, fields: Mapping, what: str) -> dict:
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InvalidArgument(f"unknown {what} field(s): {', '.join(sorted(unknown))}")
    return dict(fields)


def _check_type(name: str, value, kind: type) -> None:
    # bool is an int to Python, but a batch size of True is a caller's mistake; an int is a fine float.
    allowed = (int, float) if kind is float else kind
    if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
        raise InvalidArgument(f"{name} must be {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}
