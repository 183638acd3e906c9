"""A batch: the rows (samples) decoding together on one model, and the operations on it.

As in TGI's CausalLMBatch: a request's prompt is prefilled into a batch of its own (once, shared
by its n samples), batches on the same model merge, rows that finished or were cancelled are
filtered out, and each step runs one decode step (decode.py) for the next token of every row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ilf.modeling import LoadedModel, eos_token_ids
from ilf.sampling import Sampling

from .decode import decoder_for
from .detokenize import StreamDecoder
from .kv_cache import KVCache
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
    """Rows decoding on one model: their KV cache, positions and next-token logits."""
    loaded: LoadedModel
    eos_ids: frozenset[int]
    rows: list[Row]
    cache: KVCache
    positions: torch.Tensor   # [rows] position id of each row's next token
    logits: torch.Tensor      # [rows, vocab] logits for each row's next token

    @classmethod
    def prefill(cls, loaded: LoadedModel, input_ids: torch.Tensor, handle: GenerationHandle,
                settings: Sampling) -> "Batch":
        """Runs the prompt once; its keys and values are kept once for the request's n rows."""
        prompt_cache = DynamicCache()
        output = loaded.model(input_ids=input_ids, past_key_values=prompt_cache, use_cache=True, logits_to_keep=1)
        n = settings.n
        prompt_ids = input_ids[0].tolist()
        rows = []
        for i in range(n):
            generator = torch.Generator(device=loaded.device)
            generator.manual_seed(handle.seeds[i])
            rows.append(Row(handle, i, settings, generator, prompt_ids, StreamDecoder(loaded.tokenizer, settings.stop)))
        return cls(loaded=loaded, eos_ids=frozenset(eos_token_ids(loaded.tokenizer)), rows=rows,
                   cache=KVCache.from_transformers(prompt_cache, n),
                   positions=torch.full((n,), input_ids.shape[1], dtype=torch.long, device=loaded.device),
                   logits=output.logits[:, -1, :].float().repeat(n, 1))

    def merge(self, joining: "Batch") -> None:
        """Appends joining's rows (same model, just prefilled)."""
        self.cache.extend(joining.cache)
        self.positions = torch.cat([self.positions, joining.positions])
        self.logits = torch.cat([self.logits, joining.logits])
        self.rows += joining.rows

    def select(self, keep: list[int]) -> None:
        """Keeps only the rows at `keep`; the cache drops what no remaining row uses."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.positions.device)
        self.cache.select_rows(keep)
        self.positions, self.logits = self.positions[index], self.logits[index]

    def step(self, tokens: torch.Tensor) -> None:
        """Feeds each row its next token [rows]; afterwards logits hold the token after it."""
        self.logits = decoder_for(self.loaded.model).step(tokens, self.positions, self.cache)
        self.positions = self.positions + 1

    def fail(self, failure: Exception) -> None:
        """Ends every row with failure."""
        for row in self.rows:
            row.handle.push(failure)
        self.rows = []
