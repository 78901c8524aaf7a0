"""Checkpoint tensors read on demand: shape and dtype now, data one tensor at a time.

Loading a model must not hold the checkpoint and the model at once. A ``TensorRef`` stands for
one stored tensor: it answers ``shape`` and ``dtype`` from the header (so strict checking against
the weight table reads no data), ``view()`` gives its data in the canonical (torch) layout and
``release()`` gives the memory back once the backend has built its own array from it.

* safetensors (single or sharded): each file is memory-mapped once (``mmap``, private
  copy-on-write mapping, so views are writable numpy arrays and a write never reaches the file).
  ``view()`` is a zero-copy numpy view into the mapping; ``release()`` drops the tensor's pages
  from this process (``madvise(MADV_DONTNEED)``: they stay in the page cache, not in our RSS,
  marked first to reclaim with ``MADV_COLD`` so that memory pressure evicts what is loaded) and
  ``prefetch()`` asks the kernel to read the tensor ahead (``MADV_WILLNEED``), which overlaps disk
  reads of the next tensors, in any shard, with the conversion of the current one.
* ``tf_model.h5`` and ``flax_model.msgpack``: one dataset / leaf read per ``view()`` (a fresh
  array in canonical layout; the formats have random access but no mapping that fits every dtype).
* ``pytorch_model.bin`` (opt-in): its uncompressed storage records are mapped the same way by
  ``blip_core.safe_pickle``; each contiguous tensor is a ``ViewRef`` (a view of the mapping, with
  ``release`` and ``prefetch``); a tensor stored strided is copied (``ArrayRef``).
* Tensors drawn from a seed: arrays already in memory (``ArrayRef``).

A view must not be used after ``release()`` for anything but re-reading (the data is re-read
from the file on the next access; the file must not change meanwhile).
"""
from __future__ import annotations

import mmap
import os
import sys

import numpy as np

from ..settings import OFF, ON, env_word
from .dtypes import SAFETENSORS_TO_NAME, numpy_dtype
from .errors import CheckpointError
from .safetensors_io import read_safetensors_header

_PAGE = mmap.PAGESIZE
# Linux / macOS advice; without them (Windows) loading works the same, holding more pages meanwhile.
_DONTNEED, _WILLNEED = getattr(mmap, "MADV_DONTNEED", None), getattr(mmap, "MADV_WILLNEED", None)
# Linux >= 5.4 (Python names neither): "reclaim these pages first". A loaded tensor's pages are
# deactivated before they leave our mapping, so when the model and the files do not both fit in
# memory the kernel evicts what has been read, not what is still to be read (a re-read from disk).
_COLD = getattr(mmap, "MADV_COLD", 20 if sys.platform.startswith("linux") else None)


# Stored dtypes numpy lacks, and the plain dtype of the same width their bits are viewed as.
_RAW = {"bfloat16": np.dtype(np.uint16), "float8_e4m3fn": np.dtype(np.uint8), "float8_e5m2": np.dtype(np.uint8)}


class TensorRef:
    """One stored tensor, not yet read: ``shape``, ``dtype_name`` / ``dtype`` (as stored), ``view()``,
    ``raw()``, ``release()``."""

    shape: tuple = ()
    dtype_name: str = "float32"

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype (bfloat16 and float8 through ml_dtypes, imported only here)."""
        return numpy_dtype(self.dtype_name, f"tensor of shape {self.shape}")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        itemsize = _RAW[self.dtype_name].itemsize if self.dtype_name in _RAW else np.dtype(self.dtype_name).itemsize
        return self.size * itemsize

    def view(self) -> np.ndarray:
        """The data in canonical layout; may share memory with a file mapping (see ``release``)."""
        raise NotImplementedError

    def raw(self) -> np.ndarray:
        """As ``view()``, with bfloat16 / float8 data seen as uint16 / uint8 (needs no ml_dtypes)."""
        arr = self.view()
        return arr.view(_RAW[self.dtype_name]) if self.dtype_name in _RAW else arr

    def load(self) -> np.ndarray:
        """The data as an array that owns its memory."""
        arr = self.view()
        return arr.copy() if not arr.flags.owndata else arr

    def release(self) -> None:
        """Give back memory held for ``view()`` (the view stays readable: it is re-read on access)."""

    def prefetch(self) -> None:
        """Hint that ``view()`` comes soon (start the disk read)."""

    def __array__(self, dtype=None, copy=None):
        arr = self.load()
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype_name})"


class ArrayRef(TensorRef):
    """A tensor already in memory (``.bin`` files, weights drawn from a seed)."""

    def __init__(self, array):
        self._array = np.asarray(array)
        self.shape, self.dtype_name = tuple(self._array.shape), self._array.dtype.name

    def view(self) -> np.ndarray:
        return self._array

    def load(self) -> np.ndarray:
        return self._array


class ViewRef(ArrayRef):
    """A tensor that is a contiguous view of a mapped file read by another parser (a ``.bin`` storage
    record): read on first use, ``release`` / ``prefetch`` as for safetensors."""

    def __init__(self, array: np.ndarray, mapping: mmap.mmap):
        super().__init__(array)
        self._map = mapping
        self._begin = array.ctypes.data - np.frombuffer(mapping, np.uint8, count=0).ctypes.data
        self._end = self._begin + array.nbytes

    def load(self) -> np.ndarray:
        arr = self._array.copy()
        self.release()
        return arr

    def release(self) -> None:
        for option in (_COLD, _DONTNEED):
            if option is not None:
                _advise(self._map, option, self._begin, self._end, inward=True)

    def prefetch(self) -> None:
        if _WILLNEED is not None:
            _advise(self._map, _WILLNEED, self._begin, self._end, inward=False)


def view_ref(array: np.ndarray) -> TensorRef:
    """A ``ViewRef`` if ``array`` is a contiguous view of an ``mmap``, else an ``ArrayRef``."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if isinstance(base, mmap.mmap) and array.flags.c_contiguous and array.nbytes:
        return ViewRef(array, base)
    return ArrayRef(array)


