"""Read and write the safetensors format with numpy alone, bfloat16 included.

Layout of a file: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the raw
data buffer. The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [b, e]}``
(offsets relative to the buffer start) plus an optional ``"__metadata__"`` string map.

``safetensors.numpy`` cannot hold bfloat16 (numpy has no such type), which BLIP-2 checkpoints
use, so this module implements the format itself. Files it writes are byte-identical to those of
the Rust writer (same tensor order, compact JSON, header padded with spaces to 8 bytes).
Every malformed input raises ``CheckpointError`` naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import uuid
from dataclasses import dataclass

import numpy as np

from .dtypes import NAME_TO_SAFETENSORS, SAFETENSORS_RANK, SAFETENSORS_TO_NAME, numpy_dtype
from .errors import CheckpointError

# The reference implementation refuses headers above 100 MB; a larger length means garbage.
MAX_HEADER_BYTES = 100_000_000
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
DEFAULT_METADATA = {"format": "pt"}  # what transformers writes; some loaders check it


@dataclass(frozen=True)
class TensorEntry:
    """One header row: dtype tag (``"F32"``...), shape and byte span in the data buffer."""

    name: str
    dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)   # Python ints: a hostile shape cannot overflow the count


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header; ``data_start`` is the file offset of the data buffer."""

    path: str
    metadata: dict
    entries: dict  # name -> TensorEntry, in header order
    data_start: int
    file_size: int


def _fail(path, problem: str):
    raise CheckpointError(f"{path}: {problem}")


def _is_int(x) -> bool:
    return type(x) is int  # bool is an int subclass but never a valid size


def _parse_entry(path, name, info, buffer_size: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        _fail(path, f"tensor {name!r}: header entry must have dtype, shape and data_offsets, got {info!r}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if tag not in _ITEMSIZE:
        _fail(path, f"tensor {name!r}: unsupported dtype {tag!r} (supported: {', '.join(_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                    f"got {offsets!r}")
    entry = TensorEntry(name, tag, tuple(shape), offsets[0], offsets[1])
    need = entry.numel * _ITEMSIZE[tag]
    if entry.end - entry.begin != need:
        _fail(path, f"tensor {name!r}: data_offsets {offsets} span {entry.end - entry.begin} bytes "
                    f"but shape {list(shape)} of {tag} needs {need}")
    if entry.end > buffer_size:
        _fail(path, f"tensor {name!r}: data_offsets {offsets} go beyond the data buffer of "
                    f"{buffer_size} bytes (file truncated?)")
    return entry


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_header(f, path: str, file_size: int) -> SafetensorsHeader:
    if file_size < 8:
        _fail(path, f"file is {file_size} bytes, too short for the 8-byte header length "
                    "(empty, truncated or not a safetensors file)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        _fail(path, f"header length {n} is implausible (limit {MAX_HEADER_BYTES}): "
                    "not a safetensors file, or corrupt")
    if 8 + n > file_size:
        _fail(path, f"header length {n} runs beyond the file size of {file_size} bytes (truncated?)")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, f"header is not valid JSON ({exc})")
    except _DuplicateKey as exc:
        _fail(path, f"header names {exc.args[0]!r} twice (which one holds the data?)")
    if not isinstance(header, dict):
        _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _fail(path, f"__metadata__ must map strings to strings, got {metadata!r}")
    buffer_size = file_size - 8 - n
    entries = {name: _parse_entry(path, name, info, buffer_size) for name, info in header.items()}
    # As the reference reader requires, the tensors' bytes follow each other from the buffer's first byte to its
    # last: no byte belongs to two tensors, none to no tensor.
    at, previous = 0, None
    for begin, end, name in sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin):
        if begin < at:
            _fail(path, f"tensors {previous!r} and {name!r} overlap in the data buffer (corrupt header)")
        if begin > at:
            _fail(path, f"bytes {at}..{begin} of the data buffer, before tensor {name!r}, belong to no tensor")
        at, previous = end, name
    if at != buffer_size:
        _fail(path, f"the last {buffer_size - at} bytes of the data buffer belong to no tensor")
    return SafetensorsHeader(path, metadata, entries, 8 + n, file_size)


def read_safetensors_header(path) -> SafetensorsHeader:
    """Parse and validate the header only (cheap: no tensor data is read)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _parse_header(f, path, size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None


def _little_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 and dtype.kind in "fiub" else dtype


def read_safetensors(path) -> dict:
    """All tensors of a safetensors file as numpy arrays (each owning its memory), header order."""
    path = os.fspath(path)
    out = {}
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    with f:
        header = _parse_header(f, path, size)
        # Read in buffer order so the file is scanned sequentially.
        for entry in sorted(header.entries.values(), key=lambda e: e.begin):
            dtype = numpy_dtype(SAFETENSORS_TO_NAME[entry.dtype], f"{path}: tensor {entry.name!r}")
            arr = np.empty(entry.shape, dtype=_little_endian(dtype))
            nbytes = entry.end - entry.begin
            if nbytes:
                f.seek(header.data_start + entry.begin)
                got = f.readinto(arr.reshape(-1).view(np.uint8))
                if got != nbytes:
                    _fail(path, f"tensor {entry.name!r}: read {got} of {nbytes} bytes (file truncated?)")
            if sys.byteorder != "little" and arr.dtype.itemsize > 1:
                arr = arr.astype(dtype)  # to native order on big-endian hosts
            out[entry.name] = arr
    return {name: out[name] for name in header.entries}


def _tag_of(name: str, arr: np.ndarray) -> str:
    tag = NAME_TO_SAFETENSORS.get(arr.dtype.name)
    if tag is None:
        raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors "
                              f"(supported: {', '.join(sorted(NAME_TO_SAFETENSORS))})")
    return tag


def _layout(tensors: dict, metadata) -> tuple:
    """(header bytes incl. length prefix and padding, [(name, contiguous little-endian array)])."""
    if metadata is None:
        metadata = DEFAULT_METADATA
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata must map str to str, got {metadata!r}")
    rows = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise CheckpointError("'__metadata__' is reserved by the safetensors format")
        arr = np.asarray(value)
        tag = _tag_of(name, arr)
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
        arr = np.asarray(arr, dtype=_little_endian(arr.dtype), order="C")
        rows.append((name, tag, arr))
    # Largest dtype first, then by name: the Rust writer's order, which also keeps data aligned.
    rows.sort(key=lambda r: (-SAFETENSORS_RANK[r[1]], r[0]))
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, tag, arr in rows:
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body, [(name, arr) for name, _, arr in rows]


def _atomic_write(path: str, write) -> None:
    """Write via a uniquely named temp file in the same directory, then os.replace it in."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 honours the umask, so the final file gets ordinary permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> array) atomically; ``metadata`` defaults to ``{"format": "pt"}``.

    Pass ``metadata={}`` to write no ``__metadata__`` at all.
    """
    head, rows = _layout(tensors, metadata)

    def write(f):
        f.write(head)
        for _, arr in rows:
            if arr.nbytes:
                f.write(arr.reshape(-1).view(np.uint8).data)

    _atomic_write(os.fspath(path), write)
