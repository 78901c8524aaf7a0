"""Plumbing shared by the JAX/Flax BLIP classes: dtypes, parameters from the weight table, input checks,
loading and saving through ``blip_core.pretrained``.

A model object holds a Flax linen ``module`` (structure only), its ``params`` (a nested dict whose paths are
exactly the weight table's jax paths, e.g. ``("vision_model", "encoder", "layers_0", "self_attn", "qkv",
"kernel")``) and the ``config``. Tied rows of the table (the LM head's decoder) have no entry: the module reads
the word embedding instead, so the tie can never drift.
"""
from __future__ import annotations

import collections
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip_core import persistent_cache
from blip_core.cache import COMPILE_CACHE_SIZE, LRU
from blip_core.checkpoint.dtypes import is_floating
from blip_core.configs import _Config, config_from_dict
from blip_core.generation import check_token_ids
from blip_core.pretrained import hf_loading_kwargs, load_items, open_pretrained, write_pretrained
from blip_core.weights import backend_params, random_weights, weight_table

from .loading import load_params, on_cpu, place, resolve_device

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_JITTED: dict = {}                       # (class, function, config repr, dtype) -> jitted function
_TRACES: collections.Counter = collections.Counter()
_VARIANTS: dict = {}                     # same key -> LRU of per-variant jitted functions (generation)


_PERSISTENT: dict = {}                   # "dir": the persistent cache folder applied (None: off), once per process


def apply_persistent_cache():
    """Point jax's persistent compilation cache at the spec layer's folder (``blip_core.persistent_cache``),
    once, before the first program is compiled; a folder the caller configured stays."""
    if "dir" not in _PERSISTENT:
        _PERSISTENT["dir"] = jax.config.jax_compilation_cache_dir
        if _PERSISTENT["dir"] is None:
            path = persistent_cache.cache_dir("jax", jax.__version__)
            if path is not None:
                persistent_cache.prune()
                jax.config.update("jax_compilation_cache_dir", path)
                jax.config.update("jax_persistent_cache_min_compile_time_secs", persistent_cache.MIN_COMPILE_SECONDS)
            _PERSISTENT["dir"] = path
    return _PERSISTENT["dir"]


def resolve_dtype(dtype) -> np.dtype:
    """``None`` (float32, as transformers loads by default), a name, or a numpy/jax dtype."""
    if dtype is None:
        return np.dtype(jnp.float32)
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"the JAX backend supports dtypes {sorted(DTYPES)}, got {dtype!r}")
    return np.dtype(DTYPES[name])


def unflatten(flat: dict, dtype=None) -> dict:
    """``{path tuple: array}`` -> nested param dict of jax arrays (floats cast to ``dtype``), ready when it
    returns. On the CPU each float array is copied (and cast) on the host into a buffer the jax array takes
    as its own (``loading.place``); jax's own copies would run on after the return, into the first call."""
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr)
        if on_cpu(None) and is_floating(arr.dtype) and (dtype is None or is_floating(dtype)):
            out[path] = place(arr, None, arr.dtype if dtype is None else dtype)
        else:
            out[path] = jnp.asarray(arr, dtype=dtype) if dtype is not None else jnp.asarray(arr)
    return traverse_util.unflatten_dict(jax.block_until_ready(out))


