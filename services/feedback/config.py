"""The feedback service's settings, parsed once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig


@dataclass(frozen=True)
class FeedbackConfig(Section):
    LABEL: ClassVar[str] = "feedback"
    port: int = setting("ILF_FEEDBACK_PORT")
    http_port: int | None = setting("ILF_FEEDBACK_HTTP_PORT")     # the annotation page; None: off
    lease_s: float = setting("ILF_FEEDBACK_LEASE_S")
    execution_addr: str = setting("ILF_EXECUTION_ADDR")
    generation_addr: str = setting("ILF_GENERATION_ADDR")
    max_feedback_chars: int = setting("ILF_MAX_FEEDBACK_CHARS")
    max_program_chars: int = setting("ILF_MAX_PROGRAM_CHARS")
    accept_test_split: bool = setting("ILF_FEEDBACK_ACCEPT_TEST_SPLIT")
    server: ServerConfig = nested(ServerConfig)
