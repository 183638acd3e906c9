"""A generation request's validation, and the handle its results stream through.

Every backend (in-process transformers, remote TGI, remote OpenAI) and every protocol (gRPC, TGI HTTP,
OpenAI HTTP) shares these, and ilf.sampling's defaults for unset fields, so a request is validated once and
results look the same whichever path made them.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ilf.errors import IlfError, InvalidField
from ilf.modeling import Sample
from ilf.sampling import Sampling

from . import metrics
from .config import GenerationConfig


class GenerationCancelled(IlfError):
    code_name = "CANCELLED"


MAX_STOP_SEQUENCES = 128   # the evaluation's own list has 56


def validate(prompt: str, sampling: Sampling, limits: GenerationConfig) -> Sampling:
    """Raises InvalidField naming the first bad field; returns sampling unchanged."""
    if not prompt:
        raise InvalidField("prompt", "is empty")
    return validate_sampling(sampling, limits)


def validate_sampling(sampling: Sampling, limits: GenerationConfig) -> Sampling:
    """Unset fields already took their defaults (ilf.sampling), so everything checked here was asked for."""
    max_n = limits.max_n
    if not 1 <= sampling.n <= max_n:
        raise InvalidField("n", f"must be between 1 and {max_n} (ILF_GENERATION_MAX_N), got {sampling.n}")
    if not 1 <= sampling.max_new_tokens <= limits.max_new_tokens:
        raise InvalidField("max_new_tokens", f"must be between 1 and {limits.max_new_tokens} "
                           f"(ILF_GENERATION_MAX_NEW_TOKENS), got {sampling.max_new_tokens}")
    if not (math.isfinite(sampling.temperature) and 0 <= sampling.temperature <= 100):
        raise InvalidField("temperature", f"must be between 0 (greedy) and 100, got {sampling.temperature}")
    if sampling.n > 1 and sampling.temperature == 0:
        # Greedy decoding has one answer: n of them would be n identical completions.
        raise InvalidField("n", f"must be 1 at temperature 0 (greedy decoding gives {sampling.n} identical "
                           "completions); set a temperature above 0 to sample n different ones")
    if not (math.isfinite(sampling.top_p) and 0 < sampling.top_p <= 1):
        raise InvalidField("top_p", f"must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidField("top_k", f"must be 0 (disabled) or positive, got {sampling.top_k}")
    if not (math.isfinite(sampling.repetition_penalty) and sampling.repetition_penalty > 0):
        raise InvalidField("repetition_penalty", f"must be positive, got {sampling.repetition_penalty}")
    if any(not s for s in sampling.stop):
        raise InvalidField("stop", "sequences must not be empty strings")
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise InvalidField("stop", f"may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(sampling.stop)}")
    if sampling.seed is not None and not 0 <= sampling.seed < 2 ** 63 - max_n:
        raise InvalidField("seed", f"must be between 0 and 2**63 - {max_n}, got {sampling.seed}")
    return sampling


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
    dtype: str = ""                   # of the answering model's weights ("" when the backend cannot tell)
    _events: "queue.SimpleQueue[TokenEvent | BaseException]" = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _finished: int = 0
    _waker: Callable[[], None] | None = None
    _started: float = field(default_factory=time.monotonic)
    _first_token: bool = False

    # producer side
    def push(self, item: TokenEvent | BaseException) -> None:
        if not self._first_token and isinstance(item, TokenEvent):
            self._first_token = True
            metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - self._started)
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
