"""The generation service's use of glibc's allocator: keep freed memory for the decode steps, and hand
the pages of what stays free back to the kernel now and then.

A decode step allocates and frees tensors of tens of MB; served by a fresh mmap each time (or by a
per-thread arena that is trimmed again), they page-faulted about 180,000 times per step at 16 rows x
1,000 tokens (SmolLM2, measured) and system time became most of the service's CPU. One arena, no mmap
and a high trim threshold keep the pages: 8 refinement prompts x 2 samples x 48 tokens went from 32.5 s
to 27.9 s (with the in-place KV cache; mean of 3 runs each) and page faults from about 1.7 million to
155,000. But such a heap never shrinks, and buffers of ever-different sizes leave free holes in it (the
KV cache's, before it kept whole blocks: kv_cache.py): in process, 8 refinement prompts x 30 samples left
1.53 GiB of its 2.72 GiB heap free while live tensors held 0.25 GiB, and one malloc_trim (85-102 ms) took
the resident memory from 2.96 to 1.47 GiB (measured 2026-12-04). So the engine trims at most every
TRIM_INTERVAL_S while it runs, and once when it falls idle.
Only for the generation service: in the trainer, whose backward pass allocates ever-different sizes,
the one never-trimmed heap fragmented to 14 GB and slowed steps down (measured), so the trainer keeps
glibc's defaults.
"""
from __future__ import annotations

import ctypes
import time

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_INTERVAL_S = 30.0

try:
    _LIBC = ctypes.CDLL(None)
    _mallopt, _malloc_trim = _LIBC.mallopt, _LIBC.malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to tune
    _mallopt = _malloc_trim = None


def keep_freed_memory() -> None:
    """Makes glibc reuse freed memory instead of handing every large block back to the kernel. Call it
    before starting threads that allocate."""
    if _mallopt is None:
        return
    _mallopt(M_ARENA_MAX, 1)
    _mallopt(M_MMAP_MAX, 0)
    _mallopt(M_TRIM_THRESHOLD, 1 << 30)


class Trimmer:
    """Returns the heap's free pages to the kernel, at most once per interval (or whenever asked with force)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, clock=time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self.trims = 0

    def maybe_trim(self, *, force: bool = False) -> bool:
        now = self._clock()
        if _malloc_trim is None or (not force and now - self._last < self.interval_s):
            return False
        _malloc_trim(0)
        self._last = self._clock()
        self.trims += 1
        return True
