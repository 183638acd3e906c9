"""The generation service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class GenerationConfig(Section):
    LABEL: ClassVar[str] = "generation"
    port: int = setting("ILF_GENERATION_PORT")
    http_port: int | None = setting("ILF_GENERATION_HTTP_PORT")
    backend: str = setting("ILF_GENERATION_BACKEND")
    tgi_url: str = setting("ILF_GENERATION_TGI_URL")
    openai_url: str = setting("ILF_GENERATION_OPENAI_URL")
    openai_token: str = setting("ILF_GENERATION_OPENAI_TOKEN")
    openai_adapter_dir: Path = setting("ILF_GENERATION_OPENAI_ADAPTER_DIR")
    start_model: str = setting("ILF_GENERATION_MODEL")
    base_model: str = setting("ILF_BASE_MODEL")
    max_queue: int = setting("ILF_GENERATION_MAX_QUEUE")
    max_batch_rows: int = setting("ILF_GENERATION_MAX_BATCH_ROWS")
    max_n: int = setting("ILF_GENERATION_MAX_N")
    max_new_tokens: int = setting("ILF_GENERATION_MAX_NEW_TOKENS")
    max_loaded: int = setting("ILF_GENERATION_MAX_LOADED")
    serving_poll_s: float = setting("ILF_SERVING_POLL_S")
    server: ServerConfig = nested(ServerConfig)
