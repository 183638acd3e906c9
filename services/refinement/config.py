"""The refinement service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class RefinementConfig(Section):
    LABEL: ClassVar[str] = "refinement"
    port: int = setting("ILF_REFINEMENT_PORT")
    generation_addr: str = setting("ILF_REFINEMENT_GENERATION_ADDR")
    start_model: str = setting("ILF_REFINEMENT_MODEL")
    base_model: str = setting("ILF_BASE_MODEL")
    prompt_strip: bool = setting("ILF_PROMPT_STRIP")
    max_samples: int = setting("ILF_REFINEMENT_MAX_N")
    max_new_tokens: int = setting("ILF_REFINEMENT_MAX_NEW_TOKENS")
    max_feedback_chars: int = setting("ILF_MAX_FEEDBACK_CHARS")
    max_program_chars: int = setting("ILF_MAX_PROGRAM_CHARS")
    serving_poll_s: float = setting("ILF_SERVING_POLL_S")
    server: ServerConfig = nested(ServerConfig)
