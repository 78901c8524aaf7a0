"""``convert``: any supported checkpoint to any framework's native format, table-driven.

Flow: detect the source format -> read the config -> build the weight table -> check the source
against the table strictly (one error listing missing, unexpected and mis-shaped names) -> stream
tensors into a temporary directory beside ``dst`` -> write config.json and copy the non-weight
files -> re-read what was written and compare names, shapes, dtypes and SHA-256 of every tensor
-> rename the directory into place. Any failure removes the temporary directory, so ``dst``
either appears complete and verified or not at all.

Example::

    from converters import convert
    report = convert("blip-captioning-base", "blip-tf", to="tf")
    print(report)
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from blip_core import checkpoint
from blip_core.checkpoint.dtypes import as_dtype, is_floating
from blip_core.configs import BlipConfig, Blip2Config, _Config, load_config
from blip_core.formats.original import resize_position_embedding
from blip_core.pretrained import config_for
from blip_core.weights import weight_table

from . import components
from .presets import plan_config
from .progress import Progress
from .safety import ConversionError, atomic_exchange, make_partial, recover_destination, refuse_overlap, remove_stale_partials
from .sinks import TARGETS, stored_rows, write_target
from .sources import detect_format, open_source

# Files of a source directory that are weights (not copied): matched by name.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".h5", ".h5.index.json",
                    ".msgpack", ".msgpack.index.json", ".pth", ".pt", ".ckpt")
_POS_EMB = "embeddings.position_embedding"


@dataclass
class ConversionReport:
    """What ``convert`` did: printed by the CLI, returned by the API."""

    src: str
    dst: str
    source_format: str
    target: str
    architecture: str
    tensors: int = 0
    bytes: int = 0
    files: list = field(default_factory=list)
    copied: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    verified: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"converted {self.src} ({self.source_format}) -> {self.dst} ({self.target}), {self.architecture}",
                 f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {', '.join(self.files)}"
                 f" ({self.seconds:.1f} s)"]
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  verified: re-read every tensor; names, shapes, dtypes and SHA-256 match" if self.verified
                     else "  NOT verified")
        return "\n".join(lines)


def _sha256(arr: np.ndarray) -> str:
    arr = np.asarray(arr, order="C")
    return hashlib.sha256(arr.reshape(-1).view(np.uint8).data).hexdigest()


def _out_dtype(src_dtype, dtype) -> np.dtype:
    """The stored dtype after casting: floating tensors take ``dtype``, others keep theirs."""
    return as_dtype(dtype) if dtype is not None and is_floating(src_dtype) else np.dtype(src_dtype)


def _read_config(src: str, weights_path: str, config):
    if isinstance(config, _Config):
        return copy.deepcopy(config)
    if config is not None:
        return load_config(os.fspath(config))
    for folder in (src, os.path.dirname(weights_path)):
        if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "config.json")):
            return load_config(folder)
    raise ConversionError(f"{src}: no config.json next to the weights; pass config= (a config.json or the "
                          "Hugging Face config directory of the same model) or preset=")


def _with_image_size(cfg, image_size: int):
    """A copy of ``cfg`` whose vision tower runs at ``image_size`` (invariants re-checked)."""
    data = cfg.to_dict()
    target = data["vision_config"] if isinstance(cfg, (BlipConfig, Blip2Config)) else data
    if "image_size" not in target:
        raise ConversionError(f"image_size= applies to models with a vision tower, not {type(cfg).__name__}")
    target["image_size"] = int(image_size)
    return type(cfg).from_dict(data)


def _check(source, table: dict, resize_ok: bool) -> tuple:
    """Strict match of the source to the table: ``(rows to write, resized names, notes)``."""
    have = set(source.names())
    missing, mismatched, resized, notes = [], [], set(), []
    for name, spec in table.items():
        if spec.tied_to is not None:
            continue
        if name not in have:
            missing.append(name)
            continue
        got, want = tuple(source.shape(name)), tuple(spec.shape)
        if got != want:
            if resize_ok and name.endswith(_POS_EMB) and len(got) == 3 and got[2] == want[2]:
                resized.add(name)
                notes.append(f"resized {name} from {got} to {want} (PyTorch bicubic on the patch grid)")
            else:
                mismatched.append(f"{name}: expected {want}, found {got}")
    unexpected = [n for n in source.names() if n not in table] + list(source.unexpected)
    # Every row is a float parameter: integer or bool data is refused (never copied and "verified").
    wrong_dtype = [(n, np.dtype(source.dtype(n)).name) for n in sorted(have & set(table))
                   if not is_floating(source.dtype(n))]
    for name in have & {n for n, s in table.items() if s.tied_to is not None}:
        owner = checkpoint.tie_root(name, table)
        if owner in have and tuple(source.shape(name)) == tuple(source.shape(owner)):
            if not np.array_equal(source.get(name), source.get(owner)):
                notes.append(f"{name} in the source differs from {owner}, which the model ties it to; the tie "
                             "wins (transformers' TF BLIP leaves this LM head untied and random)")
        elif owner in have:
            mismatched.append(f"{name}: expected {tuple(source.shape(owner))} (tied to {owner}), "
                              f"found {tuple(source.shape(name))}")
    if missing or unexpected or mismatched or wrong_dtype:
        parts = [f"{source.format} checkpoint does not match the {len(table)}-row weight table:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                             ("non-floating weight", [f"{n}: {d}" for n, d in wrong_dtype])):
            if items:
                parts.append(f"  {len(items)} {title}:")
                parts += [f"    {i}" for i in items[:50]] + ([f"    ... {len(items) - 50} more"] if len(items) > 50 else [])
        raise checkpoint.StateDictMismatchError("\n".join(parts), missing, unexpected, mismatched, wrong_dtype)
    return resized, notes


def _copy_extras(src: str, dst: str) -> list:
    copied = []
    if not os.path.isdir(src):
        return copied
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if (name == "config.json" or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES)
                or not os.path.isfile(full)):
            continue
        shutil.copy2(full, os.path.join(dst, name))
        copied.append(name)
    return copied


def _verify(target: str, directory: str, table: dict, architecture: str, expected: dict, progress) -> None:
    """Re-read the written checkpoint; compare names, shapes, dtypes and checksums."""
    fmt = {"torch": "safetensors", "tf": "tf", "jax": "flax"}[target]
    _, path = detect_format(directory, fmt)
    reader = open_source(fmt, path, table, architecture)
    try:
        got = set(reader.names())
        problems = [f"missing {n}" for n in expected if n not in got] + [f"unexpected {n}" for n in got - set(expected)]
        problems += [f"unexpected {n}" for n in reader.unexpected]
        for name, (shape, dtype, digest) in expected.items():
            if name not in got:
                continue
            arr = reader.get(name)
            if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
                problems.append(f"{name}: wrote {tuple(shape)} {dtype}, read back {arr.shape} {arr.dtype}")
            elif _sha256(arr) != digest:
                problems.append(f"{name}: checksum differs after re-reading")
            progress.update(arr.nbytes)
    finally:
        reader.close()
    if problems:
        raise ConversionError("verification of the written checkpoint failed:\n  " + "\n  ".join(problems[:20]))


def _move_into_place(tmp: str, dst: str) -> None:
    """Put the finished directory at ``dst``.

    A new ``dst`` is a single rename. An existing one (overwrite) is exchanged with the new
    directory in one atomic ``renameat2(RENAME_EXCHANGE)`` where the system has it (Linux), so a
    crash at any moment leaves either the old or the new destination, complete; the old data then
    sits at ``tmp`` (a partial directory of this process) and is removed. Elsewhere the old
    directory is renamed aside first and ``recover_destination`` puts it back after a crash.
    """
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not atomic_exchange(tmp, dst):
        old = tmp + ".old"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except OSError:
            os.rename(old, dst)
            raise
        os.rename(old, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def convert(src, dst, to: str = "torch", dtype=None, max_shard_size=None, allow_pickle_bin: bool = False,
            source_format: str | None = None, architecture: str | None = None, image_size: int | None = None,
            config=None, language_model=None, overwrite: bool = False, progress: bool | None = None,
            verify: bool = True, preset: str | None = None, overrides: dict | None = None, vision_model=None,
            qformer=None) -> ConversionReport:
    """Convert the checkpoint at ``src`` into ``dst`` for framework ``to`` ("torch", "tf" or "jax").

    ``source_format``: "safetensors", "bin", "tf", "flax" or "original" (default: detected).
    ``architecture``: class name (default: ``config.json``'s ``architectures[0]``).
    ``dtype``: cast floating tensors ("float32", "float16", "bfloat16").
    ``image_size``: run the vision tower at another resolution (position embedding resized).
    ``config``: config.json / directory / config object, for sources without config.json
    (original ``.pth``). ``preset``: a named config (``blip_core.presets``); for original ``.pth``
    files without ``config`` the architecture and sizes are read from the state dict (see
    ``converters.presets``), ``overrides`` (``{"section.field": value}``) win over both.
    ``vision_model``, ``qformer``, ``language_model``: checkpoints that supply the towers the source
    leaves out (``converters.components``). ``overwrite``: replace an existing ``dst``.
    ``progress``: progress bar on stderr (default: when stderr is a terminal). ``.bin``/``.pth``
    need ``allow_pickle_bin=True``.
    """
    start = time.time()
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and not is_floating(as_dtype(dtype)):
        raise ValueError(f"dtype must be a floating type (float32, float16, bfloat16), got {dtype!r}")
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    recover_destination(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another destination or pass overwrite=True")
    fmt, weights_path = detect_format(src, source_format)
    paths = [config, vision_model, qformer, language_model]
    refuse_overlap([src, weights_path] + [os.fspath(p) for p in paths if isinstance(p, (str, os.PathLike))], dst)
    parts = components.requested(vision_model=vision_model, qformer=qformer, language_model=language_model)
    cfg, arch, plan_notes, state = plan_config(src, fmt, weights_path, config, preset, overrides, architecture,
                                               allow_pickle_bin, components.component_configs(parts), _read_config)
    if arch is None:
        raise ConversionError(f"{src}: config.json names no 'architectures'; pass architecture=")
    cfg = config_for(arch, cfg)
    if image_size is not None:
        cfg = _with_image_size(cfg, image_size)
    table = weight_table(arch, cfg)
    source = components.open_with_components(fmt, weights_path, table, arch, allow_pickle_bin, state, parts)
    report = ConversionReport(src, dst, fmt, to, arch, notes=plan_notes + list(source.notes))
    tmp = bar = None
    try:
        resized, notes = _check(source, table, resize_ok=fmt == "original" or image_size is not None)
        report.notes += notes
        stores = stored_rows(to, table, arch)
        rows = [(n, tuple(table[v].shape), _out_dtype(source.dtype(v), dtype)) for n, v in stores.items()]
        expected: dict = {}

        def fetch(name):
            value_of = stores[name]
            arr = source.get(value_of)
            if value_of in resized:
                arr = resize_position_embedding(arr, int(round((table[value_of].shape[1] - 1) ** 0.5)))
            if dtype is not None:
                arr = checkpoint.cast_state_dict({name: arr}, dtype)[name]
            expected[name] = (arr.shape, arr.dtype, _sha256(arr))
            return arr

        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in rows)
        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        remove_stale_partials(dst)
        tmp = make_partial(dst)
        bar = Progress(total * (2 if verify else 1), "converting", enabled=progress)
        report.files = write_target(to, tmp, rows, fetch, table, arch, max_shard_size,
                                    on_tensor=lambda arr: bar.update(arr.nbytes))
        cfg.extra["architectures"] = [arch]
        if dtype is not None:
            cfg.extra["torch_dtype"] = as_dtype(dtype).name
        cfg.save_pretrained(tmp)
        report.copied = _copy_extras(src, tmp)
        if verify:
            _verify(to, tmp, table, arch, expected, bar)
            report.verified = True
        report.tensors, report.bytes = len(rows), total
        _move_into_place(tmp, dst)
        tmp = None
    finally:
        source.close()
        if bar is not None:
            bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.time() - start
    return report
