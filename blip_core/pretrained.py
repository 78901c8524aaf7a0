"""Reading and writing Hugging Face model directories for any backend, driven by the weight table.

Backends call ``read_pretrained`` and ``write_pretrained`` with their own name; they receive and
hand back flat ``{backend_path: numpy array}`` dicts holding only the rows that own storage
(tied rows are shared inside each backend and filled in from their targets when reading).
"""
from __future__ import annotations

import os

from . import checkpoint
from .configs import _Config, load_config
from .weights import backend_params, canonical_state, weight_table


def config_for(architecture: str, path_or_config) -> _Config:
    """The config of ``architecture`` from a directory, a config.json path or a config object."""
    from .weights.tables import TABLES
    if architecture not in TABLES:
        raise ValueError(f"unknown architecture {architecture!r}")
    cfg_cls = TABLES[architecture][0]
    cfg = path_or_config if isinstance(path_or_config, _Config) else load_config(path_or_config)
    if not isinstance(cfg, cfg_cls):
        # A sub-model may be loaded out of a composite checkpoint's config, as transformers allows.
        for attr in ("vision_config", "text_config", "qformer_config"):
            sub = getattr(cfg, attr, None)
            if isinstance(sub, cfg_cls):
                return sub
        raise ValueError(f"{architecture} needs a {cfg_cls.__name__}, but the config is a {type(cfg).__name__}")
    return cfg


def read_pretrained(path: str, architecture: str, backend: str, dtype=None, allow_pickle_bin: bool = False):
    """Load ``path`` for ``backend``: returns ``(config, table, {backend_path: array})``.

    Loading is strict: one error lists every missing, unexpected and mis-shaped key.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    config = config_for(architecture, path)
    table = weight_table(architecture, config)
    state = checkpoint.check_state_dict(_read_any(path, table, architecture, allow_pickle_bin), table)
    if dtype is not None:
        state = checkpoint.cast_state_dict(state, dtype)
    return config, table, backend_params(table, state, backend)


def _read_any(path: str, table: dict, architecture: str, allow_pickle_bin: bool) -> dict:
    """Canonical state dict from PyTorch-layout weights, else a Hugging Face TF or Flax file.

    The TF / Flax files are only looked at when the directory holds no PyTorch-layout weights at
    all: a corrupt ``model.safetensors`` is an error, never silently replaced by a file beside it.
    """
    try:
        kind, _ = checkpoint.resolve_checkpoint(path)
    except checkpoint.CheckpointError:
        if not os.path.isdir(path):
            raise
        kind = None
    # A pickle file the caller did not opt into is passed over for a TF / Flax file, as before.
    if kind is not None and (allow_pickle_bin or not kind.startswith("bin") or not os.path.isdir(path)):
        return checkpoint.load_state_dict(path, allow_pickle_bin=allow_pickle_bin)
    tf_file, flax_file = os.path.join(path, "tf_model.h5"), os.path.join(path, "flax_model.msgpack")
    if os.path.isfile(tf_file):
        from .formats import read_tf_state_dict
        return read_tf_state_dict(tf_file, table, architecture)
    if os.path.isfile(flax_file):
        from .formats import read_flax_state_dict
        return read_flax_state_dict(flax_file, table)
    return checkpoint.load_state_dict(path, allow_pickle_bin=allow_pickle_bin)   # raises the reason


def write_pretrained(path: str, config: _Config, architecture: str, backend: str, params: dict,
                     max_shard_size="5GB", dtype=None) -> None:
    """Write ``config.json`` and safetensors weights (tied rows omitted, as transformers does)."""
    table = weight_table(architecture, config)
    missing = [spec.backend_path(backend) for spec in table.values()
               if spec.tied_to is None and spec.backend_path(backend) not in params]
    if missing:
        raise ValueError(f"cannot save {architecture}: the model has no value for {missing[:5]}")
    state = canonical_state(table, params, backend)
    if dtype is not None:
        state = checkpoint.cast_state_dict(state, dtype)
    os.makedirs(path, exist_ok=True)
    checkpoint.save_state_dict(path, state, max_shard_size=max_shard_size)
    config.extra["architectures"] = [architecture]
    config.save_pretrained(path)