class ReaderRef(TensorRef):
    """A tensor read by a callable on each ``view()`` (one h5 dataset, one msgpack leaf)."""

    def __init__(self, shape, dtype, read):
        self.shape, self.dtype_name, self._read = tuple(shape), np.dtype(dtype).name, read

    def view(self) -> np.ndarray:
        return self._read()

    load = view


class MappedFile:
    """One safetensors file mapped into memory; ``refs()`` gives a ``MappedRef`` per tensor."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header = read_safetensors_header(self.path)
        self._mmap = None
        if self.header.file_size > self.header.data_start:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private mapping, writable views (torch wants them), writes stay private.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def refs(self) -> dict:
        return {name: MappedRef(self, entry) for name, entry in self.header.entries.items()}

    def span(self, begin: int, end: int) -> np.ndarray:
        start = self.header.data_start
        return np.frombuffer(self._mmap, dtype=np.uint8, count=end - begin, offset=start + begin)

    def drop_cached(self, begin: int, end: int) -> None:
        """Drop the file's pages wholly inside a byte span of the data buffer from the page cache
        (``posix_fadvise(POSIX_FADV_DONTNEED)``; pages still mapped anywhere stay)."""
        lo, hi = _pages(self.header.data_start + begin, self.header.data_start + end, inward=True)
        if hi > lo and hasattr(os, "posix_fadvise"):
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:     # advice only: a file gone or a refusal costs memory pressure, not data
                pass

    def advise(self, option: int, begin: int, end: int, inward: bool) -> None:
        """``madvise`` over the pages of a byte span of the data buffer (see ``_advise``)."""
        if self._mmap is not None:
            _advise(self._mmap, option, self.header.data_start + begin, self.header.data_start + end, inward)


def _pages(lo: int, hi: int, inward: bool) -> tuple:
    """The page-aligned span of the byte span ``[lo, hi)``: the pages wholly inside it (``inward``, so a
    neighbour's data is never dropped) or every page it touches."""
    if inward:
        return -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
    return lo // _PAGE * _PAGE, -(-hi // _PAGE) * _PAGE


def _advise(mapping: mmap.mmap, option: int, lo: int, hi: int, inward: bool) -> None:
    """``madvise`` over the pages of the byte span ``[lo, hi)`` of a mapped file.

    ``inward`` keeps to pages wholly inside the span, so a neighbour's data is never dropped.
    """
    if not hasattr(mapping, "madvise"):
        return
    lo, hi = _pages(lo, hi, inward)
    hi = min(hi, len(mapping))
    if hi > lo:
        try:
            mapping.madvise(option, lo, hi - lo)
        except (OSError, ValueError):   # an advice the platform refuses only costs memory or time
            pass


class MappedRef(TensorRef):
    """A tensor of a mapped safetensors file."""

    drop_cached = False     # ``release`` also drops the pages from the page cache (``in_order`` decides)

    def __init__(self, file: MappedFile, entry):
        self._file, self._entry = file, entry
        self.shape = tuple(entry.shape)
        self.dtype_name = SAFETENSORS_TO_NAME[entry.dtype]

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype_name, f"{self._file.path}: tensor {self._entry.name!r}")

    def view(self) -> np.ndarray:
        return self._array(self.dtype)

    def raw(self) -> np.ndarray:
        return self._array(_RAW[self.dtype_name]) if self.dtype_name in _RAW else self.view()

    def _array(self, dtype: np.dtype) -> np.ndarray:
        e = self._entry
        if e.end == e.begin:
            return np.zeros(self.shape, dtype)
        little = dtype.newbyteorder("<") if dtype.itemsize > 1 and dtype.kind in "fiub" else dtype
        arr = self._file.span(e.begin, e.end).view(little).reshape(self.shape)
        if sys.byteorder != "little" and arr.dtype.itemsize > 1:   # pragma: no cover - big-endian hosts
            arr = arr.astype(dtype)
        return arr

    def load(self) -> np.ndarray:
        arr = self.view().copy()
        self.release()
        return arr

    def release(self) -> None:
        if _COLD is not None:    # page cache: first to go under memory pressure (EINVAL on old kernels: ignored)
            self._file.advise(_COLD, self._entry.begin, self._entry.end, inward=True)
        if _DONTNEED is not None:
            self._file.advise(_DONTNEED, self._entry.begin, self._entry.end, inward=True)
        if self.drop_cached:     # this load does not fit beside the files: their read pages go now
            self._file.drop_cached(self._entry.begin, self._entry.end)

    def prefetch(self) -> None:
        if _WILLNEED is not None:
            self._file.advise(_WILLNEED, self._entry.begin, self._entry.end, inward=False)


