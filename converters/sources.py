"""Checkpoint readers with one interface: canonical names in, canonical-layout numpy arrays out.

Every reader exposes ``names()``, ``shape(name)`` and ``dtype(name)`` without reading tensor data
where the format allows it, and ``get(name)`` reads one tensor. safetensors (single or sharded),
``tf_model.h5`` and flax msgpack are read tensor by tensor (msgpack leaves are found by a scan of
its headers); ``.bin`` and original ``.pth`` files are unpickled a file (shard) at a time, their
format having no random access.
"""
from __future__ import annotations

import os

import numpy as np

from blip_core import checkpoint
from blip_core.checkpoint.dtypes import SAFETENSORS_TO_NAME, numpy_dtype
from blip_core.checkpoint.files import read_index
from blip_core.formats import flax_msgpack, hf_tf, original
from blip_core.safe_pickle import load_torch_state_dict

FORMATS = ("safetensors", "bin", "tf", "flax", "original")

# File names per format in a directory, in lookup order.
_DIR_FILES = (
    (checkpoint.SAFE_WEIGHTS_NAME, "safetensors"), (checkpoint.SAFE_WEIGHTS_INDEX_NAME, "safetensors"),
    (checkpoint.WEIGHTS_NAME, "bin"), (checkpoint.WEIGHTS_INDEX_NAME, "bin"),
    (hf_tf.TF_WEIGHTS_NAME, "tf"), (hf_tf.TF_WEIGHTS_INDEX_NAME, "tf"),
    (flax_msgpack.FLAX_WEIGHTS_NAME, "flax"), (flax_msgpack.FLAX_WEIGHTS_INDEX_NAME, "flax"),
)
_SUFFIXES = ((".safetensors.index.json", "safetensors"), (".safetensors", "safetensors"),
             (".bin.index.json", "bin"), (".bin", "bin"), (".h5.index.json", "tf"), (".h5", "tf"),
             (".msgpack.index.json", "flax"), (".msgpack", "flax"), (".pth", "original"), (".pt", "original"))


def detect_format(src, source_format: str | None = None) -> tuple:
    """``(format, weights path)`` of a checkpoint directory or file."""
    src = os.fspath(src)
    if source_format is not None and source_format not in FORMATS:
        raise ValueError(f"unknown source_format {source_format!r}; choose one of {', '.join(FORMATS)}")
    if os.path.isdir(src):
        for name, fmt in _DIR_FILES:
            if (source_format in (None, fmt)) and os.path.isfile(os.path.join(src, name)):
                return fmt, os.path.join(src, name)
        pths = sorted(n for n in os.listdir(src) if n.endswith((".pth", ".pt")))
        if source_format in (None, "original") and len(pths) == 1:
            return "original", os.path.join(src, pths[0])
        wanted = f" in format {source_format!r}" if source_format else ""
        raise FileNotFoundError(
            f"{src}: no checkpoint{wanted} found (looked for {', '.join(n for n, _ in _DIR_FILES)} "
            f"or a single original .pth)")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    if source_format is not None:
        return source_format, src
    for suffix, fmt in _SUFFIXES:
        if src.endswith(suffix):
            return fmt, src
    raise ValueError(f"{src}: cannot tell the checkpoint format from the file name; pass source_format=")


def canonical_shape(spec, backend_shape: tuple) -> tuple:
    """Invert the row's layout transform on a shape (no data touched)."""
    shape = tuple(backend_shape)
    if spec.transform.name == "linear" and len(shape) == 2:
        return shape[::-1]
    if spec.transform.name == "conv2d" and len(shape) == 4:   # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


