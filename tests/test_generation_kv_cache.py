"""The batch's KV cache: one copy of each request's prompt, generated tokens per row, rows joining and leaving."""
from __future__ import annotations

import pytest
import torch

from services.generation.kv_cache import COLUMN_BLOCK, ROW_BLOCK, KVCache, PromptKV

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4


def prompt(length: int, start: float = 0.0) -> PromptKV:
    def tensor(offset):
        return torch.arange(KV_HEADS * length * HEAD_DIM, dtype=torch.float32).reshape(
            KV_HEADS, length, HEAD_DIM) + start + offset
    return PromptKV([tensor(100 * i) for i in range(LAYERS)], [-tensor(100 * i) for i in range(LAYERS)])


def token(rows: int, value: float) -> torch.Tensor:
    return torch.full((rows, KV_HEADS, HEAD_DIM), value)


def step(cache: KVCache, values: list[float]) -> None:
    for layer in range(LAYERS):
        cache.append(layer, token(cache.rows, 0) + torch.tensor(values)[:, None, None] + layer,
                     token(cache.rows, 0) - torch.tensor(values)[:, None, None])
    cache.commit()


def test_rows_of_one_prompt_share_it_and_keep_their_own_tokens():
    shared = prompt(5)
    cache = KVCache(shared, rows=3)
    assert cache.groups() == [(shared, 0, 3)] and cache.prompt_nbytes == shared.nbytes
    for t in range(70):   # past the first capacity: the cache grows and keeps what it had
        step(cache, [t, 1000 + t, 2000 + t])
    keys, values = cache.generated(1, pending=False)
    assert keys.shape == (3, KV_HEADS, HEAD_DIM, 70) and values.shape == (3, KV_HEADS, 70, HEAD_DIM)
    assert keys[:, 0, 0, :].tolist() == [[r * 1000 + t + 1 for t in range(70)] for r in range(3)]
    assert torch.equal(values[:, 0, :, 0], -(keys[:, 0, 0, :] - 1))
    assert cache.generated_mask(torch.float32) is None


def test_a_joining_request_masks_the_columns_before_it_and_leaving_rows_free_their_prompt():
    first, second = prompt(5), prompt(2, 50)
    cache = KVCache(first, rows=2)
    step(cache, [1, 2])
    cache.extend(KVCache(second, rows=1))
    assert cache.groups() == [(first, 0, 2), (second, 2, 3)]
    step(cache, [3, 4, 5])
    mask = cache.generated_mask(torch.float32, pending=False)
    assert mask[:, 0, 0].tolist() == [[0, 0], [0, 0], [float("-inf"), 0]]
    cache.select_rows([2])
    assert cache.prompts == [second] and cache.groups() == [(second, 0, 1)]
    keys, _ = cache.generated(0, pending=False)
    assert keys[:, 0, 0, :].tolist() == [[5]] and cache.generated_mask(torch.float32, pending=False) is None


def test_rows_leaving_and_joining_reuse_the_buffer_and_joiners_see_only_their_own_columns():
    first, second = prompt(5), prompt(2, 50)
    cache = KVCache(first, rows=3)
    step(cache, [1, 2, 3])
    buffer = cache._keys.data_ptr()
    cache.select_rows([1, 2])          # row 0 leaves: rows 1 and 2 move up, in place
    step(cache, [20, 30])
    cache.extend(KVCache(second, rows=1))   # the joiner takes the spare row that row 2 used before
    step(cache, [21, 31, 40])
    assert cache._keys.data_ptr() == buffer and cache._keys.shape[1] == ROW_BLOCK
    keys, values = cache.generated(0, pending=False)
    assert keys[:, 0, 0, :].tolist()[:2] == [[2, 20, 21], [3, 30, 31]]
    assert keys[2, 0, 0, 2].item() == 40 and values[2, 0, 2, 0].item() == -40
    mask = cache.generated_mask(torch.float32, pending=False)
    assert mask[:, 0, 0].tolist() == [[0, 0, 0], [0, 0, 0], [float("-inf"), float("-inf"), 0]]
    assert cache.groups() == [(first, 0, 2), (second, 2, 3)]


def test_buffers_come_in_whole_blocks_so_freed_ones_fit_the_next():
    cache = KVCache(prompt(5), rows=3)
    step(cache, [1, 2, 3])
    sizes = {tuple(cache._keys.shape[1::3])}
    for joined in range(20):   # requests of varying size join and leave, as in a refinement run
        cache.extend(KVCache(prompt(3 + joined % 4), rows=1 + joined % 5))
        step(cache, list(range(cache.rows)))
        cache.select_rows(list(range(joined % 3, cache.rows)))
        sizes.add(tuple(cache._keys.shape[1::3]))
    assert all(rows % ROW_BLOCK == 0 and columns % COLUMN_BLOCK == 0 for rows, columns in sizes)
    assert len(sizes) <= 4


def test_rows_to_keep_must_be_in_order():
    cache = KVCache(prompt(5), rows=3)
    step(cache, [1, 2, 3])
    with pytest.raises(ValueError, match="ascending"):
        cache.select_rows([2, 0])