# -- the page cache of a load that does not fit beside its files ------------------------------------------
# A float32 model loaded from a bfloat16 checkpoint allocates twice the files' bytes. Where the files (in the
# page cache, read ahead) and the new model do not both fit in memory, the kernel must reclaim the files'
# pages while the model's pages are being made, and that reclaim is slow: on this project's 2-vCPU VM
# (24 GiB), making 15 GB of new pages beside 7 GB of cached file took 27-31 s against 12 s with the file
# dropped first, and the 2.7B BLIP-2 float32 load took 16.2 -> 8.9 s (jax) and 8.6 -> 6.0 s (torch) with
# each tensor's pages dropped once converted (``benchmarks/load.py``). Such pages would be evicted anyway;
# dropping them ourselves (``posix_fadvise(POSIX_FADV_DONTNEED)``) is the cheap way. Where everything fits,
# the page cache is left alone, so a second load reads the files from memory.
DROP_ENV = "BLIP_LOAD_DROP_PAGE_CACHE"   # auto (default) | 1 (always) | 0 (never)
FIT_FRACTION = 0.9      # of the kernel's MemAvailable that the files and the new model may fill together


def memory_available():
    """The kernel's estimate of memory available without swapping (``MemAvailable``), bytes; None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def drop_read_pages(new_bytes: int, file_bytes: int) -> bool:
    """Whether a load that allocates ``new_bytes`` while reading ``file_bytes`` of mapped files drops each
    released tensor's pages from the page cache: ``BLIP_LOAD_DROP_PAGE_CACHE=1`` / ``0`` say so; by default
    (``auto``) when both together exceed ``FIT_FRACTION`` of the available memory."""
    setting = env_word(DROP_ENV, "auto")
    if not hasattr(os, "posix_fadvise") or setting in OFF or setting == "never":
        return False
    if setting in ON or setting == "always":
        return True
    if setting not in ("", "auto"):
        raise ValueError(f"{DROP_ENV}={setting!r}: use auto, 1 or 0")
    available = memory_available()
    return available is not None and new_bytes + file_bytes > FIT_FRACTION * available


def map_safetensors(files) -> dict:
    """``{name: MappedRef}`` over one or more safetensors files (shards); a name twice is an error."""
    refs, where = {}, {}
    for path in files:
        for name, ref in MappedFile(path).refs().items():
            if name in refs:
                raise CheckpointError(f"{path}: tensor {name!r} is stored in both {where[name]} and "
                                      f"{os.path.basename(path)}")
            refs[name], where[name] = ref, os.path.basename(path)
    return refs


def in_order(items: list, ref=lambda item: item, lookahead_bytes: int = 512 * 2**20, new_itemsize=None):
    """Yield ``items`` in turn, asking the kernel to read up to ``lookahead_bytes`` of their refs ahead.

    ``ref(item)`` is the item's ``TensorRef``. Readahead of mapped files is how shards are read in
    parallel with the conversion: the kernel fills the page cache from the files while the
    caller converts the current tensor. ``new_itemsize(item)``: bytes per element of the host memory
    the caller allocates for that item (0: none, e.g. a zero-copy view or a tensor bound for a device);
    where given, ``drop_read_pages`` decides from their sum whether each released tensor's pages also
    leave the page cache.
    """
    refs = [ref(item) for item in items]
    if new_itemsize is not None:
        mapped = [r for r in refs if isinstance(r, MappedRef)]
        new_bytes = sum(r.size * new_itemsize(item) for item, r in zip(items, refs))
        drop = drop_read_pages(new_bytes, sum(r.nbytes for r in mapped))
        for r in mapped:
            r.drop_cached = drop
    ahead, queued = 0, 0
    for i, item in enumerate(items):
        while ahead < len(refs) and (ahead <= i or queued < lookahead_bytes):
            refs[ahead].prefetch()
            queued += refs[ahead].nbytes
            ahead += 1
        yield item
        queued -= refs[i].nbytes
