"""Writers of each framework's native checkpoint, fed one canonical tensor at a time.

A writer receives ``rows`` (canonical name, canonical shape, dtype) of the tensors it will store
and ``fetch(name)``, which returns that tensor in canonical layout (already cast). It converts to
its layout, writes, and lets go before fetching the next, so peak memory is one tensor (plus
what the source format itself holds).

* torch: safetensors with PyTorch names, byte-identical to ``blip_core.checkpoint.save_state_dict``
  (header computed from the rows up front, then each tensor written at its offset); tied rows
  left out, as transformers does.
* tf: ``tf_model.h5`` with Hugging Face TF names (``blip_core.formats.hf_tf``).
* jax: ``flax_model.msgpack`` at the table's jax paths (``blip_core.formats.flax_msgpack``).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from blip_core import BACKENDS, checkpoint
from blip_core.checkpoint.dtypes import NAME_TO_SAFETENSORS, SAFETENSORS_RANK
from blip_core.checkpoint.files import shard_file_names
from blip_core.checkpoint.safetensors_io import DEFAULT_METADATA
from blip_core.formats import flax_msgpack, hf_tf

TARGETS = BACKENDS   # every backend is a conversion target
DEFAULT_MAX_SHARD_SIZE = "5GB"   # transformers' save_pretrained default


def stored_rows(target: str, table: dict, architecture: str) -> dict:
    """``{canonical name: name whose value it stores}`` for the rows ``target``'s files hold."""
    if target == "tf":
        return {name: table[name].tied_to or name for name in hf_tf.tf_names(table, architecture)}
    return {name: name for name, spec in table.items() if spec.tied_to is None}


def _sized(rows) -> dict:
    # Zero-stride views: they carry shape and dtype (hence nbytes) without memory.
    return {name: np.broadcast_to(np.zeros((), dtype), shape) for name, shape, dtype in rows}


def _safetensors_header(rows) -> tuple:
    """(header bytes incl. length prefix, {name: begin offset}) as the Rust writer lays it out."""
    sized = _sized(rows)
    order = sorted(sized, key=lambda n: (-SAFETENSORS_RANK[NAME_TO_SAFETENSORS[sized[n].dtype.name]], n))
    header, offsets, offset = {"__metadata__": dict(DEFAULT_METADATA)}, {}, 0
    for name in order:
        arr = sized[name]
        header[name] = {"dtype": NAME_TO_SAFETENSORS[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offsets[name] = offset
        offset += arr.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body, offsets


def write_torch(directory, rows: list, fetch, max_shard_size=None, on_tensor=None) -> list:
    """Streaming safetensors writer (transformers' file names, sharding rule and index)."""
    on_tensor = on_tensor or (lambda arr: None)
    for name, _, dtype in rows:
        if np.dtype(dtype).name not in NAME_TO_SAFETENSORS:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
    shards = checkpoint.plan_shards(_sized(rows), max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    names = shard_file_names(len(shards))
    by_name = {r[0]: r for r in rows}
    for file_name, keys in zip(names, shards):
        shard_rows = [by_name[k] for k in keys]
        head, offsets = _safetensors_header(shard_rows)
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(head)
            for name, shape, dtype in shard_rows:
                arr = np.asarray(fetch(name), dtype=np.dtype(dtype).newbyteorder("<"), order="C")
                if arr.shape != tuple(shape):
                    raise ValueError(f"{name}: planned shape {tuple(shape)}, got {arr.shape}")
                f.seek(len(head) + offsets[name])
                if arr.nbytes:
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                on_tensor(arr)
    if len(names) > 1:
        sized = _sized(rows)
        index = {"metadata": {"total_parameters": int(sum(a.size for a in sized.values())),
                              "total_size": int(sum(a.nbytes for a in sized.values()))},
                 "weight_map": {k: f for f, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(directory, checkpoint.SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names + [checkpoint.SAFE_WEIGHTS_INDEX_NAME]
    return names


def _backend_shape(spec, shape) -> tuple:
    """The row's shape in tf/jax layout (no data touched)."""
    shape = tuple(shape)
    if spec.transform.name == "linear":
        return shape[::-1]
    if spec.transform.name == "conv2d":   # OIHW -> HWIO
        return (shape[2], shape[3], shape[1], shape[0])
    return shape


def write_tf(directory, rows: list, fetch, table: dict, architecture: str, max_shard_size=None,
             on_tensor=None) -> list:
    names = hf_tf.tf_names(table, architecture)
    items = [(names[name], _backend_shape(table[name], shape), dtype,
              (lambda n=name: table[n].to_backend("tf", fetch(n)))) for name, shape, dtype in rows]
    return hf_tf.write_tf_weights(directory, architecture, items, max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                                  on_tensor)


def write_jax(directory, rows: list, fetch, table: dict, max_shard_size=None, on_tensor=None) -> list:
    paths = flax_msgpack.flax_paths(table)
    items = [(paths[name], _backend_shape(table[name], shape), dtype,
              (lambda n=name: table[n].to_backend("jax", fetch(n)))) for name, shape, dtype in rows]
    return flax_msgpack.write_flax_weights(directory, items, max_shard_size or DEFAULT_MAX_SHARD_SIZE, on_tensor)


def write_target(target: str, directory, rows: list, fetch, table: dict, architecture: str,
                 max_shard_size=None, on_tensor=None) -> list:
    """Dispatch on ``target`` ("torch", "tf" or "jax"); returns the weight files written."""
    if target == "torch":
        return write_torch(directory, rows, fetch, max_shard_size, on_tensor)
    if target == "tf":
        return write_tf(directory, rows, fetch, table, architecture, max_shard_size, on_tensor)
    if target == "jax":
        return write_jax(directory, rows, fetch, table, max_shard_size, on_tensor)
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
