"""Flax ``flax_model.msgpack``: flax.serialization's encoding, read and written with msgpack alone.

The file is one msgpack map: the param tree, nested at the weight table's jax paths
(``("vision_model", "encoder", "layers_0", "mlp", "fc1", "kernel")``), leaves in jax layout. That
is what ``flax.serialization.to_bytes(params)`` writes for our Flax modules (and what
transformers' Flax classes write for theirs: no ``"params"`` wrapper). Leaf encoding, as flax:

* an array is msgpack ext type 1 whose payload is the msgpack triple
  ``(shape, dtype name, raw C-order bytes)``; ``bfloat16`` is spelled ``"bfloat16"``;
* an array above 2**30 bytes becomes ``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ..},
  "chunks": {"0": flat chunk, ..}}`` (msgpack objects are limited to 2**31 bytes).

Sharded checkpoints follow transformers: ``flax_model-0000i-of-0000N.msgpack`` each holding a
flat map ``{"a/b/c": leaf}`` plus ``flax_model.msgpack.index.json``.

The writer streams: map headers are known from the paths up front and each leaf is fetched,
written and dropped in turn. msgpack is imported lazily.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"
MAX_CHUNK_SIZE = 2 ** 30
_CHUNKED = "__msgpack_chunked_array__"
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3


def flax_paths(table: dict) -> dict:
    """``{canonical name: jax path tuple}`` for the rows a Flax param tree holds (owned rows)."""
    return {name: spec.backend_path("jax") for name, spec in table.items() if spec.tied_to is None}


def _msgpack():
    try:
        import msgpack
    except ImportError as exc:
        raise ImportError("flax_model.msgpack files need the 'msgpack' package (pip install msgpack)") from exc
    return msgpack


def _dtype(name: str) -> np.dtype:
    from ..checkpoint.dtypes import numpy_dtype  # ml_dtypes for bfloat16, lazily
    return numpy_dtype(name, "flax_model.msgpack")


# -- reading -----------------------------------------------------------------------------------
# A small msgpack scanner: it reads headers and skips array payloads, so that opening a file costs
# no memory and each leaf is read from its byte span later (one tensor at a time).
_FIXED = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
          0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_LEN = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xC7: ">B", 0xC8: ">H", 0xC9: ">I", 0xD9: ">B", 0xDA: ">H",
        0xDB: ">I", 0xDC: ">H", 0xDD: ">I", 0xDE: ">H", 0xDF: ">I"}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


class _Leaf:
    """An array stored at ``offset`` of ``file`` (flax's ext payload), not yet read."""

    def __init__(self, file, offset, shape, dtype_name, scalar):
        self.file, self.offset, self.shape, self.dtype_name, self.scalar = file, offset, shape, dtype_name, scalar

    def load(self) -> np.ndarray:
        dtype = _dtype(self.dtype_name)
        arr = np.empty(self.shape, dtype=dtype.newbyteorder("<"))
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            if arr.nbytes and f.readinto(arr.reshape(-1).view(np.uint8)) != arr.nbytes:
                raise ValueError(f"{self.file}: array data truncated")
        return arr


class _Chunked:
    """flax's chunked form of an array above MAX_CHUNK_SIZE bytes."""

    def __init__(self, node, file):
        try:
            self.shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
            self.chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        except (KeyError, TypeError):
            raise ValueError(f"{file}: malformed chunked array") from None
        self.dtype_name = self.chunks[0].dtype_name if self.chunks else "float32"

    def load(self) -> np.ndarray:
        return np.concatenate([c.load().reshape(-1) for c in self.chunks]).reshape(self.shape)


def _take(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("unexpected end of file")
    return data


def _num(f, fmt: str):
    return struct.unpack(fmt, _take(f, struct.calcsize(fmt)))[0]


def _ext(f, code: int, size: int, file: str):
    start = f.tell()
    if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise ValueError(f"unsupported msgpack extension type {code}")
    if _take(f, 1)[0] != 0x93:
        raise ValueError("malformed array leaf")
    shape, dtype_name = _parse(f, file), _parse(f, file)
    marker = _take(f, 1)[0]
    if marker not in (0xC4, 0xC5, 0xC6):
        raise ValueError("array leaf without a binary payload")
    nbytes = _num(f, _LEN[marker])
    offset = f.tell()
    if offset + nbytes != start + size:
        raise ValueError("array leaf sizes disagree")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"array leaf with shape {shape!r}")
    # the payload must hold the array exactly: a shorter one would be read on into the bytes that follow
    want = int(np.prod(shape, dtype=np.int64)) * _dtype(str(dtype_name)).itemsize
    if nbytes != want:
        raise ValueError(f"array leaf of shape {tuple(shape)} {dtype_name} holds {nbytes} bytes, not {want}")
    f.seek(offset + nbytes)
    return _Leaf(file, offset, tuple(shape), str(dtype_name), code == _EXT_NPSCALAR)


def _parse(f, file: str):
    """One msgpack object; arrays become ``_Leaf`` descriptors, maps dicts (chunked arrays ``_Chunked``)."""
    b = _take(f, 1)[0]
    if b <= 0x7F or b >= 0xE0:
        return b if b <= 0x7F else b - 0x100
    if b in _FIXED:
        return _num(f, _FIXED[b])
    n = None
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        n = b & 0x0F if b <= 0x8F else _num(f, _LEN[b])
        node = {}
        for _ in range(n):
            key = _parse(f, file)
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key in node:
                raise ValueError(f"the key {key!r} appears twice in one map")
            node[key] = _parse(f, file)
        return _Chunked(node, file) if node.get(_CHUNKED) is True else node
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        n = b & 0x0F if b <= 0x9F else _num(f, _LEN[b])
        return [_parse(f, file) for _ in range(n)]
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        return _take(f, b & 0x1F if b <= 0xBF else _num(f, _LEN[b])).decode("utf-8")
    if b in (0xC4, 0xC5, 0xC6):
        return _take(f, _num(f, _LEN[b]))
    if b in (0xC7, 0xC8, 0xC9):
        size = _num(f, _LEN[b])
        return _ext(f, _num(f, ">b"), size, file)
    if b in _FIXEXT:
        return _ext(f, _num(f, ">b"), _FIXEXT[b], file)
    if b in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[b]
    raise ValueError(f"unsupported msgpack type byte 0x{b:02x}")


def _flatten(node, prefix: tuple, out: dict, file: str) -> None:
    for key, value in node.items():
        path = prefix + tuple(key.split("/"))   # flat shard keys are "/"-joined
        if isinstance(value, dict):
            _flatten(value, path, out, file)
        elif isinstance(value, (_Leaf, _Chunked)):
            if path in out:
                raise ValueError(f"{file}: {'/'.join(path)} is stored twice")
            out[path] = value
        else:
            raise ValueError(f"{file}: {'/'.join(path)} holds a {type(value).__name__}, not an array")


def _scan_file(path: str, out: dict) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            tree = _parse(f, path)
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise ValueError(f"{path}: not a flax msgpack checkpoint ({exc})") from None
        if f.tell() > size:
            raise ValueError(f"{path}: truncated: the param tree runs {f.tell() - size} bytes past the end of the file")
        if f.tell() != size:
            raise ValueError(f"{path}: {size - f.tell()} bytes of trailing data after the param tree")
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a param tree (map) at the top level, got {type(tree).__name__}")
    _flatten(tree, (), out, path)


class FlaxWeights:
    """Lazy access to a msgpack checkpoint (file, shard index or directory): one leaf at a time."""

    def __init__(self, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            single, index = os.path.join(path, FLAX_WEIGHTS_NAME), os.path.join(path, FLAX_WEIGHTS_INDEX_NAME)
            path = single if os.path.isfile(single) else index
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {FLAX_WEIGHTS_NAME} or {FLAX_WEIGHTS_INDEX_NAME} at {path}")
        if path.endswith(".json"):
            from ..checkpoint.files import read_index
            weight_map = read_index(path)
            self.files = [os.path.join(os.path.dirname(path), os.path.basename(s))
                          for s in dict.fromkeys(weight_map.values())]
        else:
            self.files = [path]
        self._leaves: dict = {}
        for file in self.files:
            _scan_file(file, self._leaves)

    def keys(self) -> list:
        return list(self._leaves)

    def __contains__(self, path) -> bool:
        return path in self._leaves

    def shape(self, path) -> tuple:
        return self._leaves[path].shape

    def dtype(self, path) -> np.dtype:
        return _dtype(self._leaves[path].dtype_name)

    def read(self, path) -> np.ndarray:
        return self._leaves[path].load()


def read_flax_weights(path) -> dict:
    """``{jax path tuple: np.ndarray}`` from a msgpack file, shard index or directory (all leaves)."""
    weights = FlaxWeights(path)
    return {key: weights.read(key) for key in weights.keys()}


# -- writing -----------------------------------------------------------------------------------
def _write_ext_array(f, arr: np.ndarray) -> None:
    msgpack = _msgpack()
    packer = msgpack.Packer(use_bin_type=True)
    arr = np.asarray(arr, order="C")
    inner = (packer.pack_array_header(3) + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name)
             + b"\xc6" + struct.pack(">I", arr.nbytes))
    f.write(b"\xc9" + struct.pack(">I", len(inner) + arr.nbytes) + struct.pack("b", _EXT_NDARRAY))
    f.write(inner)
    if arr.nbytes:
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _write_leaf(f, arr: np.ndarray) -> None:
    if arr.nbytes <= MAX_CHUNK_SIZE:
        _write_ext_array(f, arr)
        return
    packer = _msgpack().Packer(use_bin_type=True)
    flat = np.asarray(arr, order="C").reshape(-1)
    step = max(1, MAX_CHUNK_SIZE // arr.dtype.itemsize)
    starts = range(0, flat.size, step)
    f.write(packer.pack_map_header(3) + packer.pack(_CHUNKED) + packer.pack(True))
    f.write(packer.pack("shape") + packer.pack({str(i): int(d) for i, d in enumerate(arr.shape)}))
    f.write(packer.pack("chunks") + packer.pack_map_header(len(starts)))
    for i, start in enumerate(starts):
        f.write(packer.pack(str(i)))
        _write_ext_array(f, flat[start: start + step])


def _write_tree(f, node: dict, on_tensor) -> None:
    packer = _msgpack().Packer(use_bin_type=True)
    f.write(packer.pack_map_header(len(node)))
    for key, child in node.items():
        f.write(packer.pack(key))
        if isinstance(child, dict):
            _write_tree(f, child, on_tensor)
        else:
            arr = child()
            _write_leaf(f, arr)
            on_tensor(arr)


def _tree(paths_and_fetch) -> dict:
    root: dict = {}
    for path, fetch in paths_and_fetch:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"jax path {'/'.join(path)} runs through a leaf")
        if path[-1] in node:
            raise ValueError(f"duplicate jax path {'/'.join(path)}")
        node[path[-1]] = fetch
    return root


def write_flax_weights(directory, items: list, max_shard_size=None, on_tensor=None) -> list:
    """Write ``items`` = ``[(jax path tuple, shape, dtype, fetch)]`` as ``flax_model.msgpack``.

    ``fetch()`` returns the leaf in jax layout; leaves are written one at a time. Returns the file
    names written; ``max_shard_size`` gives transformers' sharded layout.
    """
    from ..checkpoint import plan_shards

    on_tensor = on_tensor or (lambda arr: None)
    shards = [[it[0] for it in items]]
    if max_shard_size is not None:
        sized = {it[0]: np.broadcast_to(np.zeros((), it[2]), it[1]) for it in items}
        shards = plan_shards(sized, max_shard_size)
    meta = {it[0]: it for it in items}
    fetch = {p: it[3] for p, it in meta.items()}
    if len(shards) == 1:
        with open(os.path.join(directory, FLAX_WEIGHTS_NAME), "wb") as f:
            _write_tree(f, _tree((p, fetch[p]) for p in shards[0]), on_tensor)
        return [FLAX_WEIGHTS_NAME]
    files, weight_map, total = [], {}, 0
    for i, paths in enumerate(shards):
        file_name = f"flax_model-{i + 1:05d}-of-{len(shards):05d}.msgpack"
        flat = {"/".join(p): fetch[p] for p in paths}
        with open(os.path.join(directory, file_name), "wb") as f:
            _write_tree(f, flat, on_tensor)
        for p in paths:
            _, shape, dtype, _ = meta[p]
            weight_map["/".join(p)] = file_name
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        files.append(file_name)
    with open(os.path.join(directory, FLAX_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                            sort_keys=True) + "\n")
    return files + [FLAX_WEIGHTS_INDEX_NAME]


def read_flax_state_dict(path, table: dict) -> dict:
    """A msgpack checkpoint as ``{canonical name: array}`` in canonical layout (for ``check_state_dict``)."""
    return {name: ref.view() for name, ref in open_flax_state(path, table).items()}


def open_flax_state(path, table: dict) -> dict:
    """As ``read_flax_state_dict``, but ``{canonical name: TensorRef}`` read one leaf at a time."""
    from ..checkpoint.mapped import ReaderRef
    weights = FlaxWeights(path)
    paths = flax_paths(table)
    known = set(paths.values())
    unknown = ["/".join(k) for k in weights.keys() if k not in known]
    if unknown:
        raise ValueError(f"{path}: msgpack leaves the table has no place for: {unknown[:10]}")
    refs = {}
    for name, p in paths.items():
        if p in weights:
            spec = table[name]
            shape = spec.transform.canonical_shape(weights.shape(p))
            refs[name] = ReaderRef(shape, weights.dtype(p), lambda s=spec, k=p: s.from_backend("jax", weights.read(k)))
    return refs
