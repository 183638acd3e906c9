"""The KV cache of a batch: each request's prompt once, and each row's generated tokens.

The n samples of one request share its prompt, so the prompt's keys and values are stored once
per request and every row of the request attends to them (vLLM and FlashInfer call this a shared
prefix, or cascade attention): memory grows with the generated tokens, not with n x prompt, and a
decode step reads each prompt once instead of n times. For a refinement prompt of about 1,000
tokens and n = 30, the n copies the engine kept before were 30x the shared prompt.

Generated tokens live in two tensors per batch: keys [layers, rows, kv heads, head dim, columns],
stored transposed so that a query times the keys is a plain matrix product over a slice (with the
keys as [columns, head dim] the product over a slice ran at half the speed, bf16, 30 rows), and
values [layers, rows, kv heads, columns, head dim]. Every step writes each row's new token into the
same column; a request that joins a running batch starts at the current column and the columns
before it are masked for its rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptKV:
    """One request's prompt: keys and values per layer, [kv heads, prompt length, head dim]."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)


class KVCache:
    """Shared prompts plus per-row generated keys/values; rows of one prompt are contiguous."""

    def __init__(self, prompt: PromptKV, rows: int):
        layers, (kv_heads, _, head_dim) = len(prompt.keys), prompt.keys[0].shape
        self.prompts = [prompt]
        self.row_prompt = [0] * rows              # index into prompts, per row
        self._shape = (layers, kv_heads, head_dim)
        self._keys = prompt.keys[0].new_zeros((layers, rows, kv_heads, head_dim, 0))
        self._values = prompt.keys[0].new_zeros((layers, rows, kv_heads, 0, head_dim))
        self.first = 0                            # first column any row still uses
        self.length = 0                           # columns written
        self.start = torch.zeros(rows, dtype=torch.long, device=self._keys.device)  # first column of each row

    @classmethod
    def from_transformers(cls, cache, rows: int) -> "KVCache":
        """A cache for `rows` samples of the one prompt in a transformers cache of batch size 1."""
        keys = [layer.keys[0] for layer in cache.layers]
        values = [layer.values[0] for layer in cache.layers]
        return cls(PromptKV(keys, values), rows)

    @property
    def rows(self) -> int:
        return len(self.row_prompt)

    def groups(self) -> list[tuple[PromptKV, int, int]]:
        """(prompt, first row, end row) for every prompt that rows still attend."""
        spans, begin = [], 0
        for row in range(1, self.rows + 1):
            if row == self.rows or self.row_prompt[row] != self.row_prompt[begin]:
                spans.append((self.prompts[self.row_prompt[begin]], begin, row))
                begin = row
        return spans

    # one decode step: every layer appends, then the step is committed
    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the new token's keys/values [rows, kv heads, head dim] of one layer."""
        if self.length == self._values.shape[3]:
            self._grow(self.length + max(64, self.length // 2))
        self._keys[layer, :, :, :, self.length] = keys
        self._values[layer, :, :, self.length] = values

    def commit(self) -> None:
        self.length += 1

    def generated(self, layer: int, *, pending: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [rows, kv heads, head dim, columns] and values [rows, kv heads, columns, head dim] of the
        columns rows still use; pending includes the column being written this step."""
        end = self.length + pending
        return self._keys[layer, :, :, :, self.first:end], self._values[layer, :, :, self.first:end]

    def generated_mask(self, dtype: torch.dtype, *, pending: bool = True) -> torch.Tensor | None:
        """Additive mask [rows, 1, 1, columns] hiding columns written before a row joined; None when none are."""
        if not bool((self.start > self.first).any()):
            return None
        columns = torch.arange(self.first, self.length + pending, device=self.start.device)
        hidden = columns[None, :] < self.start[:, None]
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(
            hidden, float("-inf"))[:, None, None, :]

    # batch operations
    def select_rows(self, keep: list[int]) -> None:
        """Keeps the rows at `keep` (in order); prompts no row attends any more are dropped."""
        index = torch.tensor(keep, device=self._keys.device)
        self._keys, self._values = self._keys[:, index], self._values[:, index]
        self.start = self.start[index]
        used = sorted({self.row_prompt[i] for i in keep})
        renumber = {old: new for new, old in enumerate(used)}
        self.prompts = [self.prompts[i] for i in used]
        self.row_prompt = [renumber[self.row_prompt[i]] for i in keep]
        if keep:
            self.first = max(self.first, int(self.start.min()))

    def extend(self, other: "KVCache") -> None:
        """Appends other's rows (of a newly prefilled request): they start at the current column."""
        if other._shape != self._shape or other.length:
            raise ValueError("only a freshly prefilled cache of the same model can join")
        capacity = max(self._values.shape[3], self.length + 1)
        keys, values = self._allocate(self.rows + other.rows, capacity)
        keys[:, :self.rows, ..., :self.length] = self._keys[..., :self.length]
        values[:, :self.rows, :, :self.length] = self._values[:, :, :, :self.length]
        self._keys, self._values = keys, values
        self.row_prompt += [len(self.prompts) + p for p in other.row_prompt]
        self.prompts += other.prompts
        self.start = torch.cat([self.start, torch.full((other.rows,), self.length, device=self.start.device)])

    def _allocate(self, rows: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers, kv_heads, head_dim = self._shape
        return (self._values.new_zeros((layers, rows, kv_heads, head_dim, capacity)),
                self._values.new_zeros((layers, rows, kv_heads, capacity, head_dim)))

    def _grow(self, capacity: int) -> None:
        keys, values = self._allocate(self.rows, capacity)
        kept = self.length - self.first   # columns before `first` are used by no row: dropped here
        keys[..., :kept] = self._keys[..., self.first:self.length]
        values[:, :, :, :kept] = self._values[:, :, :, self.first:self.length]
        self._keys, self._values = keys, values
        self.start = self.start - self.first
        self.length, self.first = kept, 0

    # memory
    @property
    def prompt_nbytes(self) -> int:
        return sum(p.nbytes for p in self.prompts)

    @property
    def generated_nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes
