"""Keep the memory a model call frees for the next call (glibc's malloc), in processes that run many calls.

A forward pass allocates its intermediate tensors afresh each call: a BLIP-base vision tower at batch 1
about 300 MB in blocks of 2-7 MB, batch-8 captioning about 1.2 GB. glibc returns large freed blocks to
the kernel (``munmap``, and trimming the top of the heap), so the next call takes every page again as a
page fault and the kernel zeroes it: ~300,000 faults per batch-8 caption call. With the thresholds
below, blocks up to ``MMAP_THRESHOLD`` come from the heap and up to ``TRIM_THRESHOLD`` of free heap
stays mapped, so repeated calls reuse their pages: 2,000-10,000 faults per call, and (torch, BLIP base,
this project's 2-core VM, alternating processes) batch-8 greedy captioning 3.98-4.26 s -> 3.79-4.11 s,
batch 32 19.0-19.6 s -> 15.9-17.4 s, the batch-1 vision forward 0.42-0.57 s -> 0.40 s. The price: the process keeps up to ``TRIM_THRESHOLD``
of freed memory mapped (its resident size stays near its peak) instead of handing it back between calls.

The data-set engine's workers (``blip_apps.dataset``, local and Ray) turn it on; a one-shot command gains
nothing (its pages are new either way) and leaves malloc alone. ``BLIP_KEEP_FREED_MEMORY=0`` turns it
off; ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set in the environment win (glibc reads them at
start and the settings here are then not applied). Other C libraries (musl, macOS): a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from blip_core.settings import OFF, env_word

MMAP_THRESHOLD = 256 << 20     # blocks up to this size come from the heap (glibc's default grows to 32 MB at most)
TRIM_THRESHOLD = 1 << 30       # free heap kept mapped, at most
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # mallopt parameters (malloc.h)
_ENV = "BLIP_KEEP_FREED_MEMORY"
_applied = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once). Returns whether they are in effect
    (set now or earlier, by this function or by the environment)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if env_word(_ENV, "1") in OFF:
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        _applied = True      # the user's own glibc settings: left as they are
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):     # not glibc: its mallopt may mean something else
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
