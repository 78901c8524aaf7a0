"""Traced generation programs on disk, keyed by the call: a new process runs the stored graph without tracing.

TensorFlow's persistent XLA cache (``backends/tf/xla_cache.py``) keeps compiled executables, but it is keyed
by the lowered program: every process first runs the model's Python to trace the ``tf.function`` (seconds
for BLIP's generate: some 8,000 graph ops) and only then finds the executable. This module keeps the traced
program itself, the ``FunctionDef``s of the concrete function and of the functions it calls (the decoding
``while`` loop), keyed by the call. A later process with the same key registers them with the eager
context and calls the function by name: the model's Python is not run, and XLA, given the very same
function, finds its executable in the persistent cache.

* Weights are inputs of the stored function (the variables' handles, the function's captured inputs, by
  their weight-table paths), never constants: one entry serves every checkpoint of a config.
* The key names everything the traced graph depends on (``program_key``): class, program key (its tag and
  the decoding plan), config, dtype, the structure, shapes and dtypes of the arguments, the paths, shapes,
  dtypes and devices of the weights, TensorFlow's version, the machine, and a digest of the sources of
  ``blip_core`` and ``backends/tf``. Any change is another key, so another file, and a new trace.
* The functions are stored under names made from the key (``<name>_p<key>``), so they cannot clash with the
  functions of this process, and the XLA cache key (function name and lowered program) is the same in every
  process that uses the entry.
* Files sit under ``<cache root>/tf-programs-<tf version>``, written through a rename with a digest of their
  content (``blip_core.persistent_cache.write_atomic``): a missing, truncated or damaged file, or one this
  TensorFlow cannot load or run, means tracing (and the file is deleted), never a crash.
* The tracing process runs the function it stores, by name as a later process does: every process with the
  cache on runs the same XLA program, so ids and scores agree bit for bit (and with the plain ``tf.function``
  of a process with the cache off: the same graph under other names).

``BLIP_COMPILE_CACHE=0`` turns this off with the rest: a plain ``tf.function`` then runs, nothing is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import function_pb2
from tensorflow.python.eager import context
from tensorflow.python.eager.polymorphic_function import function_type_utils

from blip_core import persistent_cache

from .xla_cache import tensorflow_version

MAGIC = b"blip-tf-program-1\n"
_LOG = logging.getLogger(__name__)
_STATE: dict = {}
_SOURCES = (os.path.dirname(os.path.abspath(persistent_cache.__file__)), os.path.dirname(os.path.abspath(__file__)))


def folder():
    """``<root>/tf-programs-<tf version>`` (created), or None when the persistent cache is off."""
    top = persistent_cache.root()
    if _STATE.get("root", False) != top:
        _STATE.update(root=top, dir=persistent_cache.cache_dir("tf-programs", tensorflow_version()))
    return _STATE["dir"]


def _leaf_spec(x):
    return None if x is None else (tuple(x.shape.as_list()), x.dtype.name)


def program_key(model, key, args, params) -> str:
    """Hex digest naming the traced program ``key`` of ``model`` for ``args`` (a nest of tensors and None)
    and ``params`` (weight path -> variable), in this installation on this machine."""
    parts = (
        type(model).__module__, type(model).__name__, repr(key), repr(model.config), model.dtype.name,
        repr(tf.nest.map_structure(lambda x: 0, args)),            # the structure ...
        tuple(_leaf_spec(x) for x in tf.nest.flatten(args)),       # ... and its leaves
        tuple((p, tuple(v.shape.as_list()), v.dtype.name, v.device) for p, v in params.items()),
        tensorflow_version(), tf.__version__, persistent_cache.host_fingerprint(), persistent_cache.source_fingerprint(_SOURCES),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# -- entries ------------------------------------------------------------------------------------------------
class Entry:
    """A stored program: its functions, the main one's name, the weight paths of its trailing inputs and
    which of its (tuple) outputs are None."""

    def __init__(self, library: function_pb2.FunctionDefLibrary, name: str, params: list, outputs):
        self.library, self.name, self.params, self.outputs = library, name, params, outputs

    def to_bytes(self) -> bytes:
        head = json.dumps({"name": self.name, "params": self.params, "outputs": self.outputs}).encode()
        return struct.pack("<Q", len(head)) + head + self.library.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Entry":
        (n,) = struct.unpack("<Q", data[:8])
        head = json.loads(data[8:8 + n].decode())
        library = function_pb2.FunctionDefLibrary.FromString(data[8 + n:])
        if not isinstance(head.get("params"), list) or head["name"] not in {f.signature.name for f in library.function}:
            raise ValueError("not a stored program")
        outputs = head["outputs"]
        if not (outputs == "tensor" or (isinstance(outputs, list) and all(isinstance(o, bool) for o in outputs))):
            raise ValueError("not a stored program")
        return cls(library, head["name"], list(head["params"]), outputs)

    def register(self) -> None:
        """Add the functions to the eager context (the ones already there, by their unique names, stay)."""
        ctx = context.context()
        main = None
        for fdef in self.library.function:
            if fdef.signature.name == self.name:
                main = fdef
            elif not ctx.has_function(fdef.signature.name):
                ctx.add_function_def(fdef)
        if not ctx.has_function(self.name):          # last: the functions it calls are there
            ctx.add_function_def(main)

    def __call__(self, flat_inputs, params):
        handles = [params[p].handle for p in self.params]
        n = len(self.outputs) - sum(self.outputs) if isinstance(self.outputs, list) else 1
        out = context.context().call_function(self.name.encode(), list(flat_inputs) + handles, n)
        if self.outputs == "tensor":
            return out[0]
        it = iter(out)
        return tuple(None if none else next(it) for none in self.outputs)


def _renamed(cf, suffix: str):
    """The concrete function's FunctionDef and those it calls, every name given ``suffix``."""
    fdefs = [cf.function_def] + list(cf.graph.as_graph_def().library.function)
    names = {f.signature.name for f in fdefs}
    library = function_pb2.FunctionDefLibrary()

    def rename_attr(value):
        if value.HasField("func") and value.func.name in names:
            value.func.name += suffix
        if value.HasField("list"):
            for fn in value.list.func:
                if fn.name in names:
                    fn.name += suffix

    for fdef in fdefs:
        if fdef.signature.name in {f.signature.name for f in library.function}:
            continue
        f = library.function.add()
        f.CopyFrom(fdef)
        f.signature.name += suffix
        for node in f.node_def:
            if node.op in names:
                node.op += suffix
            for value in node.attr.values():
                rename_attr(value)
        for value in f.attr.values():
            rename_attr(value)
    return library, cf.function_def.signature.name + suffix


