"""Hugging Face TensorFlow ``tf_model.h5``: weight names from the table, and h5 read/write.

Naming rule (checked against files written by transformers 4.57's TF BLIP classes): a canonical
name ``a.b.3.c.weight`` becomes ``a/b_._3/c/<leaf>`` where ``<leaf>`` is the leaf of the
row's tf path (``kernel`` for linear and conv, ``embeddings``, LayerNorm ``gamma``/``beta``; a
plain parameter keeps its name). Keras layouts already match the tf transforms of the table
(Dense kernel (in, out), Conv2D kernel HWIO). ``BlipModel`` nests everything under its main
layer ``blip/``. The full variable name is ``<model name>/<name>:0``; transformers ignores the
first component when loading, and so do we.

One tie is special: PyTorch ties ``cls.predictions.decoder.weight`` to the word embeddings, but
TF BLIP keeps the decoder as a Dense layer of its own. We write it (the transposed word
embeddings), so transformers' TF BLIP loads a correctly tied LM head. transformers itself leaves
it random when it loads PyTorch safetensors, which hold no decoder weight.

Two file layouts are read and written, as transformers does:

* single file: Keras' ``save_weights`` layout: one group per top-level layer, whose
  ``weight_names`` attribute lists full variable names; datasets at ``<layer>/<full name>``.
* shards: ``tf_model-0000i-of-0000N.h5``, datasets at ``<name without model prefix>``, listed
  in the file's ``layer_names`` attribute, plus ``tf_model.h5.index.json``.

There are no TF BLIP-2 classes in transformers; BLIP-2 tables get the same rule.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ..checkpoint.errors import CheckpointError

TF_WEIGHTS_NAME = "tf_model.h5"
TF_WEIGHTS_INDEX_NAME = "tf_model.h5.index.json"
TOP_LEVEL_GROUP = "top_level_model_weights"   # Keras' group for weights owned by the model itself
# HDF5 refuses attributes above 64 KiB; Keras splits long name lists into numbered attributes.
_HDF5_ATTR_LIMIT = 64512
# Keras reads this to decide whether Keras-1 layout conversions apply; any 2.x value means none.
_KERAS_VERSION = b"2.15.0"

# Classes whose TF version wraps every weight in a main layer.
_MAIN_LAYER = {"BlipModel": "blip"}
# Canonical-name suffixes of rows PyTorch ties but TF BLIP stores as variables of their own.
STORED_TIES = ("cls.predictions.decoder.weight",)

def tf_model_name(architecture: str) -> str:
    """Keras' default name of ``TF<architecture>``: ``tf_blip_for_conditional_generation``."""
    name = "TF" + architecture
    name = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def hf_tf_name(spec, architecture: str) -> str:
    """The TF variable name of a table row, without model prefix and ``:0``."""
    parts = []
    for part in spec.name.split("."):
        if part.isdigit() and parts:          # list index: "layers.3" -> "layers_._3"
            parts[-1] = f"{parts[-1]}_._{part}"
        else:
            parts.append(part)
    parts[-1] = spec.backend_path("tf").rsplit("/", 1)[-1]
    main = _MAIN_LAYER.get(architecture)
    return "/".join(([main] if main else []) + parts)


def tf_names(table: dict, architecture: str) -> dict:
    """``{canonical name: TF name}`` for every row a TF checkpoint stores (owned rows + STORED_TIES)."""
    return {name: hf_tf_name(spec, architecture) for name, spec in table.items()
            if spec.tied_to is None or name.endswith(STORED_TIES)}


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("tf_model.h5 files need the 'h5py' package (pip install h5py)") from exc
    return h5py


