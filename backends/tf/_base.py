"""Shared plumbing of the TensorFlow backend: dtypes, input conversion, parameters, small layers.

Models are plain ``tf.Module`` objects whose weights are ``tf.Variable``s named by the weight
table's tf paths (``blip_core.weights``), kept in one flat dict ``model.params``. There is no
Keras: a Keras layer names its weights from the build order and name scopes, which would have to
be renamed to match the table; here the table *is* the variable naming, so loading, saving and
SavedModel export need no translation layer. Layers below are thin views over that dict.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import numpy as np
import tensorflow as tf

from blip_core import pretrained
from blip_core.cache import COMPILE_CACHE_SIZE, LRU
from blip_core.generation import check_token_ids
from blip_core.numerics import MASK_VALUE
from blip_core.weights import backend_params, owned, random_weights, weight_table

from .loading import LazyValues, tf_device

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


def resolve_dtype(dtype) -> tf.DType:
    """'float32' / 'bfloat16' (or the tf / numpy dtype) -> tf.DType; None means float32."""
    if dtype is None:
        return tf.float32
    if isinstance(dtype, tf.DType):
        name = dtype.name
    else:
        name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("tf.", "").replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} for the TensorFlow backend; use 'float32' or 'bfloat16'")
    return _DTYPES[name]


def as_float(x, dtype: tf.DType, name: str) -> tf.Tensor:
    """A numpy / tf floating input as a tf tensor of the model's dtype."""
    if x is None:
        raise ValueError(f"{name} is required")
    if not isinstance(x, (tf.Tensor, tf.Variable)):
        arr = np.asarray(x)
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        x = tf.convert_to_tensor(arr) if arr.dtype != object else arr
    if getattr(x, "dtype", None) is None or not isinstance(x.dtype, tf.DType) or not x.dtype.is_floating:
        got = getattr(getattr(x, "dtype", None), "name", type(x).__name__)
        raise ValueError(f"{name} must be a floating-point array, got dtype {got}")
    return tf.cast(x, dtype)


def lookup(table, ids):
    """Rows of an embedding table; an id outside it (possible only for a caller's traced ids, whose
    values are not checked on the host) gives a NaN row, where XLA's gather would clamp it."""
    n = tf.shape(table, out_type=ids.dtype)[0]
    rows = tf.gather(table, tf.clip_by_value(ids, 0, n - 1))
    return tf.where(((ids >= 0) & (ids < n))[..., None], rows, tf.constant(float("nan"), rows.dtype))


def _symbolic(x) -> bool:
    """True for a graph tensor (inside a user's tf.function): its values cannot be checked here."""
    return isinstance(x, tf.Tensor) and not hasattr(x, "numpy")


def _static_rank2(t, name):
    if t.shape.rank == 1:
        t = t[None]
    if t.shape.rank != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(t.shape)}")
    return t


def as_ids(x, vocab_size: int, name: str = "input_ids", allow_ignore: bool = False):
    """Token ids (numpy or tf) as an int32 tensor of shape (batch, length), checked against the vocabulary.

    Eager and numpy inputs are checked before any compute; graph tensors (a caller's tf.function)
    get the dtype and shape checks only.
    """
    if x is None:
        return None
    if _symbolic(x):
        if not x.dtype.is_integer:
            raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype.name}")
        return tf.cast(_static_rank2(x, name), tf.int32)
    arr = x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {arr.shape}")
    check_token_ids(arr[arr != -100] if allow_ignore else arr, vocab_size, name)
    return tf.constant(arr.astype(np.int32))


