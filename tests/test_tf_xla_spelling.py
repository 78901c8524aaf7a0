"""The XLA spellings of the TensorFlow backend (``backends/tf/_base.py``: ``for_xla``, ``rsqrt_eps``, ``softmax``,
``plus_bias``).

Inside a graph traced for XLA, ``rsqrt(var + eps)`` and the softmax go through native tf2xla kernels, not
through TF 2.21's per-op MLIR lowering (some 10 ms of CPU per node at each process start): the numbers
must be TensorFlow's own ``Rsqrt`` / ``Softmax`` under XLA bit for bit, and a traced generate program
must hold none of the ops known to take the slow path. A bias added to a one-row product under XLA is spelled
as the subtraction of its negation (XLA:CPU fuses an add into a matrix-vector product, which leaves the
product's fast path), and is still the plain add's result.
"""
import collections

import numpy as np
import pytest

from fixture_utils import require
from hf_configs import core_blip_config, tiny_pixels

require("tensorflow")
import tensorflow as tf  # noqa: E402

import backends.tf as BTF  # noqa: E402
from backends.tf import _base  # noqa: E402

# Ops TF 2.21 lowers to XLA through MlirXlaOpKernel, of the kinds these models would otherwise use.
SLOW_OPS = {"Rsqrt", "Sqrt", "Softmax", "LogSoftmax", "MatrixBandPart", "FusedBatchNormV3"}


def _xla(fn, *args):
    return tf.function(fn, jit_compile=True, autograph=False)(*args).numpy()


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-5])
def test_rsqrt_eps_is_rsqrt_bit_for_bit(eps):
    rng = np.random.default_rng(0)
    var = np.concatenate([np.abs(rng.standard_normal((3, 7, 1))) * 10.0 ** rng.integers(-8, 4, (3, 7, 1)),
                          np.zeros((1, 7, 1))]).astype(np.float32)     # a zero variance row: rsqrt(eps)
    ref = _xla(lambda v: tf.math.rsqrt(v + eps), var)
    got = _xla(_base.for_xla(lambda v: _base.rsqrt_eps(v, eps)), var)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(_base.rsqrt_eps(tf.constant(var), eps).numpy(), tf.math.rsqrt(var + eps).numpy())


def test_softmax_is_softmax_bit_for_bit():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 3, 5, 17)) * 8).astype(np.float32)
    x[0, 1, :, 9:] = -10000.0                                           # masked keys, as the attention bias
    x[1, 2, 3] = 0.0
    ref = _xla(lambda s: tf.nn.softmax(s, axis=-1), x)
    got = _xla(_base.for_xla(_base.softmax), x)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(_base.softmax(tf.constant(x)).numpy(), tf.nn.softmax(x, axis=-1).numpy())


def _graph_ops(fn, *args):
    return [op.type for op in tf.function(fn, autograph=False).get_concrete_function(*args).graph.get_operations()]


@pytest.mark.parametrize("rows", [(1, 1), (1,), (3, 1), (2, 4)])
def test_plus_bias_is_the_add_bit_for_bit(rows):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(rows + (48,)).astype(np.float32)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    b = tf.Variable(rng.standard_normal(40).astype(np.float32))            # a weight, as in the models
    ref = _xla(lambda v: tf.matmul(v, w) + b, x)
    spelled = _base.for_xla(lambda v: _base.plus_bias(tf.matmul(v, w), b))
    np.testing.assert_array_equal(_xla(spelled, x), ref)
    ops = _graph_ops(spelled, tf.constant(x))
    one_row = int(np.prod(rows)) == 1
    assert ("AddV2" in ops, "Sub" in ops) == (not one_row, one_row), ops
    eager = _base.plus_bias(tf.matmul(tf.constant(x), w), b)                 # outside an XLA trace: the add
    np.testing.assert_array_equal(eager.numpy(), (tf.matmul(x, w) + b).numpy())
    assert "Sub" not in _graph_ops(lambda v: _base.plus_bias(tf.matmul(v, w), b), tf.constant(x))


def test_plus_bias_keeps_signed_zeros_and_infinities():
    """``y - (-b)`` and ``y + b`` agree where rounding has nothing to do: zeros of either sign, infinities."""
    vals = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)
    y, b = (a.reshape(1, -1) for a in np.meshgrid(vals, vals))
    got = _xla(_base.for_xla(lambda u: _base.plus_bias(u, b[0])), y)
    ref = _xla(lambda u: u + b[0], y)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))


def _ops(cf):
    ops = collections.Counter(op.type for op in cf.graph.get_operations())
    for fdef in cf.graph.as_graph_def().library.function:      # the decoding loop's body and condition
        ops.update(node.op for node in fdef.node_def)
    return ops


def _program_ops(batch):
    model = BTF.BlipForConditionalGeneration(core_blip_config(), seed=0)
    model.generate(pixel_values=tiny_pixels(batch), max_new_tokens=3)
    fns = [getattr(fn, "fn", fn) for fn in model._compiled.values()]
    cfs = [cf for fn in fns for cf in fn._list_all_concrete_functions()]
    assert cfs
    return sum(map(_ops, cfs), collections.Counter())


def test_generate_program_avoids_the_slow_lowerings(monkeypatch):
    monkeypatch.setenv("BLIP_COMPILE_CACHE", "0")                       # the plain tf.function, traced here
    ops = set(_program_ops(2))
    assert {"FusedBatchNorm", "SoftmaxCrossEntropyWithLogits", "While"} <= ops
    assert not ops & SLOW_OPS, ops & SLOW_OPS


def test_one_row_generate_program_spells_its_bias_adds_apart(monkeypatch):
    """At batch 1 every biased product of a decoding step has one row: per layer the self-attention's four,
    the cross-attention's query and output (its keys and values are the image's, many rows) and the FFN's
    two; then the LM head's transform and its output; traced twice (prompt and loop step)."""
    monkeypatch.setenv("BLIP_COMPILE_CACHE", "0")
    one, two = _program_ops(1), _program_ops(2)
    products = 2 * (8 * core_blip_config().text_config.num_hidden_layers + 2)
    assert one["Neg"] - two["Neg"] == two["AddV2"] - one["AddV2"] == products
