"""The training service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class TrainingConfig(Section):
    LABEL: ClassVar[str] = "training"
    port: int = setting("ILF_TRAINING_PORT")
    launcher: str = setting("ILF_TRAINING_LAUNCHER")
    max_concurrent: int = setting("ILF_TRAINING_MAX_CONCURRENT")
    poll_s: float = setting("ILF_TRAINING_POLL_S")
    server: ServerConfig = nested(ServerConfig)