def as_mask(x, like_shape, name: str = "attention_mask"):
    """A 0/1 mask (numpy or tf) as float32 of ``like_shape``; None -> None."""
    if x is None:
        return None
    t = x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.constant(np.asarray(x))
    if t.shape.rank == 1:
        t = t[None]
    if not t.shape.is_compatible_with(like_shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the ids have shape {tuple(like_shape)}")
    return tf.cast(t, tf.float32)


def as_positions(x, max_positions: int):
    """Explicit position ids (numpy or tf) as int32 (batch, length), checked against the position table."""
    return as_ids(x, max_positions, "position_ids")


def same_dim(a, b) -> bool:
    """Static dimensions agree (an unknown dimension, inside a traced function, agrees with anything)."""
    return a is None or b is None or int(a) == int(b)


# -- spellings for XLA -------------------------------------------------------------------------
# TensorFlow converts a graph to XLA each time a process first runs it, also when the compiled executable
# comes from the persistent cache (``xla_cache``: that cache is keyed by the converted program). TF 2.21
# converts a few ops (Rsqrt, Sqrt, Exp, Softmax, LogSoftmax, Tanh, FusedBatchNormV3, MatrixBandPart, ...)
# through a per-op MLIR pipeline that costs several ms of CPU per node, where a native kernel takes ~0.1 ms:
# 0.5 to 1.3 s of CPU (by the machine's load) of every new process's first BLIP caption went to its 102
# layer-norm rsqrts and 60 softmaxes.
# Graphs traced for XLA (``for_xla``) spell those two through native kernels that XLA lowers to the very
# same HLO (same numbers, bit for bit); eager and plain-graph code keeps the usual ops, whose TF kernels
# round differently.
_XLA_TRACE = threading.local()


def for_xla(fn):
    """``fn`` tracing with the XLA spellings below (wrap the Python of a ``tf.function(jit_compile=True)``)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with xla_spelling():
            return fn(*args, **kwargs)
    return traced


@contextlib.contextmanager
def xla_spelling(on: bool = True):
    before = getattr(_XLA_TRACE, "on", False)
    _XLA_TRACE.on = on
    try:
        yield
    finally:
        _XLA_TRACE.on = before


def _xla_trace() -> bool:
    return getattr(_XLA_TRACE, "on", False) and not tf.executing_eagerly()


def rsqrt_eps(var, eps: float):
    """``rsqrt(var + eps)`` of a float32 tensor. For XLA: FusedBatchNorm's inference on ones with unit
    scale and zero offset and mean, ``1 * (1 * rsqrt(var + eps)) + (0 - 0 * ...)``, exactly the rsqrt."""
    if not (_xla_trace() and var.dtype == tf.float32):
        return tf.math.rsqrt(var + eps)
    flat = tf.reshape(var, [-1])
    ones, zeros = tf.ones_like(flat), tf.zeros_like(flat)
    y = tf.raw_ops.FusedBatchNorm(x=tf.reshape(ones, [1, 1, 1, -1]), scale=ones, offset=zeros, mean=zeros,
                                  variance=flat, epsilon=eps, is_training=False)[0]
    return tf.reshape(y, [dim(var, i) for i in range(len(var.shape))])


def plus_bias(y, bias):
    """``y + bias`` for a product ``y``. For XLA, one row (a decoding step at batch 1): XLA:CPU fuses an add
    that follows a matrix-vector product into it, which takes the product off its fast path (BLIP base's 98
    decoder products plus the LM head, one row: 30 against 24 ms a step). It fuses only an add, so this spells
    the add as ``y - (-bias)``, the same number in IEEE arithmetic (subtraction is addition of the negation).
    Several rows are not matrix-vector products; they keep the add."""
    if _xla_trace() and _one_row(y):
        return y - (-bias)
    return y + bias


def _one_row(y) -> bool:
    """Every axis but the last is statically 1."""
    dims = y.shape[:-1]
    return dims.rank is not None and all(d == 1 for d in dims)


def softmax(x):
    """Softmax over the last axis. For XLA (float32): the probabilities minus zero labels that
    SoftmaxCrossEntropyWithLogits returns as its gradient (max, exp of the difference, sum, divide: the
    HLO of Softmax; its loss output is dead code XLA drops)."""
    if not (_xla_trace() and x.dtype == tf.float32):
        return tf.nn.softmax(x, axis=-1)
    shape = [dim(x, i) for i in range(len(x.shape))]
    flat = tf.reshape(x, [-1, shape[-1]])
    probs = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=flat, labels=tf.zeros_like(flat))[1]
    return tf.reshape(probs, shape)


# -- layers ------------------------------------------------------------------------------------
def activation(name: str):
    """Hugging Face ACT2FN names -> a TF function (exact erf GELU for 'gelu', as torch)."""
    acts = {
        "gelu": lambda x: tf.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: tf.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * tf.sigmoid(1.702 * x),
        "relu": tf.nn.relu,
        "silu": tf.nn.silu,
        "swish": tf.nn.silu,
        "tanh": tf.tanh,
    }
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}")
    return acts[name]


class Dense(tf.Module):
    """``x @ kernel + bias`` over the last axis; kernel stored (in, out) as the table says."""

    def __init__(self, params: dict, prefix: str, bias: bool = True):
        super().__init__(name=None)
        self.kernel = params[f"{prefix}/kernel"]
        self.bias = params[f"{prefix}/bias"] if bias else None

    def __call__(self, x):
        y = tf.matmul(x, self.kernel)
        return plus_bias(y, self.bias) if self.bias is not None else y


class LayerNorm(tf.Module):
    """LayerNorm with biased variance like torch; statistics in float32 so bfloat16 stays stable."""

    def __init__(self, params: dict, prefix: str, eps: float):
        super().__init__(name=None)
        self.gamma, self.beta, self.eps = params[f"{prefix}/gamma"], params[f"{prefix}/beta"], float(eps)

    def __call__(self, x):
        x32 = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x32, axis=-1, keepdims=True)
        var = tf.reduce_mean(tf.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * rsqrt_eps(var, self.eps)
        y = y * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(y, x.dtype)


def dim(x, axis: int):
    """``x``'s size along ``axis``: the static int when the trace knows it (a constant, no shape ops in the
    graph: fewer nodes for XLA to convert at each process start), else a scalar tensor."""
    size = x.shape[axis]
    return int(size) if size is not None else tf.shape(x)[axis]


def split_heads(x, heads: int):
    """(B, L, H*d) -> (B, H, L, d)."""
    b, n = dim(x, 0), dim(x, 1)
    d = x.shape[-1] // heads
    return tf.transpose(tf.reshape(x, [b, n, heads, d]), [0, 2, 1, 3])


def merge_heads(x):
    """(B, H, L, d) -> (B, L, H*d)."""
    b, n = dim(x, 0), dim(x, 2)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, n, x.shape[1] * x.shape[3]])


def attend(q, k, v, bias=None, probs_out: list | None = None):
    """Scaled dot-product attention on (B, H, L, d) tensors; ``bias`` is additive (broadcast to scores).

    Keys/values (and bias) with fewer rows N than the queries' B, N dividing B (static sizes): each run of
    B / N query rows attends to its one row, the run's queries side by side (decoding, where an input's beams
    share its cross-attention keys/values: ``generation.decode(context_per_input=True)``).
    ``probs_out``: a list that receives the softmax probabilities (B, H, Lq, Lk) when attentions
    are requested; None (the default path) records nothing.
    """
    rows, inputs = q.shape[0], k.shape[0]
    group = rows // inputs if rows and inputs and rows > inputs and rows % inputs == 0 else 1
    heads, n = q.shape[1], q.shape[2]

    def side_by_side(x):      # (B, H, L, d) -> (N, H, B/N * L, d)
        return tf.reshape(tf.transpose(tf.reshape(x, [inputs, group, heads, n, x.shape[-1]]), [0, 2, 1, 3, 4]),
                          [inputs, heads, group * n, x.shape[-1]])

    def per_row(x):           # the inverse
        return tf.reshape(tf.transpose(tf.reshape(x, [inputs, heads, group, n, x.shape[-1]]), [0, 2, 1, 3, 4]),
                          [rows, heads, n, x.shape[-1]])

    if group > 1:
        q = side_by_side(q)
    scores = tf.matmul(q, k, transpose_b=True) / tf.cast(math.sqrt(q.shape[-1]), q.dtype)
    if bias is not None:
        scores = scores + tf.cast(bias, scores.dtype)
    probs = softmax(scores)
    if probs_out is not None:
        probs_out.append(probs if group == 1 else per_row(probs))
    ctx = tf.matmul(probs, v)
    return ctx if group == 1 else per_row(ctx)


class Recorder:
    """Collects what ``output_hidden_states`` / ``output_attentions`` ask for during one forward.

    Lists are None when not requested, so layers record nothing and the default path (no
    recorder at all) is untouched. ``cross`` gets cross-attention probabilities (text decoder).
    """

    def __init__(self, hidden_states: bool = False, attentions: bool = False):
        self.hidden = [] if hidden_states else None
        self.attn = [] if attentions else None
        self.cross = [] if attentions else None

    @classmethod
    def make(cls, hidden_states, attentions):
        """A recorder, or None when neither output is requested (the fast default path)."""
        return cls(bool(hidden_states), bool(attentions)) if (hidden_states or attentions) else None

    def add_hidden(self, h):
        if self.hidden is not None:
            self.hidden.append(h)

    @staticmethod
    def tup(items):
        return None if items is None else tuple(items)


def flag(value, config, name: str) -> bool:
    """An ``output_*`` argument; None falls back to the config attribute like transformers (default False)."""
    return bool(getattr(config, name, False)) if value is None else bool(value)


def padding_bias(mask):
    """(B, L) 0/1 mask -> additive (B, 1, 1, L) bias with transformers' -10000 convention."""
    return ((1.0 - tf.cast(mask, tf.float32)) * MASK_VALUE)[:, None, None, :]


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean token cross entropy, ignore index -100, torch's label smoothing (float32 maths)."""
    logp = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    valid = tf.not_equal(labels, -100)
    safe = tf.where(valid, labels, tf.zeros_like(labels))
    nll = -tf.gather(logp, safe, axis=-1, batch_dims=len(labels.shape))
    if label_smoothing:
        smooth = -tf.reduce_mean(logp, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    w = tf.cast(valid, tf.float32)
    return tf.reduce_sum(nll * w) / tf.reduce_sum(w)


# -- model base --------------------------------------------------------------------------------
class BlipTFModel(tf.Module):
    """Base of every public class: parameters from the weight table, loading and saving.

    Subclasses set ``architecture`` (the transformers class name) and build their towers in
    ``_build()`` from ``self.params``.
    """

    architecture = ""

    def __init__(self, config, seed: int = 0, dtype=None, _values: dict | None = None):
        super().__init__(name=None)
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.table = weight_table(self.architecture, config)
        if _values is None:   # the spec layer's seeded draw, laid out as loading lays out a checkpoint
            _values = backend_params(self.table, random_weights(self.architecture, config, seed), "tf")
        params = {}
        for spec in owned(self.table):   # tied rows share their owner's variable (see the LM head)
            path = spec.backend_path("tf")
            params[path] = tf.Variable(tf.cast(_values[path], self.dtype), name=path, trainable=True)
        self.params = params
        self._compiled = LRU(COMPILE_CACHE_SIZE)   # generation programs keyed by settings and input shapes
        self._build()

    def _build(self):
        raise NotImplementedError

    def __call__(self, *args, training: bool = False, **kwargs):
        """``forward``; ``training`` is Keras' flag. Dropout is not implemented in this backend, so
        ``training=True`` is refused where the config asks for dropout (it would change numbers)."""
        if training and _has_dropout(self.config):
            raise NotImplementedError("training=True: dropout is not implemented in the TF backend and this "
                                      "config sets a dropout probability; gradients work with training=False")
        return self.forward(*args, **kwargs)

    call = __call__     # Keras' name for the forward pass

    # -- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, allow_pickle_bin: bool = False, device=None, strict: bool = True,
                        seed: int = 0, **hf_kwargs):
        """Load a Hugging Face directory: safetensors (single or sharded), opt-in
        ``pytorch_model.bin``, or (when there are no PyTorch-layout weights) ``tf_model.h5`` /
        ``flax_model.msgpack`` through the spec layer. ``dtype`` defaults to float32 as in transformers.
        Tensors stream from the memory-mapped files into the variables one at a time
        (``backends.tf.loading``): peak memory is the model plus about one tensor.
        Cross-class loading, ``strict`` and ``seed`` as in every backend; ``device`` names the device the
        variables are created on as the other backends do (``"cpu"``, ``"gpu"``, ``"cuda:1"``) or as TF does
        (``"/GPU:0"``).
        """
        dtype, device = pretrained.hf_loading_kwargs(dtype, device, **hf_kwargs)
        device = tf_device(device)
        config, table, refs = pretrained.open_pretrained(os.fspath(path), cls.architecture,
                                                         allow_pickle_bin=allow_pickle_bin, strict=strict, seed=seed)
        # values are made one at a time as the variables are created, on the device, in the final dtype
        values = LazyValues(pretrained.load_items(table, refs, "tf"), resolve_dtype(dtype), device)
        if device in (None, "auto"):
            return cls(config, dtype=dtype, _values=values)
        with tf.device(device):
            return cls(config, dtype=dtype, _values=values)

    def save_pretrained(self, path, max_shard_size="5GB"):
        """Write ``config.json`` and safetensors exactly as transformers would (tied rows omitted)."""
        values = {p: v.numpy() for p, v in self.params.items()}   # bfloat16 stays bfloat16 (ml_dtypes)
        pretrained.write_pretrained(os.fspath(path), self.config, self.architecture, "tf", values,
                                    max_shard_size=max_shard_size)

    def num_parameters(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.params.values()))


def _has_dropout(config) -> bool:
    """Whether any (sub-)config sets a non-zero dropout probability."""
    for key, value in vars(config).items():
        if hasattr(value, "__dataclass_fields__") and _has_dropout(value):
            return True
        if "dropout" in key and isinstance(value, (int, float)) and value > 0:
            return True
    return False