def export(cf, flat_inputs, params: dict, suffix: str):
    """An ``Entry`` of the traced ``cf`` called with ``flat_inputs``, or None when it cannot stand alone
    (an input that is not a weight, outputs that are not a tuple of tensors)."""
    by_handle = {id(v.handle): p for p, v in params.items()}
    captured = [by_handle.get(id(h)) for h in cf.captured_inputs]
    if None in captured or len(cf.inputs) != len(flat_inputs) + len(captured):
        return None
    out = cf.structured_outputs
    if isinstance(out, tf.Tensor):
        outputs = "tensor"
    elif isinstance(out, tuple) and all(o is None or isinstance(o, tf.Tensor) for o in out):
        outputs = [o is None for o in out]
    else:
        return None
    library, name = _renamed(cf, suffix)
    return Entry(library, name, captured, outputs)


def load(name: str):
    payload = persistent_cache.read_entry(folder(), name, MAGIC)
    if payload is None:
        return None
    try:
        return Entry.from_bytes(payload)
    except Exception as exc:      # noqa: BLE001  (whole but not a program of ours: trace instead)
        _LOG.debug("stored program %s not loadable (%s); tracing", name, exc)
        discard(name)
        return None


def discard(name: str) -> None:
    persistent_cache.discard_entry(folder(), name)


