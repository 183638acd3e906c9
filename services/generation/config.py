"""The generation service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class GenerationConfig(Section):
    LABEL: ClassVar[str] = "generation"
    port: int = setting("ILF_GENERATION_PORT")
    http_port: int | None = setting("ILF_GENERATION_HTTP_PORT")
    server: ServerConfig = nested(ServerConfig)
