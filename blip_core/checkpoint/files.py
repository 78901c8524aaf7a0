"""Checkpoint directories: find, load, save (sharded like transformers) and describe weights.

File names and the sharding rule follow transformers 4.57 ``save_pretrained``: a single
``model.safetensors``, or ``model-00001-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_parameters", "total_size"},
"weight_map": {name: shard}}``, sorted keys, indent 2). Shards are filled in state-dict order
and a new shard starts when the next tensor would overflow; a tensor larger than the limit gets
a shard of its own (huggingface_hub's ``split_state_dict_into_shards_factory``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile

import numpy as np

from ..jsonfile import INDEX_LIMIT, JsonFileError, read_json_file
from .dtypes import SAFETENSORS_TO_NAME
from .errors import CheckpointError
from .safetensors_io import read_safetensors, read_safetensors_header, write_safetensors

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# transformers' lookup order in a directory.
_LOOKUP = ((SAFE_WEIGHTS_NAME, "safetensors"), (SAFE_WEIGHTS_INDEX_NAME, "safetensors_index"),
           (WEIGHTS_NAME, "bin"), (WEIGHTS_INDEX_NAME, "bin_index"))
_OTHER_FORMATS = ("tf_model.h5", "flax_model.msgpack")
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
          "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB", "10MB", "500KB", "1.5GB" or "2GiB".

    Decimal units as huggingface_hub (which transformers' save_pretrained uses) parses them,
    case-insensitive; the binary KiB/MiB/GiB/TiB forms are accepted too.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    elif isinstance(size, str):
        text = size.strip().upper()
        unit = next((u for u in _UNITS if text.endswith(u)), None)
        try:
            value = int(float(text[: -len(unit)].strip()) * _UNITS[unit]) if unit else int(text)
        except ValueError:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 10MB, 500KB or an integer") from None
    else:
        raise TypeError(f"size must be an int or a string such as '5GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(tensors: dict, max_shard_size) -> list:
    """Lists of names, one per shard, by the huggingface_hub rule (see module docstring)."""
    limit = parse_size(max_shard_size)
    shards, current, current_size = [], [], 0
    for name, value in tensors.items():
        nbytes = np.asarray(value).nbytes
        if nbytes > limit:
            shards.append([name])
            continue
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(num_shards: int) -> list:
    if num_shards == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def save_state_dict(directory, tensors: dict, max_shard_size="5GB", metadata: dict | None = None) -> list:
    """Write ``tensors`` as transformers would and return the file names written.

    The whole set is first written into a temporary folder inside ``directory``; only then are
    files renamed into place (shards, then the index or single file, which is what loaders look
    for first) and the files of a previous save that the new set does not overwrite are removed,
    so the directory never mixes two saves' safetensors files. Tied duplicates should be removed
    first with ``strip_tied`` (transformers does not store them in safetensors).
    """
    directory = os.fspath(directory)
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    shards = plan_shards(arrays, max_shard_size)
    names = shard_file_names(len(shards))
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".blip-save-", dir=directory)
    try:
        for file_name, keys in zip(names, shards):
            write_safetensors(os.path.join(tmp, file_name), {k: arrays[k] for k in keys}, metadata)
        written = list(names)
        if len(names) > 1:
            index = {
                "metadata": {"total_parameters": int(sum(a.size for a in arrays.values())),
                             "total_size": int(sum(a.nbytes for a in arrays.values()))},
                "weight_map": {k: f for f, keys in zip(names, shards) for k in keys},
            }
            with open(os.path.join(tmp, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(SAFE_WEIGHTS_INDEX_NAME)
        for file_name in written:
            os.replace(os.path.join(tmp, file_name), os.path.join(directory, file_name))
        for file_name in os.listdir(directory):
            stale = (file_name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
                     or _SHARD_RE.fullmatch(file_name) is not None)
            full = os.path.join(directory, file_name)
            if stale and file_name not in written and os.path.isfile(full):
                os.remove(full)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def resolve_checkpoint(path) -> tuple:
    """(kind, file) for a checkpoint directory or file; kind is one of the ``_LOOKUP`` kinds."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name, kind in _LOOKUP:
            if os.path.isfile(os.path.join(path, name)):
                return kind, os.path.join(path, name)
        others = [n for n in _OTHER_FORMATS if os.path.isfile(os.path.join(path, n))]
        hint = f"; it holds {', '.join(others)}, which this loader does not read" if others else ""
        raise CheckpointError(f"{path}: no PyTorch-layout weights found (looked for "
                              f"{', '.join(n for n, _ in _LOOKUP)}){hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or directory")
    base = os.path.basename(path)
    if base.endswith(".safetensors"):
        return "safetensors", path
    if base.endswith(".safetensors.index.json"):
        return "safetensors_index", path
    if base.endswith(".bin.index.json"):
        return "bin_index", path
    if base.endswith((".bin", ".pt", ".pth")):
        return "bin", path
    raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, "
                          ".safetensors.index.json, .bin or .bin.index.json)")


def _refuse_pickle(path: str):
    raise CheckpointError(
        f"{path}: this is a pickle-based PyTorch checkpoint; it is only read when you opt in with "
        "allow_pickle_bin=True (a restricted unpickler that builds tensors only and refuses any "
        "other object), or convert it to safetensors first")