class Source:
    """Base reader. ``unexpected`` lists stored names the table cannot place; ``notes`` are remarks."""

    format = ""

    def __init__(self):
        self.unexpected: list = []
        self.notes: list = []
        self.files: list = []

    def names(self) -> list:
        raise NotImplementedError

    def shape(self, name) -> tuple:
        raise NotImplementedError

    def dtype(self, name) -> np.dtype:
        raise NotImplementedError

    def get(self, name) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DictSource(Source):
    """A state dict already in memory (``.bin``, original ``.pth``)."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def names(self):
        return list(self._state)

    def shape(self, name):
        return tuple(np.shape(self._state[name]))

    def dtype(self, name):
        return np.asarray(self._state[name]).dtype

    def get(self, name):
        return np.asarray(self._state[name])


class SafetensorsSource(Source):
    """Single or sharded safetensors, read one tensor at a time from its byte span."""

    format = "safetensors"

    def __init__(self, path):
        super().__init__()
        path = os.fspath(path)
        if os.path.isdir(path):
            single = os.path.join(path, checkpoint.SAFE_WEIGHTS_NAME)
            path = single if os.path.isfile(single) else os.path.join(path, checkpoint.SAFE_WEIGHTS_INDEX_NAME)
        if path.endswith(".json"):
            folder = os.path.dirname(path)
            self.files = [os.path.join(folder, s) for s in dict.fromkeys(read_index(path).values())]
        else:
            self.files = [path]
        self._entries = {}
        for file in self.files:
            header = checkpoint.read_safetensors_header(file)
            for name, entry in header.entries.items():
                if name in self._entries:
                    raise checkpoint.CheckpointError(f"{file}: tensor {name!r} is stored in two shards")
                self._entries[name] = (header, entry)

    def names(self):
        return list(self._entries)

    def shape(self, name):
        return tuple(self._entries[name][1].shape)

    def dtype(self, name):
        entry = self._entries[name][1]
        return numpy_dtype(SAFETENSORS_TO_NAME[entry.dtype], f"tensor {name!r}")

    def get(self, name):
        header, entry = self._entries[name]
        arr = np.empty(entry.shape, dtype=self.dtype(name).newbyteorder("<"))
        nbytes = entry.end - entry.begin
        if nbytes:
            with open(header.path, "rb") as f:
                f.seek(header.data_start + entry.begin)
                if f.readinto(arr.reshape(-1).view(np.uint8)) != nbytes:
                    raise checkpoint.CheckpointError(f"{header.path}: tensor {name!r} is truncated")
        return arr


class TFSource(Source):
    """``tf_model.h5`` with Hugging Face TF names, placed by the table (``hf_tf.tf_names``)."""

    format = "tf"

    def __init__(self, path, table: dict, architecture: str):
        super().__init__()
        self._h5 = hf_tf.open_tf_weights(path)
        self.files = list(self._h5.files)
        self._table = table
        self._key = {name: key for name, key in hf_tf.tf_names(table, architecture).items() if key in self._h5}
        known = set(self._key.values())
        self.unexpected = [k for k in self._h5.keys() if k not in known]

    def names(self):
        return list(self._key)

    def shape(self, name):
        return canonical_shape(self._table[name], self._h5.shape(self._key[name]))

    def dtype(self, name):
        return self._h5.dtype(self._key[name])

    def get(self, name):
        return self._table[name].from_backend("tf", self._h5.read(self._key[name]))

    def close(self):
        self._h5.close()


class FlaxSource(Source):
    """``flax_model.msgpack``: the param tree at the table's jax paths, read leaf by leaf."""

    format = "flax"

    def __init__(self, path, table: dict):
        super().__init__()
        self._msgpack = flax_msgpack.FlaxWeights(path)
        self.files = list(self._msgpack.files)
        self._table = table
        self._path = {name: p for name, p in flax_msgpack.flax_paths(table).items() if p in self._msgpack}
        known = set(self._path.values())
        self.unexpected = ["/".join(p) for p in self._msgpack.keys() if p not in known]

    def names(self):
        return list(self._path)

    def shape(self, name):
        return canonical_shape(self._table[name], self._msgpack.shape(self._path[name]))

    def dtype(self, name):
        return self._msgpack.dtype(self._path[name])

    def get(self, name):
        return self._table[name].from_backend("jax", self._msgpack.read(self._path[name]))


class BinSource(Source):
    """``pytorch_model.bin`` (single or sharded), through the restricted unpickler, one file at a time."""

    format = "bin"

    def __init__(self, path, allow_pickle_bin: bool):
        super().__init__()
        path = os.fspath(path)
        if not allow_pickle_bin:
            checkpoint.load_state_dict(path, allow_pickle_bin=False)   # raises the opt-in error
        self._cached = (None, {})
        if path.endswith(".json"):
            folder = os.path.dirname(path)
            self._file_of = {k: os.path.join(folder, v) for k, v in read_index(path).items()}
        else:
            self._cached = (path, load_torch_state_dict(path))
            self._file_of = dict.fromkeys(self._cached[1], path)
        self.files = list(dict.fromkeys(self._file_of.values()))

    def _state(self, name) -> dict:
        file = self._file_of[name]
        if self._cached[0] != file:          # keep one shard in memory at a time
            self._cached = (None, {})
            self._cached = (file, load_torch_state_dict(file))
        if name not in self._cached[1]:
            raise checkpoint.CheckpointError(f"{file}: the index lists {name!r} but the shard does not hold it")
        return self._cached[1]

    def names(self):
        return list(self._file_of)

    def shape(self, name):
        return tuple(self._state(name)[name].shape)

    def dtype(self, name):
        return self._state(name)[name].dtype

    def get(self, name):
        return self._state(name)[name]


class OriginalSource(DictSource):
    """Original BLIP / LAVIS ``.pth`` renamed to canonical names (``formats.original``).

    ``state``: the file's state dict when the caller has already read it (to infer a config).
    Towers the file leaves out come from other checkpoints (``converters.components``).
    """

    format = "original"

    def __init__(self, path, table: dict, architecture: str, allow_pickle_bin: bool, state=None):
        if state is None:
            state = original.load_original_state_dict(path, allow_pickle_bin=allow_pickle_bin)
        renamed, unused = original.rename_original(state, table, architecture)
        super().__init__(renamed)
        self.files = [os.fspath(path)]
        if unused:
            shown = ", ".join(unused[:6]) + (", ..." if len(unused) > 6 else "")
            self.notes.append(f"left out {len(unused)} original key(s) {architecture} has no place for: {shown}")


def open_source(fmt: str, path, table: dict, architecture: str, allow_pickle_bin: bool = False,
                state=None) -> Source:
    """The reader for ``fmt`` (see ``detect_format``)."""
    if fmt == "safetensors":
        return SafetensorsSource(path)
    if fmt == "bin":
        return BinSource(path, allow_pickle_bin)
    if fmt == "tf":
        return TFSource(path, table, architecture)
    if fmt == "flax":
        return FlaxSource(path, table)
    if fmt == "original":
        return OriginalSource(path, table, architecture, allow_pickle_bin, state)
    raise ValueError(f"unknown format {fmt!r}")
