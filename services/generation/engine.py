"""Continuous batching: one decode loop that serves every running request of every loaded model.

A scheduler thread keeps one batch of rows (samples) per model version. Each step it samples the
next token of every row, drops rows that finished or whose request was cancelled, and runs one
forward pass for the rest. Waiting requests join between steps: their prompt is prefilled once
(shared by its n samples) and its KV cache is left-padded into the running batch.

Sampling is Gumbel-max with one torch.Generator per row, so a sample depends only on its own
seed and logits, not on which other requests shared its batch.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ilf.errors import InvalidArgument, ResourceExhausted, Unavailable
from ilf.modeling import LoadedModel, Sample, eos_token_ids

from .request import GenerationHandle, Settings, TokenEvent, cut_at_stop, validate

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One sample being generated."""
    handle: GenerationHandle
    index: int
    settings: Settings
    generator: torch.Generator
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""                    # text emitted so far (for stop sequences)
    prefix_offset: int = 0            # incremental detokenisation window, as TGI does it
    read_offset: int = 0


@dataclass
class _Pending:
    handle: GenerationHandle
    loaded: LoadedModel
    input_ids: torch.Tensor
    settings: Settings


@dataclass
class _Batch:
    """Rows decoding on one model: their KV cache, attention mask and next-token logits."""
    loaded: LoadedModel
    eos_ids: frozenset[int]
    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor        # [rows, cache length]; 0 marks left padding
    positions: torch.Tensor   # [rows] position id of each row's next token
    logits: torch.Tensor      # [rows, vocab] logits for each row's next token


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, padding)


class _GrowingLayer(DynamicLayer):
    """A cache layer that appends new tokens into spare capacity.

    DynamicLayer concatenates on every token, copying the whole cache into a fresh allocation each
    decode step; with refinement prompts (about 1,000 tokens, 16 rows) that copying was a fifth of
    the step. The engine may still replace keys/values (padding, row selection, merging): the
    layer notices that they no longer live in its buffer and adopts them on the next update.
    """

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        length, added = self.get_seq_length(), key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        if buffers is None or buffers[0].data_ptr() != self.keys.data_ptr() \
                or buffers[0].shape[0] != key_states.shape[0] or buffers[0].shape[-2] < length + added:
            capacity = length + added + max(64, (length + added) // 2)
            shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
            buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                buffers[0][..., :length, :] = self.keys
                buffers[1][..., :length, :] = self.values
            self._buffers = buffers
        buffers[0][..., length:length + added, :] = key_states
        buffers[1][..., length:length + added, :] = value_states
        self.keys, self.values = buffers[0][..., :length + added, :], buffers[1][..., :length + added, :]
        return self.keys, self.values


class _GrowingCache(DynamicCache):
    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = _GrowingLayer


def _map_cache(cache: DynamicCache, fn) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


class Engine:
    """Runs requests on loaded models with continuous batching; submit() is thread-safe."""

    def __init__(self, *, max_rows: int = 64, max_queue: int = 64):
        self.max_rows = max_rows
        self.max_queue = max_queue
        self._pending: deque[_Pending] = deque()
        self._batches: dict[int, _Batch] = {}     # id(LoadedModel) -> its batch
        self._wakeup = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.scheduler_restarts = 0
        self._thread = self._start_scheduler()
        threading.Thread(target=self._watch_scheduler, name="generation-watchdog", daemon=True).start()

    def _start_scheduler(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        thread.start()
        return thread

    # public
    def submit(self, loaded: LoadedModel, prompt: str, settings: Settings) -> GenerationHandle:
        validate(prompt, settings)
        if settings.n > self.max_rows:
            raise InvalidArgument(f"n must be at most {self.max_rows} (ILF_GENERATION_MAX_BATCH_ROWS), got {settings.n}")
        input_ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.device)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit and input_ids.shape[1] + settings.max_new_tokens > limit:
            raise InvalidArgument(f"prompt ({input_ids.shape[1]} tokens) plus max_new_tokens "
                                  f"({settings.max_new_tokens}) exceeds the model's {limit} positions")
        seeds = [settings.sample_seed(i) if settings.seed is not None else secrets.randbits(62)
                 for i in range(settings.n)]
        handle = GenerationHandle(n=settings.n, model_version=loaded.version, seeds=seeds)
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

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # scheduler
    def _restart_scheduler(self) -> None:
        """Replaces a scheduler thread that died: its running samples fail, waiting requests are kept."""
        log.error("the generation scheduler thread had died; starting a new one")
        self._fail_running(Unavailable("the generation scheduler died during this request; retry"))
        self.scheduler_restarts += 1
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
            _fail_batch(batch, failure)
        self._batches.clear()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopped and not self._pending and not self._batches:
                        self._wakeup.wait()
                    if self._stopped:
                        break
                try:
                    self._schedule_once()
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
                _fail_batch(batch, Unavailable(f"the decode step failed ({type(error).__name__}: {error}); retry"))
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
                joining = self._prefill(pending)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the loop
                log.exception("prefill failed")
                pending.handle.push(error)
                continue
            key = id(pending.loaded)
            if key in self._batches:
                self._merge(self._batches[key], joining)
            else:
                self._batches[key] = joining

    def _prefill(self, pending: _Pending) -> _Batch:
        loaded, settings, input_ids = pending.loaded, pending.settings, pending.input_ids
        cache = _GrowingCache()
        output = loaded.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        n = settings.n
        cache.batch_repeat_interleave(n)
        prompt_ids = input_ids[0].tolist()
        rows = []
        for i in range(n):
            generator = torch.Generator(device=loaded.device)
            generator.manual_seed(pending.handle.seeds[i])
            rows.append(_Row(pending.handle, i, settings, generator, prompt_ids))
        length = input_ids.shape[1]
        return _Batch(loaded=loaded, eos_ids=frozenset(eos_token_ids(loaded.tokenizer)), rows=rows, cache=cache,
                      mask=torch.ones(n, length, dtype=torch.long, device=loaded.device),
                      positions=torch.full((n,), length, dtype=torch.long, device=loaded.device),
                      logits=output.logits[:, -1, :].float().repeat(n, 1))

    @staticmethod
    def _merge(batch: _Batch, joining: _Batch) -> None:
        length = max(batch.mask.shape[1], joining.mask.shape[1])
        for old, new in zip(batch.cache.layers, joining.cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, length, -2), _left_pad(new.keys, length, -2)])
            old.values = torch.cat([_left_pad(old.values, length, -2), _left_pad(new.values, length, -2)])
        batch.mask = torch.cat([_left_pad(batch.mask, length, -1), _left_pad(joining.mask, length, -1)])
        batch.positions = torch.cat([batch.positions, joining.positions])
        batch.logits = torch.cat([batch.logits, joining.logits])
        batch.rows += joining.rows

    def _step(self, batch: _Batch) -> None:
        keep = [i for i, row in enumerate(batch.rows) if not row.handle.cancelled]
        if len(keep) < len(batch.rows):
            self._select(batch, keep)
            if not batch.rows:
                return
        tokens, logprobs = choose_tokens(batch.logits, batch.rows)
        keep = [i for i, row in enumerate(batch.rows)
                if not self._emit(batch, row, int(tokens[i]), float(logprobs[i]))]
        if len(keep) < len(batch.rows):
            self._select(batch, keep)
            if not batch.rows:
                return
            tokens = tokens[keep]
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)
        output = batch.loaded.model(input_ids=tokens[:, None], attention_mask=batch.mask,
                                    position_ids=batch.positions[:, None], past_key_values=batch.cache,
                                    use_cache=True, logits_to_keep=1)
        batch.positions = batch.positions + 1
        batch.logits = output.logits[:, -1, :].float()

    @staticmethod
    def _select(batch: _Batch, keep: list[int]) -> None:
        """Keeps only the rows at `keep`, and trims cache columns that are padding for all of them."""
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.positions, batch.logits = batch.mask[index], batch.positions[index], batch.logits[index]
        first_used = int(batch.mask.any(dim=0).to(torch.int8).argmax())
        if first_used:
            batch.mask = batch.mask[:, first_used:]
            _map_cache(batch.cache, lambda t: t[:, :, first_used:])

    @staticmethod
    def _emit(batch: _Batch, row: _Row, token: int, logprob: float) -> bool:
        """Records a sampled token and streams it; returns True when the row has finished."""
        settings, tokenizer = row.settings, batch.loaded.tokenizer
        reason = None
        if token in batch.eos_ids:
            text, special, reason = "", True, "eos"
        else:
            row.token_ids.append(token)
            special = False
            text = _next_text(tokenizer, row)
            if settings.stop:
                longest = max(len(s) for s in settings.stop)
                window = row.text[max(0, len(row.text) - len(text) - longest + 1):]
                if any(s in window for s in settings.stop):
                    reason = "stop"
            if reason is None and len(row.token_ids) >= settings.max_new_tokens:
                reason = "length"
        completion = None
        if reason:
            final, _ = cut_at_stop(tokenizer.decode(row.token_ids, skip_special_tokens=True), settings.stop)
            completion = Sample(text=final, finish_reason=reason,
                                generated_tokens=len(row.token_ids) + (reason == "eos"),
                                prompt_tokens=len(row.prompt_ids))
        row.handle.push(TokenEvent(row.index, token, text, logprob, special, completion))
        return reason is not None


