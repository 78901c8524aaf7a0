"""Traced generation programs on disk: a new process calls the stored program instead of tracing the model.

jax's persistent compilation cache (``_base.apply_persistent_cache``) keeps compiled executables, but it is
keyed by the lowered program, so every process still runs the model's Python once to rebuild it: seconds for
BLIP's generate. This module keeps the traced program itself, a serialized ``jax.export.Exported`` (StableHLO
plus its input and output trees), under ``<cache root>/jax-exported-<jax version>``. A later process reads it
back and calls it under ``jax.jit`` (tracing one call primitive), whose lowering then hits the compilation
cache: the model's Python never runs.

* Params are inputs of the program, never constants: one file serves every checkpoint of a config.
* The key names everything the program depends on (``program_key``): class, program name, config, dtype,
  static arguments (the decoding plan), the tree, shape and dtype of every argument, jax, jaxlib and flax
  versions, the platform and devices, the numeric flags of jax, and a digest of the sources of
  ``blip_core`` and ``backends/jax``. Any change is another key, so another file, and the model is traced.
* Files are written through a rename and carry a digest of their content
  (``blip_core.persistent_cache.write_atomic``); a missing, truncated or damaged file means tracing, and a
  program that cannot be exported (a mesh, an unsupported construct) is jitted as before.
* The process that traces runs the program it wrote (exported, serialized and read back), so every
  process runs the same XLA program and gets the same numbers.

``BLIP_COMPILE_CACHE=0`` turns this off with the rest of the persistent cache.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os

import jax
from jax import export

from blip_core import persistent_cache

MAGIC = b"blip-jax-exported-1\n"
_LOG = logging.getLogger(__name__)
_FOLDERS: dict = {}
_SOURCES = (os.path.dirname(os.path.abspath(persistent_cache.__file__)), os.path.dirname(os.path.abspath(__file__)))
_FLAGS = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_default_matmul_precision", "jax_numpy_rank_promotion")


def folder():
    """``<root>/jax-exported-<jax version>`` (created), or None when the persistent cache is off."""
    if "dir" not in _FOLDERS or _FOLDERS["root"] != persistent_cache.root():
        _FOLDERS["root"] = persistent_cache.root()
        _FOLDERS["dir"] = persistent_cache.cache_dir("jax-exported", jax.__version__)
    return _FOLDERS["dir"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def program_key(model_key: tuple, args: tuple, static: dict) -> str:
    """Hex digest naming the program of ``model_key`` (class, name, config repr, dtype) for ``args`` and
    ``static`` in this installation (see the module docstring)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    devices = jax.devices()
    parts = (
        model_key, tuple(sorted((k, repr(v)) for k, v in static.items())), str(tree),
        tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in map(jax.typeof, leaves)),
        jax.__version__, _version("jaxlib"), _version("flax"), jax.default_backend(),
        tuple(sorted({d.device_kind for d in devices})), len(devices),
        tuple((f, str(getattr(jax.config, f, None))) for f in _FLAGS),
        persistent_cache.source_fingerprint(_SOURCES),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def load(name: str):
    """The stored ``Exported`` called ``name``, or None (missing, damaged, or unreadable by this jax)."""
    top = folder()
    if top is None:
        return None
    payload = persistent_cache.read_checked(os.path.join(top, name), MAGIC, name)
    if payload is None:
        return None
    try:
        return export.deserialize(bytearray(payload))
    except Exception as exc:       # a format this jax does not read: trace instead
        _LOG.debug("stored program %s unreadable (%s); tracing", name, exc)
        return None


def store(name: str, exported) -> "export.Exported":
    """Write ``exported`` under ``name`` (best effort: a full or read-only disk only costs the next process a
    trace) and return it as read back from its bytes, the program every later process runs."""
    data = exported.serialize()
    top = folder()
    if top is not None:
        try:
            persistent_cache.write_atomic(os.path.join(top, name), MAGIC, name, bytes(data))
        except OSError as exc:
            _LOG.debug("stored program %s not written (%s)", name, exc)
    return export.deserialize(data)


def stored_program(model_key: tuple, jitted, args: tuple, static: dict):
    """A jitted callable ``fn(*args, **static)`` running the stored program of ``jitted`` for these argument
    shapes: read from disk, or traced now (``jitted`` runs the model's Python once), exported and written.
    None when the persistent cache is off or the program cannot be exported: the caller jits as before."""
    if folder() is None:
        return None
    name = program_key(model_key, args, static)
    exported = load(name)
    if exported is None:
        try:
            exported = store(name, export.export(jitted)(*args, **static))
        except Exception as exc:       # noqa: BLE001  (not exportable: the traced path is the fallback)
            _LOG.debug("program %s not exported (%s); jitting it", model_key[:2], exc)
            return None
    call = exported.call
    return jax.jit(lambda *a, **_: call(*a), static_argnames=tuple(static))
