"""Checkpoint tensors laid out and cast on the host, into fresh 64-byte-aligned buffers (numpy only).

A backend on the CPU can take such a buffer as its own array without copying it: jax's
``device_put`` aliases a 64-byte-aligned numpy array on the CPU, TensorFlow takes one through
DLPack (an unaligned one would abort the process in Eigen's alignment check, hence the
alignment is made here, never assumed). So loading a tensor costs one pass over its data, the
layout change and the cast fused into it, written once into memory the model keeps.

* ``relayout(src, perm, dtype)``: ``src.transpose(perm).astype(dtype)`` with exactly numpy's values
  (bfloat16 -> float32 widened bit for bit; other casts are numpy's / ml_dtypes' round-to-nearest-even,
  as ``cast_state_dict``), in a buffer that owns its memory. A 2-D transposition runs in cache-sized
  tiles (numpy's own strided copy of a whole matrix misses the cache and the TLB on every element),
  split over a few threads (numpy releases the GIL while it copies).
* ``aligned_empty(shape, dtype)``: the buffer alone.
"""
from __future__ import annotations

import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ALIGN = 64                  # Eigen's (TF's) largest alignment, and what jax needs to alias a numpy array
# A tile is 16 source rows x 2048 columns: numpy's copy runs along out's rows (16 elements, one from each
# source row), so the 16 source cache lines in use stay in L1 even when the row stride is a multiple of 4 KB
# (every line in one cache set: square 256 x 256 tiles ran 3x slower on a (2560, 10240) matrix).
TILE_ROWS, TILE_COLS = 16, 2048
PARALLEL_MIN = 1 << 20      # elements: smaller tensors are copied by the calling thread alone
MAP_MIN = 1 << 20           # bytes: larger buffers are anonymous mappings of their own (see ``aligned_empty``)
POPULATE_CHUNK = 16 << 20   # bytes: the pages of a large buffer are made by the pool's threads in such chunks
_PAGE = mmap.PAGESIZE
_POOL: dict = {}


def aligned_empty(shape, dtype, zero: bool = False) -> np.ndarray:
    """A C-contiguous array whose data start on a 64-byte boundary (it keeps its raw buffer alive).

    A large one is a private anonymous mapping of its own (page-aligned, freed when the array goes),
    its pages made up front by the pool's threads, one write per page (see ``_populate``): on a VM the
    first touch of new memory costs more than the copy into it.
    Not numpy's allocator: it asks for transparent huge pages, whose compaction on a busy machine cost
    more kernel time than it saved in our measurements. Mapped pages are zero-filled (as ``zero`` asks).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= MAP_MIN and hasattr(mmap, "MAP_ANONYMOUS"):
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _populate(buf)
        return np.frombuffer(buf, dtype).reshape(shape)
    raw = (np.zeros if zero else np.empty)(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def is_aligned(arr: np.ndarray) -> bool:
    return arr.ctypes.data % ALIGN == 0 and arr.flags.c_contiguous


def workers() -> int:
    """Threads a large tensor is copied with: ``BLIP_LOAD_THREADS``, else the usable CPUs (at most 8)."""
    env = os.environ.get("BLIP_LOAD_THREADS")
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def _pool(n: int) -> ThreadPoolExecutor:
    if _POOL.get("n") != n:
        _POOL.update(n=n, pool=ThreadPoolExecutor(n, thread_name_prefix="blip-load"))
    return _POOL["pool"]


def _populate(buf: mmap.mmap) -> None:
    """Fault every page of ``buf`` in, writable, by the pool's threads (one zero byte written per page:
    a fresh anonymous page is zero already, so no value changes).

    Plain writes, not ``madvise(MADV_POPULATE_WRITE)``: measured on a 2-vCPU VM (Linux 6.18), two threads
    populating 4.3 GB took as long as one (1.63 against 1.61 s: the kernel serialises them), while two
    threads writing a byte per page took 0.83-0.99 s against 1.53-1.67 s for one. One thread costs the
    same either way.
    """
    pages = np.frombuffer(buf, np.uint8)[::_PAGE]
    step = POPULATE_CHUNK // _PAGE
    starts = range(0, len(pages), step)
    n = min(workers(), len(starts))
    if n == 1:
        pages.fill(0)
    else:     # numpy releases the GIL while it fills a chunk
        list(_pool(n).map(lambda lo: pages[lo:lo + step].fill(0), starts))


def relayout(src: np.ndarray, perm, dtype) -> np.ndarray:
    """``src`` with its axes permuted by ``perm`` (None: as it is), cast to ``dtype``, in a fresh aligned buffer."""
    dtype = np.dtype(dtype)
    view = src if perm is None else src.transpose(perm)
    tiled = perm is not None and src.ndim == 2 and tuple(perm) == (1, 0) and min(src.shape) >= TILE_ROWS
    widen = src.dtype.name == "bfloat16" and dtype == np.float32
    out = aligned_empty(view.shape, dtype, zero=tiled and widen)
    if out.size == 0:
        return out
    if not tiled:
        _copier(src.dtype, dtype)(out, view)     # contiguous (or a small / rare permutation): one numpy call
        return out
    # bfloat16 -> float32 tile by tile: the bits go to the high halves of the zeroed float32s (a plain strided
    # copy: 1.5 ns per element against 2.1-2.9 for a shift or ml_dtypes' cast over a transposed tile)
    copy = _high_halves if widen else _copier(src.dtype, dtype)
    rows, cols = src.shape      # out is (cols, rows); each worker takes a band of src's rows (out's columns)
    n = workers() if src.size >= PARALLEL_MIN else 1
    bands = np.linspace(0, -(-rows // TILE_ROWS), n + 1).astype(int) * TILE_ROWS

    def band(lo, hi):
        for i in range(lo, min(hi, rows), TILE_ROWS):
            for j in range(0, cols, TILE_COLS):
                copy(out[j:j + TILE_COLS, i:i + TILE_ROWS], src[i:i + TILE_ROWS, j:j + TILE_COLS].T)

    if n == 1:
        band(0, rows)
    else:
        for f in [_pool(n).submit(band, lo, hi) for lo, hi in zip(bands[:-1], bands[1:]) if lo < rows]:
            f.result()
    return out


_HIGH = 1 if sys.byteorder == "little" else 0      # where a float32's upper 16 bits are, as two uint16s


def _high_halves(out: np.ndarray, view: np.ndarray) -> None:
    """``out`` (float32, zero-filled) = ``view`` (bfloat16) widened, exactly."""
    np.copyto(out.view(np.uint16)[:, _HIGH::2], view.view(np.uint16))


def _copier(src: np.dtype, dst: np.dtype):
    """``copy(out, view)``: write ``view`` cast to ``out``'s dtype into ``out``."""
    if src == dst:
        if src.itemsize in (1, 2, 4, 8) and src.kind not in "biu":
            # as unsigned ints of the same width: numpy's fast strided loops (not a user dtype's generic copy)
            raw = np.dtype(f"u{src.itemsize}")

            def same(out, view):
                np.copyto(out.view(raw), view.view(raw))
            return same
        return np.copyto
    if src.name == "bfloat16" and dst == np.float32:
        # exact: a float32 is the bfloat16's bits followed by 16 zero bits (NaN payloads included)
        def widen(out, view):
            np.left_shift(view.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        return widen

    def cast(out, view):
        np.copyto(out, view, casting="unsafe")
    return cast