def read_index(index_path: str) -> dict:
    """The validated ``weight_map`` of a sharded checkpoint's index file."""
    try:
        index = read_json_file(index_path, limit=INDEX_LIMIT, expect=None, what="index")
    except JsonFileError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: index needs a 'weight_map' object of name -> shard file")
    for shard in set(weight_map.values()):
        # Shards live next to the index: refuse paths that would escape the folder.
        if shard in ("", ".", "..") or os.path.basename(shard) != shard or "\\" in shard:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name")
    return weight_map


def _load_sharded(index_path: str, reader) -> dict:
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise CheckpointError(f"{index_path}: missing shard file(s) {', '.join(absent)} in {folder}")
    state, found_in = {}, {}
    for shard in shards:
        for name, arr in reader(os.path.join(folder, shard)).items():
            if name in state:
                raise CheckpointError(f"{index_path}: tensor {name!r} is stored in both "
                                      f"{found_in[name]} and {shard}")
            state[name], found_in[name] = arr, shard
    wrong = [f"{k} (listed in {f}, found in {found_in.get(k, 'no shard')})"
             for k, f in weight_map.items() if found_in.get(k) != f]
    if wrong:
        raise CheckpointError(f"{index_path}: index and shards disagree: {'; '.join(wrong)}")
    return state


def load_state_dict(dir_or_file, allow_pickle_bin: bool = False) -> dict:
    """``{name: np.ndarray}`` from a checkpoint directory or weights file (any layout above).

    ``pytorch_model.bin`` files (and their sharded index) are read only with
    ``allow_pickle_bin=True``, through ``blip_core.safe_pickle``'s restricted unpickler.
    """
    kind, path = resolve_checkpoint(dir_or_file)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "safetensors_index":
        return _load_sharded(path, read_safetensors)
    if not allow_pickle_bin:
        _refuse_pickle(path)
    from blip_core.safe_pickle import load_torch_state_dict  # imported lazily: rarely needed
    if kind == "bin":
        return load_torch_state_dict(path)
    return _load_sharded(path, load_torch_state_dict)


def open_state_dict(dir_or_file, allow_pickle_bin: bool = False) -> dict:
    """``{name: TensorRef}`` from a checkpoint directory or weights file, reading no tensor data.

    safetensors files (single or sharded) are memory-mapped (``blip_core.checkpoint.mapped``); so is
    an opted-in ``pytorch_model.bin`` (its storage records are stored uncompressed by ``torch.save``:
    each contiguous tensor is a view of the mapping; the pickle itself is read whole).
    """
    from .mapped import map_safetensors, view_ref
    kind, path = resolve_checkpoint(dir_or_file)
    if kind == "safetensors":
        return map_safetensors([path])
    if kind == "safetensors_index":
        return _load_sharded(path, lambda shard: map_safetensors([shard]))
    if not allow_pickle_bin:
        _refuse_pickle(path)
    from blip_core.safe_pickle import load_torch_state_dict
    read = lambda file: load_torch_state_dict(file, mapped=True)     # noqa: E731
    state = read(path) if kind == "bin" else _load_sharded(path, read)
    return {name: view_ref(arr) for name, arr in state.items()}


def _count(info: dict, dtype_name: str, shape: tuple, nbytes: int) -> None:
    row = info["dtypes"].setdefault(dtype_name, {"tensors": 0, "parameters": 0, "bytes": 0})
    numel = math.prod(shape)
    row["tensors"] += 1
    row["parameters"] += numel
    row["bytes"] += nbytes
    info["num_tensors"] += 1
    info["total_parameters"] += numel
    info["total_bytes"] += nbytes


def checkpoint_info(path, allow_pickle_bin: bool = False) -> dict:
    """A summary for ``blip info``: files, shards, per-dtype counts, parameters and bytes.

    safetensors files are summarised from their headers alone. A ``.bin`` checkpoint is only
    opened with ``allow_pickle_bin=True``; otherwise its files are listed with ``inspected=False``.
    """
    kind, file = resolve_checkpoint(path)
    folder = os.path.dirname(file)
    index = None
    if kind.endswith("_index"):
        index = os.path.basename(file)
        files = sorted(set(read_index(file).values()))
    else:
        files = [os.path.basename(file)]
    info = {"path": os.path.abspath(os.fspath(path)),
            "format": "safetensors" if kind.startswith("safetensors") else "pytorch_bin",
            "sharded": index is not None, "index": index, "num_shards": len(files), "files": [],
            "metadata": {}, "inspected": True, "num_tensors": 0, "dtypes": {},
            "total_parameters": 0, "total_bytes": 0}
    inspect_bin = allow_pickle_bin and info["format"] == "pytorch_bin"
    for name in files:
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"{file}: missing shard file {name} in {folder}")
        row = {"name": name, "bytes": os.path.getsize(full), "tensors": None}
        if info["format"] == "safetensors":
            header = read_safetensors_header(full)
            info["metadata"] = info["metadata"] or dict(header.metadata)
            for e in header.entries.values():
                _count(info, SAFETENSORS_TO_NAME[e.dtype], e.shape, e.end - e.begin)
            row["tensors"] = len(header.entries)
        elif inspect_bin:
            from blip_core.safe_pickle import load_torch_state_dict
            state = load_torch_state_dict(full)
            for arr in state.values():
                _count(info, arr.dtype.name, arr.shape, arr.nbytes)
            row["tensors"] = len(state)
        info["files"].append(row)
    if info["format"] == "pytorch_bin" and not inspect_bin:
        info.update(inspected=False, num_tensors=None, total_parameters=None, total_bytes=None)
    return info