def flatten(params: dict) -> dict:
    """Nested params -> ``{path tuple: numpy array}``."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# -- inputs --------------------------------------------------------------------------------------------
def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _kind(x) -> str:
    return np.dtype(x.dtype).kind if hasattr(x, "dtype") else np.asarray(x).dtype.kind


def as_input(x, name: str, kinds: str, ndim: int = None):
    """A numpy / jax / list input as an array, with a clear error for a wrong dtype or rank."""
    if x is None:
        return None
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    kind = _kind(x)
    if kind not in kinds and np.dtype(x.dtype).name != "bfloat16":
        want = {"iu": "an integer", "f": "a floating-point"}.get(kinds, "a numeric")
        raise ValueError(f"{name} has dtype {x.dtype}, expected {want} array")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def token_ids(x, name: str, vocab_size: int, max_positions: int = None):
    """Integer (batch, length) ids, checked against the vocabulary when their values are known."""
    x = as_input(x, name, "iu", ndim=2)
    if x is None:
        return None
    if is_concrete(x):
        check_token_ids(np.asarray(x), vocab_size, name)
    if max_positions is not None and x.shape[1] > max_positions:
        raise ValueError(f"{name} has length {x.shape[1]} but max_position_embeddings is {max_positions}")
    return cast(x, np.int32)


def mask_like(mask, ids_shape, name: str = "attention_mask"):
    """A 0/1 mask matching ``ids_shape``; ``None`` means all ones."""
    if mask is None:
        return np.ones(ids_shape, np.int32)
    mask = as_input(mask, name, "iubf", ndim=2)
    if tuple(mask.shape) != tuple(ids_shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the ids shape {tuple(ids_shape)}")
    return cast(mask, np.int32)


def pixels(x, dtype):
    x = as_input(x, "pixel_values", "f", ndim=4)
    if x is None:
        raise ValueError("pixel_values are required")
    return cast(x, dtype)


def cast(x, dtype):
    """``x`` in ``dtype``. A host (numpy) input stays on the host when numpy's cast is exact, i.e. XLA's
    (float32 or int32 out of numbers that fit): a compiled program takes numpy arguments as they are, while
    an eager ``jnp`` cast compiles a small XLA program of its own in every new process (cold start)."""
    dtype = np.dtype(dtype)
    if isinstance(x, np.ndarray) and (x.dtype == dtype or dtype in _HOST_CASTS):
        return x.astype(dtype, copy=False)
    return jnp.asarray(x).astype(dtype)


_HOST_CASTS = (np.dtype(np.float32), np.dtype(np.int32))


class JaxModel:
    """Base of the public classes: ``Cls(config, seed=0, dtype=None)``, ``from_pretrained``, ``save_pretrained``.

    Subclasses set ``config_class`` and implement ``_module()`` (the linen module). Random weights are the
    spec layer's seeded draw (``blip_core.weights.random_weights``) laid out as loading lays out a checkpoint.
    """

    config_class = _Config
    mesh = None          # the jax.sharding.Mesh the params are split over (``shard``), or None: one device

    def __init__(self, config, seed: int = 0, dtype=None):
        config = self._check_config(config)
        dt = resolve_dtype(dtype)
        self._preload(config, dt)
        name = type(self).__name__
        flat = backend_params(weight_table(name, config), random_weights(name, config, seed), "jax")
        self._setup(config, unflatten(flat, dt), dt)

    @classmethod
    def _check_config(cls, config):
        if isinstance(config, dict):
            config = config_from_dict(config) if "model_type" in config else cls.config_class.from_dict(config)
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        return config

    @classmethod
    def _preload(cls, config, dtype) -> None:
        """Start loading the program the last process ran first for this class, config and dtype, while the
        weights are made or read (``program_cache.preload``; the persistent cache on)."""
        from . import program_cache
        program_cache.preload((cls.__name__, repr(config), np.dtype(dtype).name))

    def _setup(self, config, params, dtype):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.module = self._module()
        self.params = params

    def _jit(self, name: str, method: str, static_argnames=(), variant=None):
        """The compiled ``self.<method>``, shared by every model of this class, config and dtype.

        Params are an argument, never a constant, so models that differ only in weights (a fresh
        ``from_pretrained``, a seed) reuse one compiled program. ``trace_count(name)`` tells how often it was
        traced (recompilation checks). Called with concrete arguments, each call signature (shapes, dtypes,
        static arguments) runs its own program from ``_program``: with the persistent cache on, one stored on
        disk by an earlier process, so a new process does not trace the model. Inside a user's transform
        (``jax.grad``, ``jax.jit``), or for a model split over a mesh, it is the jitted method.

        With ``variant`` (static settings and input shapes of one ``generate`` call), each variant gets
        its own jitted function in a bounded ``LRU`` (``blip_core.cache.COMPILE_CACHE_SIZE``): an
        evicted function takes its compiled program with it.
        """
        key = (type(self).__name__, name, repr(self.config), self.dtype.name)
        if variant is not None:
            return _VARIANTS.setdefault(key, LRU(COMPILE_CACHE_SIZE)).get(
                variant, lambda: self._make_jit(key, method, static_argnames))
        if key not in _JITTED:
            _JITTED[key] = self._make_jit(key, method, static_argnames)
        return _Dispatch(self, name, method, frozenset(static_argnames), _JITTED[key])

    def _program(self, name: str, method: str, args: tuple, _dynamic=None, _jitted=None, **static):
        """The jitted ``self.<method>`` for positional ``args``, keyword arguments ``_dynamic`` (traced) and
        keyword ``static`` arguments, from the bounded ``LRU`` of compiled programs. The key holds the static
        values and the shape and dtype of every argument, so each entry holds exactly one XLA program (callers
        round shapes to ``blip_core.cache`` buckets first, so that typical calls share one). With the
        persistent cache on, a new process reads the traced program from disk instead of tracing the model
        (``program_cache``). ``_jitted``: the jitted method to fall back on (else one made for this entry)."""
        dynamic = _dynamic or {}
        leaves, tree = jax.tree_util.tree_flatten((args, dynamic) if dynamic else args)
        # the caller's matmul precision (a context or the flag) is traced into the program (``float32_products``)
        signature = (tuple(sorted(static.items())), tree, repr(self.mesh), tuple(map(_aval, leaves)),
                     jax.config.jax_default_matmul_precision)
        key = (type(self).__name__, name, repr(self.config), self.dtype.name)
        return _VARIANTS.setdefault(key, LRU(COMPILE_CACHE_SIZE)).get(
            signature, lambda: self._make_program(key, method, args, static, dynamic, _jitted))

    def _make_program(self, key, method: str, args: tuple, static: dict, dynamic=None, jitted=None):
        """The program of one variant: the traced program stored on disk by an earlier process (or traced now
        and stored, ``program_cache``), else the jitted method. A model split over a mesh is always jitted."""
        jitted = jitted or self._make_jit(key, method, tuple(sorted(static)))
        if self.mesh is not None:
            return jitted
        from . import program_cache
        return program_cache.stored_program(key, jitted, args, static, dynamic) or jitted

    def _make_jit(self, key, method: str, static_argnames):
        shell = object.__new__(type(self))          # holds no params: the cache must not keep weights alive
        shell.__dict__.update(config=self.config, dtype=self.dtype, module=self.module)
        fn = getattr(shell, method)

        def counted(*args, **kwargs):
            _TRACES[key] += 1                       # runs only while tracing
            with float32_products(shell.dtype):
                return fn(*args, **kwargs)
        apply_persistent_cache()
        return jax.jit(counted, static_argnames=static_argnames)

    def trace_count(self, name: str) -> int:
        """How many times the compiled function ``name`` ("forward", "generate", ...) has been traced."""
        return _TRACES[(type(self).__name__, name, repr(self.config), self.dtype.name)]

    def _params(self, params):
        return self.params if params is None else params

    # -- files -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype=None, allow_pickle_bin: bool = False, device=None, strict: bool = True,
                        seed: int = 0, **hf_kwargs):
        """Load a Hugging Face directory (config.json + safetensors, or .bin when allowed).

        Cross-class loading, ``strict`` and ``seed`` as in every backend (``blip_core.pretrained``).
        Tensors stream from the memory-mapped files to ``device`` (jax's default device, or one named
        ``"cpu"`` / ``"gpu"`` / ``"cuda:1"``) one at a time, cast and laid out there
        (``backends.jax.loading``): peak host memory is about one tensor above the model.
        ``mesh=`` (a ``jax.sharding.Mesh`` with a "model" axis) instead splits the params tensor-parallel
        over its devices as ``shard`` does, each tensor streamed from the file straight onto its shards.
        """
        mesh = hf_kwargs.pop("mesh", None)
        leaf_dtype = hf_kwargs.pop("_leaf_dtype", None)     # (path -> dtype), for the mesh path
        dtype, device = hf_loading_kwargs(dtype, device, **hf_kwargs)
        if mesh is not None and device not in (None, "auto"):
            raise ValueError(f"pass mesh or device, not both (device={device!r})")
        dt = resolve_dtype(dtype)
        config, table, refs = open_pretrained(path, cls.__name__, allow_pickle_bin=allow_pickle_bin, strict=strict,
                                              seed=seed)
        if mesh is None:               # a model split over a mesh runs jitted programs only
            cls._preload(config, dt)
        items = load_items(table, refs, "jax")
        model = cls.__new__(cls)
        if mesh is None:
            model._setup(config, traverse_util.unflatten_dict(load_params(items, dt, resolve_device(device), leaf_dtype)), dt)
        else:
            from .sharding import load_sharded, param_shardings
            shardings = param_shardings(cls.__name__, config, mesh)
            flat = load_sharded(items, shardings, leaf_dtype or (lambda _: dt))
            model._setup(config, traverse_util.unflatten_dict(flat), dt)
            model.mesh = mesh
        return model

    def shard(self, mesh, axis: str = "model"):
        """Split the params tensor-parallel over ``mesh``'s axis ``axis`` and return the model.

        The rule is ``blip_core.sharding``'s (column-parallel q/k/v and first feed-forward layers, row-parallel
        attention outputs and second feed-forward layers, vocabulary-split embeddings and LM heads, the rest
        replicated). Every compiled call then runs as one program over the mesh (XLA's SPMD partitioner adds
        the collectives); results are the single-device ones up to float32 rounding.
        """
        from .sharding import shard_params
        self.params = shard_params(self.params, type(self).__name__, self.config, mesh, axis)
        self.mesh = mesh
        return self

    def save_pretrained(self, path: str, max_shard_size="5GB") -> None:
        """Write config.json + safetensors that transformers and the other backends load."""
        write_pretrained(path, self.config, type(self).__name__, "jax", flatten(self.params),
                         max_shard_size=max_shard_size)

    def astype(self, dtype):
        """A copy of the model with its parameters cast to ``dtype``."""
        dt = resolve_dtype(dtype)
        model = type(self).__new__(type(self))
        model._setup(self.config, jax.tree_util.tree_map(lambda a: a.astype(dt), self.params), dt)
        model.mesh = self.mesh           # a cast keeps every array's sharding
        return model

    def num_parameters(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self.params)))


def float32_products(dtype):
    """While a float32 model is traced: its matrix products in float32 on every device, as torch's and the CPU's
    are. XLA's default precision on a GPU (TPU) rounds float32 operands to TF32 (bfloat16 passes): BLIP-large's
    float32 logits moved 2e-3 from transformers' on an H200, 3e-6 in float32. A precision the caller chose
    (``jax.default_matmul_precision(...)``, or the ``jax_default_matmul_precision`` flag) is left as it is."""
    if np.dtype(dtype) == np.float32 and jax.config.jax_default_matmul_precision is None:
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


def _aval(x):
    """What a compiled program needs to know of an argument: shape, dtype, weak typing (a Python scalar: its
    type). Read from the attributes, it costs well under a millisecond for BLIP's ~500 params per call."""
    try:
        return x.shape, x.dtype, getattr(x, "weak_type", False)
    except AttributeError:
        return type(x)


