"""The XLA-compiled TensorFlow decoding engine: one ``tf.function(jit_compile=True)`` per (model, plan).

The search rules are ``blip_core.decoding``'s; this module supplies their array vocabulary
(``TFOps``) and the loop: a prefill over the prompt, then a ``tf.while_loop`` of one-token steps.
A model brings::

    init_cache(rows, total) -> cache             # optional; without it the first step gets None
    step(ids, positions, key_mask, cache, index, context) -> (logits of the last position (N, V), cache)

``ids`` (N, s) is the prompt at ``index`` 0 and then one token at buffer slot ``index``;
``positions`` are ``cumsum(mask) - 1`` with padded slots at 1; ``key_mask`` (N, T) marks real
tokens over the whole buffer, from which the model builds its own attention bias; ``context``
(a nest, rows first: cross-attention keys/values, encoder states) is repeated per beam or sample
by the engine. Caches are fixed-size nests of tensors whose rows beam search reorders.

Numeric settings are arguments of the compiled function, so changing them reuses the trace.
Sampling uses the Gumbel-max trick on stateless random numbers: a ``seed`` reproduces a result.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from blip_core import decoding
from blip_core.cache import padding_rows
from blip_core.outputs import GenerateOutput

from . import program_cache
from ._base import dim, for_xla

_DTYPES = {"int32": tf.int32, "float32": tf.float32, "bool": tf.bool}


def _like(value, other):
    """A Python scalar as a tensor of ``other``'s dtype (tf ops do not promote)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value if value.dtype == other.dtype else tf.cast(value, other.dtype)
    return tf.constant(value, other.dtype)