def _norm(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


def _save_attr_list(obj, key: str, values: list) -> None:
    data = np.asarray([v.encode("utf8") for v in values]) if values else np.asarray([], dtype="S1")
    chunks = [data]
    while any(c.nbytes > _HDF5_ATTR_LIMIT for c in chunks):
        chunks = np.array_split(data, len(chunks) + 1)
    if len(chunks) == 1:
        obj.attrs[key] = data
    else:
        for i, chunk in enumerate(chunks):
            obj.attrs[f"{key}{i}"] = chunk


def _load_attr_list(obj, key: str) -> list:
    if key in obj.attrs:
        raw = list(obj.attrs[key])
    else:
        raw, i = [], 0
        while f"{key}{i}" in obj.attrs:
            raw.extend(obj.attrs[f"{key}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in raw]


class H5Weights:
    """Read access to a TF checkpoint (file, shard index or directory), one dataset at a time.

    Keys are TF names without the model prefix and ``:0`` (as ``hf_tf_name`` gives them).
    """

    def __init__(self, path):
        h5py = _h5py()
        path = os.fspath(path)
        if os.path.isdir(path):
            single, index = os.path.join(path, TF_WEIGHTS_NAME), os.path.join(path, TF_WEIGHTS_INDEX_NAME)
            path = single if os.path.isfile(single) else index
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TF_WEIGHTS_NAME} or {TF_WEIGHTS_INDEX_NAME} at {path}")
        if path.endswith(".json"):
            from ..checkpoint.files import read_index
            weight_map = read_index(path)
            folder = os.path.dirname(path)
            self.files = [os.path.join(folder, os.path.basename(f)) for f in dict.fromkeys(weight_map.values())]
        else:
            self.files = [path]
        self._handles, self._where = [], {}
        try:
            for path_i in self.files:
                try:
                    f = h5py.File(path_i, "r")
                except OSError as exc:   # h5py's message does not name the file
                    raise CheckpointError(f"{path_i}: not a readable HDF5 (tf_model.h5) file ({exc})") from None
                self._handles.append(f)
                for key, dataset in self._datasets(f):
                    if key in self._where:
                        raise ValueError(f"{path_i}: TF weight {key!r} is stored twice")
                    self._where[key] = (f, dataset)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _datasets(f):
        layers = _load_attr_list(f, "layer_names")
        keras_layout = not layers or not hasattr(f.get(layers[0]), "shape")
        if not keras_layout:  # transformers' shards: datasets named without the model prefix
            for name in layers:
                yield _norm(name), name
            return
        if TOP_LEVEL_GROUP in f:
            layers = layers + [TOP_LEVEL_GROUP]
        for layer in layers:
            for full in _load_attr_list(f[layer], "weight_names"):
                yield _norm(full.split("/", 1)[1] if "/" in full else full), f"{layer}/{full}"

    def keys(self) -> list:
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key) -> tuple:
        f, ds = self._where[key]
        return tuple(f[ds].shape)

    def dtype(self, key) -> np.dtype:
        f, ds = self._where[key]
        return f[ds].dtype

    def read(self, key) -> np.ndarray:
        f, ds = self._where[key]
        return np.asarray(f[ds][()])

    def close(self) -> None:
        for f in self._handles:
            f.close()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_tf_weights(path) -> H5Weights:
    """Open ``tf_model.h5`` (or its shard index, or a directory holding either)."""
    return H5Weights(path)


def _check_dtype(name: str, dtype) -> None:
    if np.dtype(dtype).name == "bfloat16":
        raise ValueError(f"{name}: HDF5 has no bfloat16 type, so tf_model.h5 cannot hold bfloat16 weights; "
                         "convert with dtype='float16' or 'float32'")


def _write_keras_file(path, model: str, items, on_tensor) -> None:
    h5py = _h5py()
    layers: dict = {}
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = _KERAS_VERSION
        for name, fetch in items:
            layer = name.split("/", 1)[0] if "/" in name else TOP_LEVEL_GROUP
            full = f"{model}/{name}:0"
            arr = fetch()
            f.require_group(layer).create_dataset(full, data=arr)
            layers.setdefault(layer, []).append(full)
            on_tensor(arr)
        if TOP_LEVEL_GROUP not in layers:
            f.create_group(TOP_LEVEL_GROUP)
            layers[TOP_LEVEL_GROUP] = []
        for layer, names in layers.items():
            _save_attr_list(f[layer], "weight_names", names)
        _save_attr_list(f, "layer_names", [layer for layer in layers if layer != TOP_LEVEL_GROUP])


def write_tf_weights(directory, architecture: str, items: list, max_shard_size=None, on_tensor=None) -> list:
    """Write ``items`` = ``[(tf name, shape, dtype, fetch)]`` as transformers' TF checkpoint.

    ``fetch()`` returns the array in TF layout; it is called once per tensor, in order, and the
    array is written before the next one is fetched (peak memory: one tensor). Returns the file
    names written. ``max_shard_size`` splits the weights like ``save_pretrained`` does.
    """
    from ..checkpoint import plan_shards  # the huggingface_hub sharding rule

    on_tensor = on_tensor or (lambda arr: None)
    for name, _, dtype, _ in items:
        _check_dtype(name, dtype)
    model = tf_model_name(architecture)
    shards = [[it[0] for it in items]]
    if max_shard_size is not None:
        shards = plan_shards({n: np.broadcast_to(np.zeros((), dt), s) for n, s, dt, _ in items}, max_shard_size)
    by_name = {it[0]: it for it in items}
    if len(shards) == 1:
        _write_keras_file(os.path.join(directory, TF_WEIGHTS_NAME), model,
                          [(n, by_name[n][3]) for n in shards[0]], on_tensor)
        return [TF_WEIGHTS_NAME]
    h5py = _h5py()
    files, weight_map, total = [], {}, 0
    for i, names in enumerate(shards):
        file_name = f"tf_model-{i + 1:05d}-of-{len(shards):05d}.h5"
        with h5py.File(os.path.join(directory, file_name), "w") as f:
            for name in names:
                arr = by_name[name][3]()
                f.create_dataset(f"{name}:0", data=arr)
                weight_map[f"{model}/{name}:0"] = file_name
                total += arr.nbytes
                on_tensor(arr)
            _save_attr_list(f, "layer_names", [f"{n}:0" for n in names])
        files.append(file_name)
    with open(os.path.join(directory, TF_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                            sort_keys=True) + "\n")
    return files + [TF_WEIGHTS_INDEX_NAME]


def read_tf_state_dict(path, table: dict, architecture: str) -> dict:
    """A TF checkpoint as ``{canonical name: array}`` in canonical layout (for ``check_state_dict``).

    Names the table cannot place raise; tied rows TF stores (the LM decoder) are included, and
    ``check_state_dict`` resolves them to their owners as it does for ``.bin`` files.
    """
    return {name: ref.view() for name, ref in open_tf_state(path, table, architecture).items()}


def open_tf_state(path, table: dict, architecture: str) -> dict:
    """As ``read_tf_state_dict``, but ``{canonical name: TensorRef}`` read one dataset at a time."""
    from ..checkpoint.mapped import ReaderRef
    names = tf_names(table, architecture)
    h5 = H5Weights(path)   # closed when the last reference goes
    known = set(names.values())
    unknown = [k for k in h5.keys() if k not in known]
    if unknown:
        h5.close()
        raise ValueError(f"{path}: TF weights the {architecture} table has no place for: {unknown[:10]}")
    refs = {}
    for name, key in names.items():
        if key in h5:
            spec = table[name]
            shape = spec.transform.canonical_shape(h5.shape(key))
            refs[name] = ReaderRef(shape, h5.dtype(key), lambda s=spec, k=key: s.from_backend("tf", h5.read(k)))
    return refs
