"""Compiled generation programs on disk, keyed by the call: a new process runs the stored one without tracing.

jax's persistent compilation cache (``_base.apply_persistent_cache``) keeps compiled executables, but it is
keyed by the lowered program, so every process still runs the model's Python once (seconds for BLIP's
generate), lowers it, hashes it, and only then finds the executable. This module keys the executable by
the call instead: a later process with the same key loads it (``jax.experimental.serialize_executable``)
and runs it; the model's Python is never traced and nothing is lowered.

* Params are inputs of the program, never constants: one file serves every checkpoint of a config.
* The key names everything the program depends on (``program_key``): class, program name, config, dtype,
  static arguments (the decoding plan), the tree, shape, dtype and devices of every argument, jax, jaxlib and flax
  versions, the platform, its devices and this CPU's instruction set, jax's numeric flags and
  ``XLA_FLAGS``, and a digest of the sources of ``blip_core`` and ``backends/jax``. Any change is another
  key, so another file, and the model is traced and compiled again.
* Files sit under ``<cache root>/jax-programs-<jax version>``, readable by their user only, written through a
  rename with a digest of their content (``blip_core.persistent_cache.write_atomic``): a missing,
  truncated or damaged file, or one this jax cannot load, means tracing, never a crash. A program that
  cannot be serialized, or a model split over a mesh, is jitted as before.
* A program is loaded onto the devices it was compiled for (jax would otherwise spread it over all of them).
* The tracing process runs the same compiled program it writes, and a loaded program is that program:
  every process gets the numbers of the jitted path.

Loading an executable is not free (XLA rebuilds its HLO module, buffer assignment and thunks: about 0.6
CPU-seconds for BLIP base's generate), so a model starts it early: ``preload``, called when a model is built
or loaded, reads which program the last process's first call of that model ran (a small note under
``<cache root>/jax-first-<jax version>``, written by ``stored_program``) and loads it on a thread of its own
while the weights are made or read. The call finds it ready when its key is that program's (``load``
takes it by file and key; any other call loads or traces as before, and a failed preload only means
loading on the call).

A stored executable is code this process runs, as are jax's own cache entries (and its payload is a
pickle): the folder is created mode 0700. ``BLIP_COMPILE_CACHE=0`` turns this off with the rest.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import logging
import os
import pickle
import threading
from concurrent.futures import Future

import jax
from jax.experimental import serialize_executable

from blip_core import persistent_cache

MAGIC = b"blip-jax-program-2\n"
FIRST_MAGIC = b"blip-jax-first-1\n"
_LOG = logging.getLogger(__name__)
_FOLDERS: dict = {}
_SOURCES = (os.path.dirname(os.path.abspath(persistent_cache.__file__)), os.path.dirname(os.path.abspath(__file__)))
_FLAGS = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_default_matmul_precision", "jax_numpy_rank_promotion")


def folder():
    """``<root>/jax-programs-<jax version>`` (created), or None when the persistent cache is off."""
    top = persistent_cache.root()
    if _FOLDERS.get("root", False) != top:
        _FOLDERS.update(root=top, dir=persistent_cache.cache_dir("jax-programs", jax.__version__))
    return _FOLDERS["dir"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _placement(x) -> tuple:
    """The device ids an argument lives on (a host array: none); a program is compiled for its arguments'."""
    sharding = getattr(x, "sharding", None)
    return () if sharding is None else tuple(sorted(d.id for d in sharding.device_set))