def store(name: str, entry: Entry) -> None:
    """Write ``entry`` under ``name``; best effort (a full or read-only disk only costs a later trace)."""
    persistent_cache.write_entry(folder(), name, MAGIC, entry.to_bytes)


# -- the callable ------------------------------------------------------------------------------------------
def _tensor(x):
    if x is None or isinstance(x, tf.Tensor):
        return x
    if isinstance(x, (np.ndarray, tf.Variable)):
        return tf.convert_to_tensor(x)
    raise TypeError("a Python value among the arguments")       # static in a tf.function: not keyed here


class StoredProgram:
    """``fn`` (a ``tf.function(jit_compile=True)``) called through the program store: the first call of an
    argument signature reads its entry from disk, or traces ``fn`` and writes the entry, and every call runs
    the stored function by name. Arguments this cannot key (Python values) go to ``fn``.

    ``experimental_get_tracing_count()`` is, as a ``tf.function``'s, the programs it holds (traced here or
    read from disk); ``traces`` counts the traces of the model's Python alone."""

    def __init__(self, model, key, fn):
        self.model, self.key, self.fn = model, key, fn
        self.entries: dict = {}        # argument signature -> Entry, or None: call fn

    @property
    def traces(self) -> int:
        return self.fn.experimental_get_tracing_count()

    def experimental_get_tracing_count(self) -> int:
        return max(len(self.entries), self.fn.experimental_get_tracing_count())

    def __call__(self, *args):
        if not tf.executing_eagerly():       # inside a caller's tf.function (a SavedModel export): its graph
            return self.fn(*args)
        try:
            args = tf.nest.map_structure(_tensor, args)
        except TypeError:
            return self.fn(*args)
        flat = [x for x in tf.nest.flatten(args) if x is not None]
        params = self.model.params
        name = program_key(self.model, self.key, args, params)
        if name not in self.entries:
            self.entries[name] = self._prepare(name, args, flat, params)
        entry = self.entries[name]
        if entry is not None:
            try:
                return entry(flat, params)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnimplementedError,
                    tf.errors.FailedPreconditionError) as exc:
                if self.fn.experimental_get_tracing_count():
                    raise                      # traced in this process: the error is the program's own
                _LOG.debug("stored program %s failed (%s); tracing", name, exc)
                discard(name)
                self.entries[name] = entry = self._trace(name, args, flat, params)
                if entry is not None:
                    return entry(flat, params)
        return self.fn(*args)

    def _prepare(self, name, args, flat, params):
        entry = load(name)
        if entry is not None:
            try:
                entry.register()
                return entry
            except Exception as exc:      # noqa: BLE001  (a graph this TensorFlow refuses: trace instead)
                _LOG.debug("stored program %s not registered (%s); tracing", name, exc)
                discard(name)
        return self._trace(name, args, flat, params)

    def _trace(self, name, args, flat, params):
        cf = self.fn.get_concrete_function(*args)
        try:
            if not _same_order(cf, args, flat):
                return None
            entry = export(cf, flat, params, "_p" + name[:16])
            if entry is None:
                return None
            entry.register()
        except Exception as exc:      # noqa: BLE001  (the traced tf.function runs instead)
            _LOG.debug("program %s not exported (%s)", name, exc)
            return None
        store(name, entry)
        return entry


def _same_order(cf, args, flat) -> bool:
    """Whether ``flat`` is the order in which the concrete function takes the tensors of ``args``."""
    bound = function_type_utils.canonicalize_function_inputs(args, {}, cf.function_type)
    canon = cf.function_type.unpack_inputs(bound)
    return len(canon) == len(flat) and all(a is b for a, b in zip(canon, flat))


def stored(model, key, fn):
    """``fn`` behind the program store, or ``fn`` itself when the persistent cache is off."""
    return fn if folder() is None else StoredProgram(model, key, fn)
