"""The training service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class KubernetesConfig(Section):
    """Where and how training Jobs run (ILF_TRAINING_LAUNCHER=kubernetes)."""
    LABEL: ClassVar[str] = "kubernetes"
    api: str = setting("ILF_TRAINING_K8S_API")
    namespace: str = setting("ILF_TRAINING_K8S_NAMESPACE")
    image: str = setting("ILF_TRAINING_K8S_IMAGE")
    secret: str = setting("ILF_TRAINING_K8S_SECRET")
    gpus: int = setting("ILF_TRAINING_K8S_GPUS")
    nodes: int = setting("ILF_TRAINING_K8S_NODES")
    node_selector: dict = setting("ILF_TRAINING_K8S_NODE_SELECTOR")
    tolerations: list = setting("ILF_TRAINING_K8S_TOLERATIONS")
    backoff_limit: int = setting("ILF_TRAINING_K8S_BACKOFF_LIMIT")
    ttl_s: float = setting("ILF_TRAINING_K8S_TTL_S")
    cpu: str = setting("ILF_TRAINING_K8S_CPU")
    memory: str = setting("ILF_TRAINING_K8S_MEMORY")
    deadline_s: float = setting("ILF_TRAINING_DEADLINE_S")


@dataclass(frozen=True)
class TrainingConfig(Section):
    LABEL: ClassVar[str] = "training"
    port: int = setting("ILF_TRAINING_PORT")
    launcher: str = setting("ILF_TRAINING_LAUNCHER")
    max_concurrent: int = setting("ILF_TRAINING_MAX_CONCURRENT")
    poll_s: float = setting("ILF_TRAINING_POLL_S")
    log_dir: Path = setting("ILF_TRAINING_LOG_DIR")
    deadline_s: float = setting("ILF_TRAINING_DEADLINE_S")
    kubernetes: KubernetesConfig = nested(KubernetesConfig)
    server: ServerConfig = nested(ServerConfig)
