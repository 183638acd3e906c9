"""A batch: the rows (samples) decoding together on one model, and the operations on it.

As in TGI's CausalLMBatch: a request's prompt is prefilled into a batch of its own (once, shared
by its n samples), batches on the same model merge, rows that finished or were cancelled are
filtered out, and each step runs one forward pass for the next token of every row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ilf.modeling import LoadedModel, eos_token_ids
from ilf.sampling import Sampling

from .detokenize import StreamDecoder
from .kv_cache import KVCache, left_pad
from .request import GenerationHandle


@dataclass
class Row:
    """One sample being generated."""
    handle: GenerationHandle
    index: int
    settings: Sampling
    generator: torch.Generator
    prompt_ids: list[int]
    decoder: StreamDecoder

    @property
    def token_ids(self) -> list[int]:
        return self.decoder.token_ids


@dataclass
class Batch:
    """Rows decoding on one model: their KV cache, attention mask and next-token logits."""
    loaded: LoadedModel
    eos_ids: frozenset[int]
    rows: list[Row]
    cache: KVCache
    mask: torch.Tensor        # [rows, cache length]; 0 marks left padding
    positions: torch.Tensor   # [rows] position id of each row's next token
    logits: torch.Tensor      # [rows, vocab] logits for each row's next token

    @classmethod
    def prefill(cls, loaded: LoadedModel, input_ids: torch.Tensor, handle: GenerationHandle,
                settings: Sampling) -> "Batch":
        """Runs the prompt once and gives each of the request's n samples a row with its own generator."""
        cache = KVCache()
        output = loaded.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        n = settings.n
        cache.batch_repeat_interleave(n)
        prompt_ids = input_ids[0].tolist()
        rows = []
        for i in range(n):
            generator = torch.Generator(device=loaded.device)
            generator.manual_seed(handle.seeds[i])
            rows.append(Row(handle, i, settings, generator, prompt_ids, StreamDecoder(loaded.tokenizer, settings.stop)))
        length = input_ids.shape[1]
        return cls(loaded=loaded, eos_ids=frozenset(eos_token_ids(loaded.tokenizer)), rows=rows, cache=cache,
                   mask=torch.ones(n, length, dtype=torch.long, device=loaded.device),
                   positions=torch.full((n,), length, dtype=torch.long, device=loaded.device),
                   logits=output.logits[:, -1, :].float().repeat(n, 1))

    def merge(self, joining: "Batch") -> None:
        """Appends joining's rows (same model); the shorter cache is left-padded."""
        length = max(self.mask.shape[1], joining.mask.shape[1])
        self.cache.extend(joining.cache, length)
        self.mask = torch.cat([left_pad(self.mask, length, -1), left_pad(joining.mask, length, -1)])
        self.positions = torch.cat([self.positions, joining.positions])
        self.logits = torch.cat([self.logits, joining.logits])
        self.rows += joining.rows

    def select(self, keep: list[int]) -> None:
        """Keeps only the rows at `keep`, and trims cache columns that are padding for all of them."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.select_rows(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        first_used = int(self.mask.any(dim=0).to(torch.int8).argmax())
        if first_used:
            self.mask = self.mask[:, first_used:]
            self.cache.drop_leading(first_used)

    def step(self, tokens: torch.Tensor) -> None:
        """Feeds each row its next token [rows]; afterwards logits hold the token after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        output = self.loaded.model(input_ids=tokens[:, None], attention_mask=self.mask,
                                   position_ids=self.positions[:, None], past_key_values=self.cache,
                                   use_cache=True, logits_to_keep=1)
        self.positions = self.positions + 1
        self.logits = output.logits[:, -1, :].float()

    def fail(self, failure: Exception) -> None:
        """Ends every row with failure."""
        for row in self.rows:
            row.handle.push(failure)
        self.rows = []
