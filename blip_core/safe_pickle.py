"""Read PyTorch ``.bin`` state dicts into numpy without torch and without running pickled code.

``torch.save`` (since torch 1.6) writes a zip archive::

    <prefix>/data.pkl       pickle (protocol 2) of the state dict
    <prefix>/data/<key>     raw bytes of each storage
    <prefix>/byteorder      "little" or "big" (absent in old files: little)

Tensors in ``data.pkl`` are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
calls whose storage is a persistent id ``("storage", torch.FloatStorage, key, location, numel)``.
The unpickler below resolves only the handful of globals a state dict needs, each to a local
stand-in that builds numpy arrays; every other global (``os.system``, ``builtins.eval``, any
class) is refused with ``CheckpointError`` before anything is called. Storages shared by several
tensors (tied weights) are read once, and contiguous views share that memory as they do in torch;
strided views (a transpose) are materialised as contiguous copies.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import zipfile

import numpy as np

from blip_core.checkpoint.dtypes import numpy_dtype
from blip_core.checkpoint.errors import CheckpointError

# torch.<Name>Storage -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only carries the element dtype name."""

    def __init__(self, torch_name: str):
        self.torch_name = torch_name
        self.dtype_name = _STORAGE_DTYPES[torch_name]

    def __repr__(self) -> str:
        return f"torch.{self.torch_name}"


class _Storage:
    """A storage read from the archive: a flat array of elements."""

    def __init__(self, key: str, data: np.ndarray):
        self.key = key
        self.data = data


def _rebuild_tensor(path: str):
    """Our version of ``torch._utils._rebuild_tensor_v2`` producing numpy arrays."""

    def rebuild(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                metadata=None):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{path}: tensor built from {type(storage).__name__}, not a storage")
        size, stride = tuple(size), tuple(stride)
        ok = (isinstance(storage_offset, int) and storage_offset >= 0 and len(size) == len(stride)
              and all(isinstance(v, int) and v >= 0 for v in size + stride))
        if not ok:
            raise CheckpointError(f"{path}: invalid tensor geometry offset={storage_offset!r} "
                                  f"size={size!r} stride={stride!r} (storage {storage.key})")
        flat = storage.data
        if 0 in size:
            return np.empty(size, dtype=flat.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise CheckpointError(
                f"{path}: tensor (offset {storage_offset}, size {size}, stride {stride}) reaches "
                f"element {last} of storage {storage.key} which holds only {flat.size}")
        contiguous = all(st == int(np.prod(size[i + 1:], dtype=np.int64))
                         for i, (n, st) in enumerate(zip(size, stride)) if n != 1)
        numel = int(np.prod(size, dtype=np.int64))
        if contiguous:  # a true view: tensors sharing a storage keep sharing memory
            return flat[storage_offset:storage_offset + numel].reshape(size)
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
        return np.ascontiguousarray(view)

    return rebuild


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    # A Parameter is just its data here; state (torch>=2.0 _rebuild_parameter_with_state) is dropped.
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str, archive: zipfile.ZipFile, prefix: str, byteorder: str, mapping=None):
        super().__init__(fh)
        self._path, self._zip, self._prefix, self._byteorder = path, archive, prefix, byteorder
        self._map = mapping     # the file mapped (``mmap``): stored records become views of it
        self._storages: dict = {}
        self._allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor(path),
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._path}: refused to unpickle global '{module}.{name}': only plain tensor state "
            "dicts are loaded (no arbitrary objects or code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = _Storage(key, self._read_storage(key, stype, numel))
        return self._storages[key]

    def _read_storage(self, key: str, stype: _StorageType, numel: int) -> np.ndarray:
        dtype = numpy_dtype(stype.dtype_name, f"{self._path}: storage {key} ({stype!r})")
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage record {name!r} is missing") from None
        # Check the declared size before reading anything (guards against zip bombs too).
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(
                f"{self._path}: storage {key} holds {info.file_size} bytes but {numel} x "
                f"{stype.dtype_name} needs {numel * dtype.itemsize}")
        if self._map is not None and info.compress_type == zipfile.ZIP_STORED and (
                self._byteorder == "little" or dtype.itemsize == 1):
            return np.frombuffer(self._map, dtype=dtype, count=numel, offset=self._record_start(info, key))
        flat = np.empty(numel, dtype=dtype)
        buf = flat.view(np.uint8)
        with self._zip.open(info) as fh:
            done = 0
            while done < buf.size:
                got = fh.readinto(buf[done:])
                if not got:
                    raise CheckpointError(f"{self._path}: storage {key} is truncated")
                done += got
        if self._byteorder == "big" and dtype.itemsize > 1:
            swapped = flat.view(f"u{dtype.itemsize}").byteswap()
            flat = swapped.view(dtype)
        return flat


    def _record_start(self, info: zipfile.ZipInfo, key: str) -> int:
        """Offset in the file of a stored (uncompressed) record's bytes, from its local header, checked."""
        head = self._map[info.header_offset:info.header_offset + 30]
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self._path}: storage {key}: bad zip local header")
        start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        if start + info.file_size > len(self._map):
            raise CheckpointError(f"{self._path}: storage {key} is truncated")
        return start


def _open_archive(path: str) -> tuple:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint (the legacy pre-1.6 torch.save format and plain "
            "pickles are not supported; re-save with a recent torch or convert to safetensors)")
    archive = zipfile.ZipFile(path)
    pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        archive.close()
        raise CheckpointError(f"{path}: expected exactly one '<prefix>/data.pkl' record, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            archive.close()
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
    return archive, prefix, byteorder


def unpickle_torch_zip(path, mapped: bool = False):
    """The object stored by ``torch.save`` with tensors as numpy arrays (restricted globals only).

    Nested containers (dicts, lists, tuples, numbers, strings) come back as they are; use
    :func:`load_torch_state_dict` for the common flat ``{name: tensor}`` case. ``mapped=True``: the
    file is memory-mapped (private, copy-on-write) and contiguous tensors of stored little-endian
    records (what ``torch.save`` writes) are views of it, read from disk only when used.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    archive, prefix, byteorder = _open_archive(path)
    mapping = None
    if mapped and os.path.getsize(path):
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    with archive:
        data = archive.read(f"{prefix}data.pkl")
        unpickler = _RestrictedUnpickler(io.BytesIO(data), path, archive, prefix, byteorder, mapping)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as exc:  # malformed pickle stream: say so, with the file name
            raise CheckpointError(f"{path}: data.pkl could not be unpickled ({type(exc).__name__}: {exc})") from exc


def load_torch_state_dict(path, mapped: bool = False) -> dict:
    """A flat ``{name: np.ndarray}`` state dict from a ``torch.save`` zip file (e.g. pytorch_model.bin);
    ``mapped``: arrays are views of the memory-mapped file where they can be (see ``unpickle_torch_zip``)."""
    obj = unpickle_torch_zip(path, mapped=mapped)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(
            f"{os.fspath(path)}: not a flat tensor state dict; entries that are not tensors: {bad[:10]}")
    return dict(obj)
