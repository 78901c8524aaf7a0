"""Reading and writing Hugging Face model directories for any backend, driven by the weight table.

Backends call ``read_pretrained`` and ``write_pretrained`` with their own name; they receive and
hand back flat ``{backend_path: numpy array}`` dicts holding only the rows that own storage
(tied rows are shared inside each backend and filled in from their targets when reading).
``open_pretrained`` + ``load_items`` are the streaming form every backend's ``from_pretrained``
uses: checked ``TensorRef``s (memory-mapped safetensors) that the backend turns into its own
arrays one tensor at a time.
"""
from __future__ import annotations

import logging
import os
import warnings

from . import checkpoint
from .configs import _Config, load_config
from .weights import backend_params, backend_perm, canonical_state, owned, random_weights, weight_table

log = logging.getLogger("blip")

# Where a tower's weights sit inside the whole models of its family, in the order they are tried:
# ``BlipVisionModel.from_pretrained(captioning_dir)`` takes ``vision_model.*`` from the file.
TOWER_PREFIXES = {
    "BlipVisionModel": ("vision_model.",),
    "Blip2VisionModel": ("vision_model.",),
    "BlipTextModel": ("text_model.", "text_encoder.", "text_decoder.bert."),
    "Blip2QFormerModel": ("qformer.",),
}


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


def read_pretrained(path: str, architecture: str, backend: str, dtype=None, allow_pickle_bin: bool = False,
                    strict: bool = True, seed: int = 0):
    """Load ``path`` for ``backend``: returns ``(config, table, {backend_path: array})``.

    A checkpoint of another class of the same family loads too (see ``select_weights``): weights
    the class does not use are dropped and named in one info line; weights it needs and the file
    lacks raise unless ``strict=False``, which draws them from ``seed`` and warns. Shape
    mismatches and checkpoints of another family always raise.
    """
    config, table, refs = open_pretrained(path, architecture, allow_pickle_bin=allow_pickle_bin, strict=strict,
                                          seed=seed)
    state = {name: ref.load() for name, ref in refs.items()}
    if dtype is not None:
        state = checkpoint.cast_state_dict(state, dtype)
    return config, table, backend_params(table, state, backend)


def open_pretrained(path: str, architecture: str, allow_pickle_bin: bool = False, strict: bool = True,
                    seed: int = 0):
    """``(config, table, {canonical name: TensorRef})``, checked strictly, no tensor data read yet.

    What ``read_pretrained`` does, minus reading: the backends build their arrays from the refs
    one tensor at a time (``load_items``), so loading never holds the checkpoint beside the model.
    Tied rows are filled with their owner's ref (the same object).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    full_config = load_config(path)
    config = config_for(architecture, full_config)
    table = weight_table(architecture, config)
    state = _open_any(path, table, architecture, allow_pickle_bin)
    state = select_weights(state, table, architecture, config, full_config, strict=strict, seed=seed, source=path)
    return config, table, {k: v if isinstance(v, checkpoint.TensorRef) else checkpoint.ArrayRef(v)
                           for k, v in state.items()}


def load_items(table: dict, refs: dict, backend: str) -> list:
    """``[(backend path, ref, perm)]`` for the rows that own storage, in table order.

    ``perm`` is the axis permutation from the canonical layout to the backend's (None: none), which
    the backend applies with its own transpose after the data is in its arrays.
    """
    return [(spec.backend_path(backend), refs[spec.name], backend_perm(spec, backend)) for spec in owned(table)]


def family_keys(full_config: _Config) -> set:
    """Every weight name of every class that shares ``full_config``'s type (the file's family)."""
    return _family(full_config)[0]


def _family(full_config: _Config) -> tuple:
    """``(family_keys(full_config), whether every class of the family could be built from full_config)``."""
    from .weights.tables import TABLES
    keys, whole = set(), True
    for arch, (cfg_cls, _) in TABLES.items():
        if type(full_config) is cfg_cls:
            try:
                keys.update(weight_table(arch, full_config))
            except ValueError:      # a class this config cannot build (e.g. VQA with unequal widths)
                whole = False
    return keys, whole


def select_weights(state: dict, table: dict, architecture: str, config: _Config, full_config: _Config,
                   strict: bool = True, seed: int = 0, source: str | None = None) -> dict:
    """The rows of ``table`` out of a checkpoint written for any class of the same family.

    * A tower loaded from a whole model's file (``config`` is a part of ``full_config``) takes its
      weights under the prefix of ``TOWER_PREFIXES``.
    * Names the class does not use but that belong to a class of the file's family are dropped and
      named in one ``logging`` info line; unknown names are an error (a damaged or foreign file).
    * Missing rows raise one error that lists them, unless ``strict=False``: then they are drawn
      from ``seed`` as ``Cls(config, seed=seed)`` would draw them, with a warning naming them.
    """
    owned = {name for name, spec in table.items() if spec.tied_to is None}
    unused, family = [], None
    if config is not full_config and not owned <= set(state):
        for prefix in TOWER_PREFIXES.get(architecture, ()):
            if any(k.startswith(prefix) for k in state):
                family, whole = _family(full_config)
                # the rest of the model is dropped; a name of no class of the family stays, to be refused below,
                # where every class could be built (else some of the family's names are not known here)
                foreign = {k for k in state if not k.startswith(prefix) and whole and k not in family}
                unused = sorted(k for k in state if not k.startswith(prefix) and k not in foreign)
                state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()
                         if k.startswith(prefix) or k in foreign}
                break
    extra = sorted(k for k in state if k not in table)
    if extra and set(extra) <= (family if family is not None else family_keys(full_config)):
        unused += extra
        state = {k: v for k, v in state.items() if k in table}
    if unused:
        log.info("%s: %d weight(s) of the %s checkpoint not used by %s: %s", source or "checkpoint", len(unused),
                 type(full_config).__name__, architecture, ", ".join(unused))
    missing = sorted(owned - set(state))
    if missing and not strict:
        fresh = random_weights(architecture, config, seed)
        warnings.warn(f"{architecture}: {len(missing)} weight(s) not in {source or 'the checkpoint'} were drawn "
                      f"from seed {seed}: {', '.join(missing)}", stacklevel=3)
        state = dict(state, **{k: fresh[k] for k in missing})
    try:
        return checkpoint.check_state_dict(state, table, source=source)
    except checkpoint.StateDictMismatchError as err:
        if err.missing and strict:
            raise checkpoint.StateDictMismatchError(
                f"{err}\nPass strict=False to draw the missing weights from the seed instead (with a warning).",
                err.missing, err.unexpected, err.mismatched, err.wrong_dtype) from None
        raise


def _open_any(path: str, table: dict, architecture: str, allow_pickle_bin: bool) -> dict:
    """Canonical ``{name: TensorRef}`` from PyTorch-layout weights, else a Hugging Face TF or Flax file.

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
        return checkpoint.open_state_dict(path, allow_pickle_bin=allow_pickle_bin)
    tf_file, flax_file = os.path.join(path, "tf_model.h5"), os.path.join(path, "flax_model.msgpack")
    if os.path.isfile(tf_file):
        from .formats import open_tf_state
        return open_tf_state(tf_file, table, architecture)
    if os.path.isfile(flax_file):
        from .formats import open_flax_state
        return open_flax_state(flax_file, table)
    return checkpoint.open_state_dict(path, allow_pickle_bin=allow_pickle_bin)   # raises the reason


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


