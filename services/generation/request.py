"""What a generation request asks for, its validation, and the handle its results stream through.

Both backends (in-process transformers and remote TGI) and both protocols (gRPC and TGI HTTP)
share these types, so a request is validated once and results look the same whichever path made them.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ilf import config
from ilf.errors import IlfError, InvalidArgument
from ilf.modeling import Sample


class GenerationCancelled(IlfError):
    code_name = "CANCELLED"


@dataclass(frozen=True)
class Settings:
    """Sampling settings of one request, after defaults (0 means 'off' in the proto) are applied."""
    n: int = 1
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: disabled
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    seed: int | None = None           # sample i uses seed + i, so n=1 requests can reproduce any sample

    def sample_seed(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index


def max_n() -> int:
    return int(config.get("ILF_GENERATION_MAX_N"))


def max_new_tokens_limit() -> int:
    return int(config.get("ILF_GENERATION_MAX_NEW_TOKENS"))


def validate(prompt: str, settings: Settings) -> Settings:
    """Raises InvalidArgument naming the first bad field; returns settings unchanged."""
    if not prompt:
        raise InvalidArgument("prompt is empty")
    if not 1 <= settings.n <= max_n():
        raise InvalidArgument(f"n must be between 1 and {max_n()}, got {settings.n}")
    if not 1 <= settings.max_new_tokens <= max_new_tokens_limit():
        raise InvalidArgument(f"max_new_tokens must be between 1 and {max_new_tokens_limit()}, "
                              f"got {settings.max_new_tokens}")
    if not (math.isfinite(settings.temperature) and 0 <= settings.temperature <= 100):
        raise InvalidArgument(f"temperature must be between 0 (greedy) and 100, got {settings.temperature}")
    if not (math.isfinite(settings.top_p) and 0 < settings.top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1] (0 in the proto means 1), got {settings.top_p}")
    if settings.top_k < 0:
        raise InvalidArgument(f"top_k must be 0 (disabled) or positive, got {settings.top_k}")
    if not (math.isfinite(settings.repetition_penalty) and settings.repetition_penalty > 0):
        raise InvalidArgument(f"repetition_penalty must be positive, got {settings.repetition_penalty}")
    if any(not s for s in settings.stop):
        raise InvalidArgument("stop sequences must not be empty strings")
    if settings.seed is not None and not 0 <= settings.seed < 2 ** 63 - max_n():
        raise InvalidArgument(f"seed must be between 0 and 2**63 - {max_n()}, got {settings.seed}")
    return settings


@dataclass
class TokenEvent:
    """One generated token of sample `index`; `completion` is set on the sample's last token."""
    index: int
    token_id: int
    text: str
    logprob: float
    special: bool = False
    completion: Sample | None = None


@dataclass
class GenerationHandle:
    """The consumer's end of a running request: events arrive in order, cancel() stops the work."""
    n: int
    model_version: str
    seeds: list[int | None] = field(default_factory=list)
    _events: "queue.SimpleQueue[TokenEvent | BaseException]" = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _finished: int = 0
    _waker: Callable[[], None] | None = None

    # producer side
    def push(self, item: TokenEvent | BaseException) -> None:
        self._events.put(item)
        if self._waker:
            self._waker()

    def cancel(self) -> None:
        self._cancelled.set()
        self.push(GenerationCancelled("the request was cancelled"))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # consumer side
    @property
    def done(self) -> bool:
        return self._finished >= self.n

    def set_waker(self, waker: Callable[[], None]) -> None:
        """Called after every push, from the producing thread (asyncio consumers use call_soon_threadsafe)."""
        self._waker = waker

    def poll(self, timeout: float | None = 0) -> TokenEvent | None:
        """The next event; None when none arrives within timeout. Raises the request's error."""
        try:
            item = self._events.get(timeout=timeout) if timeout != 0 else self._events.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        if item.completion is not None:
            self._finished += 1
        return item

    def __iter__(self) -> Iterator[TokenEvent]:
        while not self.done:
            yield self.poll(timeout=None)

    def result(self) -> list[Sample]:
        """Waits for every sample; completions in sample order."""
        completions: dict[int, Sample] = {}
        for event in self:
            if event.completion is not None:
                completions[event.index] = event.completion
        return [completions[i] for i in range(self.n)]
