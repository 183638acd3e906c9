"""The KV cache of a batch: keys and values of every row, left-padded to one length.

Besides what transformers' DynamicCache does, the batch needs rows removed (finished or cancelled
samples), leading columns dropped (padding no remaining row uses) and caches of different lengths
merged (a request joining a running batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """tensor padded with zeros at the start of dim to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, padding)


class _GrowingLayer(DynamicLayer):
    """A cache layer that appends new tokens into spare capacity.

    DynamicLayer concatenates on every token, copying the whole cache into a fresh allocation each
    decode step; with refinement prompts (about 1,000 tokens, 16 rows) that copying was a fifth of
    the step. The cache may still replace keys/values (padding, row selection, merging): the
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


class KVCache(DynamicCache):
    """A DynamicCache of [rows, heads, length, head_dim] layers that grows in place."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = _GrowingLayer

    def select_rows(self, index: torch.Tensor) -> None:
        self.batch_select_indices(index)

    def drop_leading(self, columns: int) -> None:
        """Drops the first `columns` positions of every row."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]

    def extend(self, other: "KVCache", length: int) -> None:
        """Appends other's rows after this cache's, both left-padded to `length` positions."""
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys = torch.cat([left_pad(mine.keys, length, -2), left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat([left_pad(mine.values, length, -2), left_pad(theirs.values, length, -2)])
