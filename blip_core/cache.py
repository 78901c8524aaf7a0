"""Compiled programs in memory: a small least-recently-used map, and the shape buckets that let calls share one.

Compiled backends (XLA through TensorFlow or JAX) build one program per static setting of a
``generate`` call (the decoding plan, which holds ``max_new_tokens``) and per input shape (batch,
prompt length). Kept forever, every distinct setting costs tens of MB; the engines keep them in an
``LRU`` of ``COMPILE_CACHE_SIZE`` programs per model, so the least recently used one is dropped
(and recompiled if it is asked for again).

So that typical calls reuse a program instead of compiling their own, the compiled engines round
the batch and ``max_new_tokens`` up to a few buckets (``batch_bucket``, ``new_tokens_bucket``):
batch 3 runs in the batch-4 program with a copy of the first row that is never returned, 20 new
tokens in the 24-token program whose loop stops after the 20th. The ids are those of the unpadded
call (``blip_core.decoding`` masks the extra rows and stops at the real length).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Optional

import numpy as np

COMPILE_CACHE_SIZE = 8     # generation programs kept per model (per class, config and dtype in JAX)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)       # beyond the last: multiples of it
NEW_TOKEN_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def _round_up(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    step = buckets[-1]
    return -(-n // step) * step


def batch_bucket(batch: int) -> int:
    """The batch a compiled program is built for: ``batch`` rounded up to ``BATCH_BUCKETS`` (0 stays 0)."""
    return 0 if batch <= 0 else _round_up(int(batch), BATCH_BUCKETS)


def new_tokens_bucket(max_new_tokens: int, limit: Optional[int] = None) -> int:
    """Decode buffer length of a compiled program: ``max_new_tokens`` rounded up to ``NEW_TOKEN_BUCKETS``,
    but never past ``limit`` (the most new tokens the model's position table allows), nor below the
    request itself."""
    n = int(max_new_tokens)
    b = _round_up(n, NEW_TOKEN_BUCKETS)
    return max(n, min(b, int(limit))) if limit is not None else b


def padding_rows(batch: int, padded: int) -> np.ndarray:
    """Row index that pads a batch of ``batch`` rows to ``padded``: the rows themselves, then copies of row 0."""
    return np.concatenate([np.arange(batch), np.zeros(max(padded - batch, 0), np.int64)]).astype(np.int32)


class LRU:
    """``get(key, make)`` returns the cached value or ``make()``'s, evicting the oldest past ``size``."""

    def __init__(self, size: int = COMPILE_CACHE_SIZE):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def values(self):
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items
