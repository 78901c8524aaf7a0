"""A small least-recently-used map for compiled programs.

Compiled backends (XLA through TensorFlow or JAX) build one program per static setting of a
``generate`` call (the decoding plan, which holds ``max_new_tokens``) and per input shape (batch,
prompt length). Kept forever, every distinct setting costs tens of MB; the engines keep them in an
``LRU`` of ``COMPILE_CACHE_SIZE`` programs per model, so the least recently used one is dropped
(and recompiled if it is asked for again).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

COMPILE_CACHE_SIZE = 8     # generation programs kept per model (per class, config and dtype in JAX)


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
