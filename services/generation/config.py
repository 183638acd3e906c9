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
    server: ServerConfig = nested(ServerConfig)