def program_key(model_key: tuple, args: tuple, static: dict) -> str:
    """Hex digest naming the program of ``model_key`` (class, name, config repr, dtype) for ``args`` and
    ``static`` in this installation on this machine (see the module docstring)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    devices = jax.devices()
    parts = (
        model_key, tuple(sorted((k, repr(v)) for k, v in static.items())), str(tree),
        tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in map(jax.typeof, leaves)),
        tuple(_placement(x) for x in leaves),
        jax.__version__, _version("jaxlib"), _version("flax"), jax.default_backend(), persistent_cache.host_fingerprint(),
        devices[0].client.platform_version, tuple(sorted({d.device_kind for d in devices})), len(devices),
        tuple((f, str(getattr(jax.config, f, None))) for f in _FLAGS), os.environ.get("XLA_FLAGS", ""),
        persistent_cache.source_fingerprint(_SOURCES),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class StoredProgram:
    """One compiled program called as the jitted method is, ``fn(*args, **kwargs)``: keyword arguments named
    in ``static`` are part of its key, so they are not passed on; the others are arrays. Arguments the
    program refuses (placed on another device, say) go to ``jitted`` instead, from then on."""

    def __init__(self, compiled, jitted, static=()):
        self.compiled, self.jitted, self.static = compiled, jitted, frozenset(static)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **{k: v for k, v in kwargs.items() if k not in self.static})
            except (TypeError, ValueError) as exc:     # raised by the argument checks, before running
                _LOG.debug("stored program refused its arguments (%s); jitting", exc)
                self.compiled = None
        return self.jitted(*args, **kwargs)

    def _cache_size(self) -> int:      # as a jitted function's: the programs it holds
        return 1


def load(name: str):
    """The compiled program stored under ``name``, or None (missing, damaged, or not loadable here); the one
    ``preload`` made ready, if it did."""
    pending = _take_preloaded(folder(), name)
    if pending is not None:
        compiled = pending.result()          # the preloading thread always sets one (None if it failed)
        if compiled is not None:
            return compiled
    return _load_file(folder(), name)


def _load_file(top, name: str):
    payload = persistent_cache.read_entry(top, name, MAGIC)
    if payload is None:
        return None
    collecting = gc.isenabled()
    gc.disable()                   # unpickling makes many small objects: no collection passes meanwhile
    try:
        device_ids, serialized = pickle.loads(payload)
        by_id = {d.id: d for d in jax.devices()}
        # jax loads onto every device of the backend unless told: a one-device program in a process that
        # sees several devices would then expect one shard per device.
        return serialize_executable.deserialize_and_load(
            *serialized, execution_devices=[by_id[i] for i in device_ids])
    except Exception as exc:       # noqa: BLE001  (written by another jaxlib, ...: trace instead)
        _LOG.debug("stored program %s not loadable (%s); tracing", name, exc)
        return None
    finally:
        if collecting:
            gc.enable()


def store(name: str, compiled) -> None:
    """Write ``compiled`` under ``name``; best effort (a full or read-only disk only costs a later process a
    trace, a program jax cannot serialize is not written)."""
    def payload():
        device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
        return pickle.dumps((device_ids, serialize_executable.serialize(compiled)), protocol=pickle.HIGHEST_PROTOCOL)
    persistent_cache.write_entry(folder(), name, MAGIC, payload)


def stored_program(model_key: tuple, jitted, args: tuple, static: dict, dynamic: dict = None):
    """``StoredProgram`` of ``jitted`` for these argument shapes (positional ``args``, keyword ``dynamic``)
    and static values: loaded from disk, or compiled now (``jitted`` traces the model once; jax's own cache
    may still skip XLA) and stored. None when the persistent cache is off or compiling ahead of the call
    fails: the caller jits."""
    if folder() is None:
        return None
    dynamic = dynamic or {}
    name = program_key(model_key, (args, dynamic) if dynamic else args, static)
    compiled = load(name)
    if compiled is None:
        try:
            compiled, fresh = _compile_fresh(jitted.trace(*args, **dynamic, **static).lower())
        except Exception as exc:       # noqa: BLE001  (the jitted path raises it again, at the call)
            _LOG.debug("program %s not compiled ahead (%s); jitting it", model_key[:2], exc)
            return None
        if fresh:
            store(name, compiled)
    _note_first(model_key, name)
    return StoredProgram(compiled, jitted, static)


# -- the first program of a model, loaded while the model is built -------------------------------------------
_LOCK = threading.Lock()
_PRELOADS: dict = {}       # (folder, program name) -> Future of the program (None when it did not load)
_NOTED: set = set()        # (folder, model) whose first program this process has noted
_PRELOADED: set = set()    # (folder, model) this process has preloaded for


def _first_name(model: tuple) -> str:
    """The entry that names ``model``'s (class, config repr, dtype) first program, for this jax and backend."""
    parts = (model, jax.__version__, jax.default_backend(), len(jax.devices()))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _first_folder():
    top = persistent_cache.root()
    return None if top is None else persistent_cache.cache_dir("jax-first", jax.__version__)