_QUANTIZE = ("load_in_8bit", "load_in_4bit", "quantization_config", "quantize")
_DEVICE_KINDS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def device_kind(device) -> tuple:
    """``(kind, index)`` of a ``device=`` as the jax and tf backends take it: ``"cpu"``, ``"gpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"rocm:0"``, ``"tpu:0"``, or TF's own spelling (``"/GPU:0"``, ``"/device:GPU:1"``); ``kind``
    is "cpu", "gpu" or "tpu". (torch takes ``torch.device`` names as torch does.)"""
    text = str(device).strip()
    if text.startswith("/"):                      # TF: /GPU:0, /device:GPU:0, /job:.../device:GPU:0
        text = text.rsplit("/", 1)[-1]
        text = text[len("device:"):] if text.lower().startswith("device:") else text
    kind, _, index = text.lower().partition(":")
    if kind not in _DEVICE_KINDS or not (index == "" or index.isdigit()):
        raise ValueError(f"device={device!r}: use 'cpu', 'gpu' or 'cuda', with ':N' for another than the first "
                         "(or a TF device name such as '/GPU:0')")
    return _DEVICE_KINDS[kind], int(index or 0)


def hf_loading_kwargs(dtype=None, device=None, **kwargs):
    """transformers' ``from_pretrained`` keywords, mapped onto ours; returns ``(dtype, device)``.

    ``torch_dtype`` is ``dtype``; ``device_map`` of ``"auto"`` means the backend's default device and
    a single device (``"cpu"``, ``"cuda:0"``, ...) that device; ``low_cpu_mem_usage`` is accepted
    (loading never builds a random model first). Per-module device maps and quantised loading raise
    ``NotImplementedError`` saying what to use; any other keyword is a ``TypeError``.
    """
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None and str(dtype) != str(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
        dtype = torch_dtype
    if isinstance(dtype, str) and dtype == "auto":
        raise NotImplementedError("dtype='auto' is not supported: pass the dtype to load in "
                                  "(e.g. 'float32', 'bfloat16', 'float16')")
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, dict):
        raise NotImplementedError("a per-module device_map is not supported: pass one device (device_map='cuda:0') "
                                  "or device_map='auto'")
    if device_map is not None and device is None:
        device = device_map          # "auto" is left for the backend to resolve
    elif device_map not in (None, "auto") and str(device) != str(device_map):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    kwargs.pop("low_cpu_mem_usage", None)
    for name in _QUANTIZE:
        value = kwargs.pop(name, None)
        if value:
            raise NotImplementedError(f"{name} is not supported here: int8 weights exist in the torch backend "
                                      "only (quantize='int8'); load in bfloat16 or float16 (dtype='bfloat16') "
                                      "to halve the memory instead")
    if kwargs:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
    return dtype, device
