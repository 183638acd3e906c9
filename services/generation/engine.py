"""Continuous batching: one decode loop that serves every running request of every loaded model.

A scheduler thread keeps one batch of rows (samples) per model version. Each step it samples the
next token of every row (sampler.py), streams its text (detokenize.py), drops rows that finished
or whose request was cancelled, and runs one forward pass for the rest (batch.py). Waiting
requests join between steps: their prompt is prefilled once and merged into the running batch.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ilf.errors import InvalidArgument, ResourceExhausted, Unavailable
from ilf.metrics import track
from ilf.modeling import LoadedModel, Sample, dtype_name
from ilf.sampling import Sampling

from . import metrics
from .allocator import Trimmer
from .batch import Batch, Row
from .request import GenerationHandle, TokenEvent
from .sampler import choose_tokens

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    handle: GenerationHandle
    loaded: LoadedModel
    input_ids: torch.Tensor
    settings: Sampling


class Engine:
    """Runs requests on loaded models with continuous batching; submit() is thread-safe."""

    def __init__(self, *, max_rows: int = 64, max_queue: int = 64, trimmer: Trimmer | None = None):
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.trimmer = trimmer or Trimmer()
        self._pending: deque[_Pending] = deque()
        self._batches: dict[int, Batch] = {}     # id(LoadedModel) -> its batch
        self._wakeup = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.scheduler_restarts = 0
        track(self, metrics.ENGINE)
        self._thread = self._start_scheduler()
        threading.Thread(target=self._watch_scheduler, name="generation-watchdog", daemon=True).start()

    def _start_scheduler(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        thread.start()
        return thread

    # public
    def submit(self, loaded: LoadedModel, prompt: str, settings: Sampling) -> GenerationHandle:
        """Queues a request whose settings passed request.validate (the backend checks them)."""
        if settings.n > self.max_rows:
            raise InvalidArgument(f"n must be at most {self.max_rows} (ILF_GENERATION_MAX_BATCH_ROWS), got {settings.n}")
        input_ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.device)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit and input_ids.shape[1] + settings.max_new_tokens > limit:
            raise InvalidArgument(f"prompt ({input_ids.shape[1]} tokens) plus max_new_tokens "
                                  f"({settings.max_new_tokens}) exceeds the model's {limit} positions")
        seeds = [settings.sample_seed(i) if settings.seed is not None else secrets.randbits(62)
                 for i in range(settings.n)]
        handle = GenerationHandle(n=settings.n, model_version=loaded.version, seeds=seeds,
                                  dtype=dtype_name(loaded.dtype))
        with self._wakeup:
            if self._stopped:
                raise Unavailable("the generation engine is shutting down")
            if not self._thread.is_alive():
                self._restart_scheduler()
            if len(self._pending) >= self.max_queue:
                raise ResourceExhausted(f"generation queue is full ({self.max_queue} waiting requests); retry later")
            self._pending.append(_Pending(handle, loaded, input_ids, settings))
            self._wakeup.notify()
        return handle

    @property
    def active_rows(self) -> int:
        return sum(len(b.rows) for b in list(self._batches.values()))

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(b.cache.prompt_nbytes + b.cache.generated_nbytes for b in list(self._batches.values()))

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # scheduler
    def _restart_scheduler(self) -> None:
        """Replaces a scheduler thread that died: its running samples fail, waiting requests are kept."""
        log.error("the generation scheduler thread had died; starting a new one")
        self.scheduler_restarts += 1   # counted before the failed requests return, so their callers see it
        self._fail_running(Unavailable("the generation scheduler died during this request; retry"))
        self._thread = self._start_scheduler()

    def _watch_scheduler(self, interval_s: float = 0.5) -> None:
        """Restarts the scheduler if it dies while nobody submits, so waiting requests are not stranded."""
        while not self._stopped:
            time.sleep(interval_s)  # not a wait on the condition: that would swallow the scheduler's wake-ups
            with self._wakeup:
                if not self._stopped and not self._thread.is_alive():
                    self._restart_scheduler()

    def _fail_running(self, failure: Exception) -> None:
        for batch in self._batches.values():
            batch.fail(failure)
        self._batches.clear()

    def _run(self) -> None:
        worked = False   # since the engine last fell idle
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not worked and not self._stopped and not self._pending and not self._batches:
                        self._wakeup.wait()
                    if self._stopped:
                        break
                    idle = not self._pending and not self._batches
                if worked and idle:
                    # fell idle: hand the freed pages back (allocator.py), outside the lock so submit() never waits
                    self.trimmer.maybe_trim(force=True)
                    worked = False
                    continue
                worked = True
                try:
                    self._schedule_once()
                    self.trimmer.maybe_trim()
                except Exception as error:  # noqa: BLE001 - a scheduler bug fails what runs, not the service
                    log.exception("generation scheduler failed")
                    self._fail_running(Unavailable(f"the generation scheduler failed ({type(error).__name__}: "
                                                   f"{error}); retry"))
        self._fail_running(Unavailable("the generation engine stopped"))
        for pending in self._pending:
            pending.handle.push(Unavailable("the generation engine stopped"))

    def _schedule_once(self) -> None:
        """Admits waiting requests, then decodes one token for every running batch."""
        self._admit()
        for key, batch in list(self._batches.items()):
            try:
                self._step(batch)
            except Exception as error:  # noqa: BLE001 - fail this batch's requests, keep serving
                log.exception("decode step failed on %s", batch.loaded.version)
                # UNAVAILABLE: the request was fine and a retry runs in a fresh batch.
                batch.fail(Unavailable(f"the decode step failed ({type(error).__name__}: {error}); retry"))
            if not batch.rows:
                del self._batches[key]
        self.steps += 1

    def _admit(self) -> None:
        """Moves waiting requests into batches, first come first served, while rows are free."""
        while True:
            with self._wakeup:
                if not self._pending:
                    return
                pending = self._pending[0]
                busy = self.active_rows
                if pending.handle.cancelled:
                    self._pending.popleft()
                    continue
                if busy and busy + pending.settings.n > self.max_rows:
                    return
                self._pending.popleft()
            try:
                joining = Batch.prefill(pending.loaded, pending.input_ids, pending.handle, pending.settings)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the loop
                log.exception("prefill failed")
                pending.handle.push(error)
                continue
            metrics.PREFILL_TOKENS.inc(pending.input_ids.shape[1])
            key = id(pending.loaded)
            if key in self._batches:
                self._batches[key].merge(joining)
            else:
                self._batches[key] = joining

    def _step(self, batch: Batch) -> None:
        keep = [i for i, row in enumerate(batch.rows) if not row.handle.cancelled]
        if len(keep) < len(batch.rows):
            batch.select(keep)
            if not batch.rows:
                return
        tokens, logprobs = choose_tokens(batch.logits, batch.rows)
        metrics.DECODE_TOKENS.inc(len(batch.rows))
        keep = [i for i, row in enumerate(batch.rows)
                if not _emit(batch, row, int(tokens[i]), float(logprobs[i]))]
        if len(keep) < len(batch.rows):
            batch.select(keep)
            if not batch.rows:
                return
            tokens = tokens[keep]
        batch.step(tokens)


def _emit(batch: Batch, row: Row, token: int, logprob: float) -> bool:
    """Records a sampled token and streams it; returns True when the row has finished."""
    decoder = row.decoder
    if token in batch.eos_ids:
        text, special, reason = "", True, "eos"
    else:
        text, special = decoder.push(token), False
        reason = "stop" if decoder.stopped else "length" if len(decoder.token_ids) >= row.settings.max_new_tokens \
            else None
    completion = None
    if reason:
        completion = Sample(text=decoder.final_text(), finish_reason=reason,
                            generated_tokens=len(decoder.token_ids) + (reason == "eos"),
                            prompt_tokens=len(row.prompt_ids))
    row.handle.push(TokenEvent(row.index, token, text, logprob, special, completion))
    return reason is not None