def _note_first(model_key: tuple, name: str) -> None:
    """Record ``name`` as the first program of ``model_key``'s model when it is this process's first for it."""
    model, top = (model_key[0],) + tuple(model_key[2:]), folder()
    with _LOCK:
        if (top, model) in _NOTED:
            return
        _NOTED.add((top, model))
    notes, note = _first_folder(), _first_name(model)
    if persistent_cache.read_entry(notes, note, FIRST_MAGIC) != name.encode("ascii"):
        persistent_cache.write_entry(notes, note, FIRST_MAGIC, lambda: name.encode("ascii"))


def preload(model: tuple) -> None:
    """Start loading the program the last process ran first for ``model`` (class name, config repr, dtype name),
    on a thread of its own; ``load`` takes it. Once per model and process; nothing when the cache is off or
    no program is noted. The thread is not a daemon: an exiting process waits for it (one load at most)."""
    top = folder()
    if top is None:
        return
    with _LOCK:
        if (top, model) in _PRELOADED:
            return
        _PRELOADED.add((top, model))
    name = persistent_cache.read_entry(_first_folder(), _first_name(model), FIRST_MAGIC)
    if name is None or len(name) != 64 or name.strip(b"0123456789abcdef"):       # a program key, hex
        return
    name, future = name.decode("ascii"), Future()
    with _LOCK:
        if (top, name) in _PRELOADS:
            return
        _PRELOADS[(top, name)] = future       # before the thread starts: a call that comes first waits for it

    def run():
        try:
            future.set_result(_load_file(top, name))
        except BaseException as exc:  # noqa: BLE001  (_load_file returns None for what it expects; the rest too)
            _LOG.debug("preloading %s failed (%s)", name, exc)
            future.set_result(None)

    try:
        threading.Thread(target=run, name="blip-jax-preload").start()
    except RuntimeError as exc:        # no thread to be had: the call loads the program itself
        _LOG.debug("preloading %s not started (%s)", name, exc)
        future.set_result(None)


def _take_preloaded(top, name: str):
    """The Future of ``name`` in ``top`` that ``preload`` started, removed from the table (or None)."""
    with _LOCK:
        return _PRELOADS.pop((top, name), None)


# An executable jax read from its own persistent cache runs, but serializes without its code on CPU (jaxlib
# 0.10: "Function ... not found" when the copy runs). So a stored program is compiled by XLA in this process:
# with an explicit XLA default among its options (the same code, another key for jax's cache), under a
# compile-time threshold that keeps jax from writing that key; jax's hit counter is the safety net.
_FRESH_OPTIONS = {"xla_embed_ir_in_executable": False}
_HITS = [0]


def _count_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _HITS[0] += 1


jax.monitoring.register_event_listener(_count_hits)


def _compile_fresh(lowered):
    """``(compiled, fresh)``: ``lowered`` compiled by XLA, not read from jax's persistent cache (``fresh``
    False if it was anyway: such an executable is run, not stored)."""
    threshold, hits = jax.config.jax_persistent_cache_min_compile_time_secs, _HITS[0]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = lowered.compile(compiler_options=_FRESH_OPTIONS)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    return compiled, _HITS[0] == hits