def _fail_batch(batch: _Batch, failure: Exception) -> None:
    for row in batch.rows:
        row.handle.push(failure)
    batch.rows = []


def _next_text(tokenizer, row: _Row) -> str:
    """New text of the row's last token; held back while it ends in an incomplete character."""
    ids = row.token_ids
    before = tokenizer.decode(ids[row.prefix_offset:row.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids[row.prefix_offset:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        row.prefix_offset, row.read_offset = row.read_offset, len(ids)
        row.text += after[len(before):]
        return after[len(before):]
    return ""


def choose_tokens(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-probability for every row, each with its own settings and generator.

    Order as in transformers: repetition penalty, temperature, top-k, top-p.
    """
    logits = logits.clone()
    for i, row in enumerate(rows):
        penalty = row.settings.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(row.prompt_ids + row.token_ids, device=logits.device)
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    temperatures = torch.tensor([row.settings.temperature or 1.0 for row in rows], device=logits.device)
    scaled = logits / temperatures[:, None]
    if any(row.settings.top_k or row.settings.top_p < 1.0 for row in rows):
        scaled = _top_k_top_p(scaled, rows)
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = logprobs.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.settings.temperature > 0:
            uniform = torch.rand(logits.shape[1], generator=row.generator, device=logits.device)
            gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
            tokens[i] = (logprobs[i] + gumbel).argmax()
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _top_k_top_p(scaled: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[1], device=values.device)
    top_k = torch.tensor([row.settings.top_k or values.shape[1] for row in rows], device=values.device)
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs   # the most likely token always stays
    top_p = torch.tensor([row.settings.top_p for row in rows], device=values.device)
    values = values.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, values)

