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

The two tensors are buffers with room to spare, in whole blocks of rows and columns: rows that leave
are compacted in place and rows that join fill the spare rows, so a new buffer is allocated only when
a block fills up, always in one of a few sizes. The generation service keeps freed memory in one
never-trimmed heap (allocator.py); a fresh buffer of a slightly different size at every
join and leave (as before) left holes no later buffer fit, and the service grew by about 0.3 GB per
refinement task, 2.0 -> 5.8 GB over 12 tasks x 30 samples, until the OOM killer stopped a 128-task run
at 23.9 GB (measured 2026-12-04).
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


ROW_BLOCK = 16       # rows of buffer allocated at a time
COLUMN_BLOCK = 64    # columns of buffer allocated at a time


def _blocks(count: int, block: int) -> int:
    return -(-count // block) * block


class KVCache:
    """Shared prompts plus per-row generated keys/values; rows of one prompt are contiguous."""

    def __init__(self, prompt: PromptKV, rows: int):
        layers, (kv_heads, _, head_dim) = len(prompt.keys), prompt.keys[0].shape
        self.prompts = [prompt]
        self.row_prompt = [0] * rows              # index into prompts, per row
        self._shape = (layers, kv_heads, head_dim)
        # no columns yet: a freshly prefilled cache usually joins a running batch and never needs its own buffer
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
            kept = self.length - self.first
            self._reallocate(self.rows, kept + max(COLUMN_BLOCK, kept // 2))
        self._keys[layer, :self.rows, :, :, self.length] = keys
        self._values[layer, :self.rows, :, self.length] = values

    def commit(self) -> None:
        self.length += 1

    def generated(self, layer: int, *, pending: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [rows, kv heads, head dim, columns] and values [rows, kv heads, columns, head dim] of the
        columns rows still use; pending includes the column being written this step."""
        end, rows = self.length + pending, self.rows
        return self._keys[layer, :rows, :, :, self.first:end], self._values[layer, :rows, :, self.first:end]

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
        """Keeps the rows at `keep` (ascending), moved up in place; prompts no row attends any more are dropped."""
        if any(later <= earlier for earlier, later in zip(keep, keep[1:])):
            raise ValueError(f"rows to keep must be ascending, got {keep}")
        for new, old in enumerate(keep):   # new <= old: each move reads a row no earlier move wrote
            if new != old:
                self._keys[:, new] = self._keys[:, old]
                self._values[:, new] = self._values[:, old]
        self.start = self.start[torch.tensor(keep, dtype=torch.long, device=self.start.device)]
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
        rows = self.rows + other.rows
        if rows > self._keys.shape[1] or self.length == self._values.shape[3]:
            self._reallocate(rows, self.length - self.first + 1)
        # the joining rows' buffer may hold a departed row's columns: the mask hides every column before start
        self.row_prompt += [len(self.prompts) + p for p in other.row_prompt]
        self.prompts += other.prompts
        self.start = torch.cat([self.start, torch.full((other.rows,), self.length, device=self.start.device)])

    def _reallocate(self, rows: int, columns: int) -> None:
        """New buffers, whole blocks of at least `rows` rows and `columns` columns, holding the current rows'
        columns from `first` on (the columns before it are used by no row: dropped here)."""
        layers, kv_heads, head_dim = self._shape
        capacity, rows = max(_blocks(columns, COLUMN_BLOCK), self._values.shape[3]), _blocks(rows, ROW_BLOCK)
        keys = self._values.new_zeros((layers, rows, kv_heads, head_dim, capacity))
        values = self._values.new_zeros((layers, rows, kv_heads, capacity, head_dim))
        kept, current = self.length - self.first, self.rows
        keys[:, :current, ..., :kept] = self._keys[:, :current, ..., self.first:self.length]
        values[:, :current, :, :kept] = self._values[:, :current, :, self.first:self.length]
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
