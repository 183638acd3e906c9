"""The batch's KV cache: grows in place, drops rows and leading columns, merges caches of other lengths."""
from __future__ import annotations

import torch

from services.generation.kv_cache import KVCache, left_pad


def kv(rows: int, length: int, start: float = 0.0) -> torch.Tensor:
    return torch.arange(rows * 2 * length * 4, dtype=torch.float32).reshape(rows, 2, length, 4) + start


def test_left_pad_puts_zeros_first():
    padded = left_pad(torch.ones(2, 3), 5, -1)
    assert padded.tolist() == [[0, 0, 1, 1, 1]] * 2


def test_tokens_are_appended_into_spare_capacity():
    cache = KVCache()
    first, second, third = kv(2, 5), kv(2, 1, 1000), kv(2, 1, 2000)
    cache.update(first, -first, 0)
    keys, _ = cache.update(second, -second, 0)
    address = keys.data_ptr()
    keys, values = cache.update(third, -third, 0)
    assert keys.data_ptr() == address, "the third token must not reallocate"
    assert torch.equal(keys, torch.cat([first, second, third], dim=-2)) and torch.equal(values, -keys)
    assert cache.get_seq_length() == 7


def test_selected_trimmed_and_merged_caches_keep_growing_correctly():
    cache, other = KVCache(), KVCache()
    long_rows, short_rows = kv(3, 6), kv(2, 2, 500)
    cache.update(long_rows, long_rows, 0)
    other.update(short_rows, short_rows, 0)
    cache.extend(other, 6)
    keys = cache.layers[0].keys
    assert keys.shape == (5, 2, 6, 4) and torch.equal(keys[3:, :, :4], torch.zeros(2, 2, 4, 4))
    assert torch.equal(keys[3:, :, 4:], short_rows)
    cache.select_rows(torch.tensor([1, 4]))
    cache.drop_leading(2)
    expected = torch.stack([long_rows[1, :, 2:], torch.cat([torch.zeros(2, 2, 4), short_rows[1]], dim=1)])
    assert torch.equal(cache.layers[0].keys, expected)
    new = kv(2, 1, 9000)
    keys, _ = cache.update(new, new, 0)
    assert torch.equal(keys, torch.cat([expected, new], dim=-2))