class TFOps:
    """``blip_core.decoding``'s array vocabulary in TensorFlow (XLA-friendly)."""

    @staticmethod
    def rows(x):
        return dim(x, 0)

    @staticmethod
    def scalar(v):
        return tf.constant(v, tf.bool if isinstance(v, bool) else tf.int32)

    @staticmethod
    def asarray(a):
        return tf.constant(a)

    @staticmethod
    def zeros(shape, dtype):
        return tf.zeros(shape, _DTYPES[dtype])

    @staticmethod
    def ones(shape, dtype):
        return tf.ones(shape, _DTYPES[dtype])

    @staticmethod
    def full(shape, value, dtype):
        return tf.fill(shape, tf.constant(value, _DTYPES[dtype]))

    @staticmethod
    def arange(n):
        return tf.range(n, dtype=tf.int32)

    @staticmethod
    def cast(x, dtype):
        return tf.cast(x, _DTYPES[dtype])

    @staticmethod
    def broadcast(x, shape):
        return tf.broadcast_to(tf.convert_to_tensor(x), shape)

    @staticmethod
    def where(c, a, b):
        if not isinstance(a, (tf.Tensor, tf.Variable)):
            a = _like(a, b)
        return tf.where(c, a, _like(b, a))

    @staticmethod
    def maximum(a, b):
        return tf.maximum(a, _like(b, a))

    @staticmethod
    def reshape(x, shape):
        return tf.reshape(x, shape)

    @staticmethod
    def concat(xs, axis):
        return tf.concat(xs, axis=axis)

    @staticmethod
    def take(x, rows):
        return tf.gather(x, rows)

    @staticmethod
    def take_along(x, idx, axis):
        """Along axis 1; trailing size-1 index axes broadcast over ``x``'s trailing axes."""
        assert axis == 1, "the rulebook gathers along axis 1 only"
        return tf.gather(x, tf.reshape(idx, tf.shape(idx)[:2]), batch_dims=1)

    @staticmethod
    def at(table, i):
        return tf.gather(table, i)

    @staticmethod
    def top_k(x, k):
        r = tf.math.top_k(x, k)
        return r.values, r.indices

    @staticmethod
    def argmax(x):
        return tf.argmax(x, axis=-1, output_type=tf.int32)

    @staticmethod
    def argsort(x):
        return tf.argsort(x, axis=-1, direction="ASCENDING", stable=True)

    @staticmethod
    def unsort(values, order):
        return tf.gather(values, tf.argsort(order, axis=-1, stable=True), batch_dims=1)

    @staticmethod
    def log_softmax(x):
        return tf.nn.log_softmax(x, axis=-1)

    @staticmethod
    def softmax(x):
        return tf.nn.softmax(x, axis=-1)

    @staticmethod
    def cumsum(x, axis):
        return tf.cumsum(x, axis=axis)

    @staticmethod
    def sum(x, axis):
        return tf.reduce_sum(x, axis=axis)

    @staticmethod
    def any(x, axis=None, keepdims=False):
        return tf.reduce_any(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def all(x, axis=None, keepdims=False):
        return tf.reduce_all(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def min(x, axis, keepdims=False):
        return tf.reduce_min(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def max(x, axis=None):
        return tf.reduce_max(x, axis=axis)

    @staticmethod
    def isin(tokens, ids):
        tokens = tf.convert_to_tensor(tokens)
        return tf.reduce_any(tf.equal(tokens[..., None], tf.cast(ids, tokens.dtype)), axis=-1)

    @staticmethod
    def mark(shape, cols, valid):
        """Boolean (N, V): True at ``cols[i, j]`` wherever ``valid[i, j]`` (a scatter, no one-hot)."""
        n, v = shape
        cols = tf.where(valid, tf.cast(cols, tf.int32), v)
        rows = tf.broadcast_to(tf.range(n, dtype=tf.int32)[:, None], tf.shape(cols))
        idx = tf.reshape(tf.stack([rows, cols], axis=-1), [-1, 2])
        hits = tf.tensor_scatter_nd_max(tf.zeros([n, v + 1], tf.int32), idx, tf.ones(tf.shape(idx)[:1], tf.int32))
        return hits[:, :v] > 0

    @staticmethod
    def read(x, start, size, axis):
        rank = len(x.shape)
        begin = [tf.constant(0, tf.int32)] * rank
        begin[axis] = tf.cast(start, tf.int32)
        sizes = [-1] * rank
        sizes[axis] = size
        return tf.slice(x, tf.stack(begin), sizes)

    @staticmethod
    def write(x, update, index, axis):
        shape = [1] * len(x.shape)
        shape[axis] = x.shape[axis]
        slot = tf.reshape(tf.equal(tf.range(x.shape[axis]), tf.cast(index, tf.int32)), shape)
        return tf.where(slot, tf.cast(update, x.dtype), x)

    @staticmethod
    def sample(seed, scores, num):
        """``num`` draws per row without replacement: Gumbel top-k on stateless noise."""
        u = tf.random.stateless_uniform(tf.shape(scores), seed=seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
        picked = tf.math.top_k(scores - tf.math.log(-tf.math.log(u)), num).indices
        return picked, seed + tf.constant([0, 1], seed.dtype)


def repeat_rows(tree, n: int):
    return tree if n == 1 else tf.nest.map_structure(lambda x: None if x is None else tf.repeat(x, n, axis=0), tree)


def decode(step, context, prompt_ids, prompt_mask, seed, plan: decoding.DecodePlan, numbers: dict,
           init_cache=None, context_per_input: bool = False):
    """Run the search on tensors (inside the compiled function). Returns ``(sequences (rows, T),
    length, sequences_scores or None, scores buffer or None, steps)``; the caller trims.

    ``context_per_input``: the context keeps one row per input and the model's step shares it among
    that input's ``plan.expand`` consecutive rows (BLIP's cross-attention keys/values, read every step:
    one copy per input instead of one per beam). The step finds the sharing from the static row counts, so a
    batch of unknown size (an exported signature) gets the context repeated per row."""
    xp = TFOps
    ids = repeat_rows(tf.cast(prompt_ids, tf.int32), plan.expand)
    mask = repeat_rows(tf.cast(prompt_mask, tf.int32), plan.expand)
    per_input = context_per_input and ids.shape[0] is not None
    context = context if per_input else repeat_rows(context, plan.expand)
    state = decoding.init_state(xp, plan, ids, mask, seed, numbers.get("rows"))
    cache = None if init_cache is None else init_cache(xp.rows(ids), plan.total)
    logits, cache = step(ids, decoding.prefill_positions(xp, mask), state["key_mask"], cache, 0, context)
    state, rows = decoding.choose(xp, plan, numbers, state, logits)

    def reorder(cache, rows):
        return cache if rows is None else tf.nest.map_structure(lambda c: tf.gather(c, rows), cache)

    def body(st, c):
        tokens, positions, index = decoding.step_inputs(xp, st)
        out, c = step(tokens, positions, st["key_mask"], c, index, context)
        st, r = decoding.choose(xp, plan, numbers, st, out)
        return st, reorder(c, r)

    state, _ = tf.while_loop(lambda st, c: decoding.going(xp, plan, st), body, (state, reorder(cache, rows)))
    seqs, length, seq_scores, steps = decoding.finish(xp, plan, state)
    return seqs, length, seq_scores, state.get("scores"), steps


def _seed(settings):
    seed = settings.seed if settings.seed is not None else int(np.random.randint(0, 2 ** 31 - 1))
    return tf.constant([seed, 0], tf.int64)


def _tensors(numbers: dict) -> dict:
    """The plan's numbers (the spec layer's arrays: length-penalty table, eos ids...) as TF constants."""
    return {k: tf.constant(v) for k, v in numbers.items()}


def plan_inputs(settings, vocab_size: int):
    """``(plan, numbers as tensors, seed tensor)`` of one call."""
    plan, numbers = decoding.make_plan(settings, vocab_size, settings.output_scores)
    return plan, _tensors(numbers), _seed(settings)


def bucketed_inputs(settings, vocab_size: int, batch: int, max_new_limit=None):
    """``(plan, numbers as tensors, seed tensor, padded batch)`` of one call whose batch and length are
    rounded up to the spec layer's buckets (``blip_core.decoding.bucketed_plan``)."""
    plan, numbers, padded = decoding.bucketed_plan(settings, vocab_size, batch, max_new_limit)
    return plan, _tensors(numbers), _seed(settings), padded


def shape_signature(nest) -> tuple:
    """Shapes and dtypes of a nest of tensors / arrays (None kept): with the plan, what makes a program."""
    return tuple(None if x is None else (tuple(x.shape), str(getattr(x.dtype, "name", x.dtype)))
                 for x in tf.nest.flatten(nest, expand_composites=False))


def compiled(model, key, program, shapes=()):
    """The XLA-compiled ``program`` cached on ``model`` under ``key`` (which holds the plan) and the
    input ``shapes``: one traced program per entry of the model's bounded ``LRU``
    (``blip_core.cache.COMPILE_CACHE_SIZE``), so the least recently used is freed."""
    def make():    # behind the program store: a later process runs the traced graph (``program_cache``)
        fn = tf.function(for_xla(program), jit_compile=True, autograph=False)      # no AutoGraph
        return program_cache.stored(model, key, fn)

    return model._compiled.get((key, tuple(shapes)), make)


def pad_batch(nest, batch: int, padded: int):
    """Rows-first inputs padded from ``batch`` to ``padded`` rows by the spec layer's rule (``padding_rows``)."""
    if padded == batch:
        return nest
    rows = padding_rows(batch, padded)
    return tf.nest.map_structure(lambda x: None if x is None else
                                 (x[rows] if isinstance(x, np.ndarray) else tf.gather(x, rows)), nest)


def result(settings, seqs, length, seq_scores, scores, steps, batch=None):
    """Trim the compiled program's buffers into int64 ids or a ``GenerateOutput``; with ``batch`` (the
    real input rows of a padded call) only the rows of those inputs are returned."""
    n = None if batch is None else batch * settings.num_return_sequences
    seqs = tf.cast(seqs[:n, : int(length)], tf.int64)
    if not settings.return_dict_in_generate:
        return seqs
    per_row = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences   # score rows
    m = None if batch is None else batch * per_row
    score_steps = None if scores is None else tuple(scores[:m, i] for i in range(int(steps)))
    return GenerateOutput(sequences=seqs, scores=score_steps,
                          sequences_scores=None if seq_scores is None else seq_scores[:n])


def trace_count(model) -> int:
    """How many times the model's generation functions have been traced (for retrace checks); a program
    read from disk (``program_cache``) was not traced."""
    return sum(fn.traces if hasattr(fn, "traces") else fn.experimental_get_tracing_count()
               for fn in model._compiled.values())