class _Dispatch:
    """What ``JaxModel._jit`` returns: called as the jitted method (arrays positional or by keyword, static
    arguments by keyword), it runs the program of the call's signature (``JaxModel._program``). Tracers (a
    user's ``jax.grad`` / ``jax.jit`` around the model) and a model split over a mesh go to the jitted
    method; any other attribute (``lower``, ``trace``, ...) is the jitted method's."""

    def __init__(self, model, name, method, static_argnames, jitted):
        self._model, self._name, self._method, self._static, self._jitted = model, name, method, static_argnames, jitted

    def __call__(self, *args, **kwargs):
        static = {k: v for k, v in kwargs.items() if k in self._static}
        dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
        if self._model.mesh is not None or any(isinstance(x, jax.core.Tracer)
                                               for x in jax.tree_util.tree_leaves((args, dynamic))):
            return self._jitted(*args, **kwargs)
        fn = self._model._program(self._name, self._method, args, _dynamic=dynamic, _jitted=self._jitted, **static)
        return fn(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._jitted, attr)


# -- small numerics shared by the towers -----------------------------------------------------------------
def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names; "gelu" is the exact erf form (Flax's default nn.gelu is the tanh one).
def _gelu_erf(x):
    # torch's formula, x/2 * (1 + erf(x/sqrt 2)): one rational polynomial per element. (jax.nn.gelu's exact
    # form goes through erfc and evaluates two approximations and an exp for every element, ~3x the cost.)
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(0.7071067811865476)))


_ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu, "tanh": jnp.tanh,
}


def activation(name: str):
    """The activation ``name``, evaluated in float32 and cast back (as torch's opmath does for bf16)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    fn = _ACTIVATIONS[name]
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


def softmax(scores):
    """Softmax over the last axis in float32, returned in the input dtype."""
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
