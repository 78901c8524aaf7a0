"""The numpy decoding engine: the library's rulebook (``blip_core.decoding``) driven by a plain loop.

``NumpyOps`` is the rulebook's array vocabulary in numpy (the same words ``TorchOps``, ``TFOps``
and ``JaxOps`` supply in the backends), so an exported model decodes with exactly the library's
rules without any framework. A model brings the same step contract as the backends' engines::

    step(ids, positions, key_mask, cache, index, context) -> (logits of the last position (N, V), cache)

``cache`` is None on the first (prompt) call; beam search reorders its rows with
``reorder_cache(cache, rows)`` (default: every array of a nested tuple/list/dict).

Sampling draws from ``numpy.random.Generator`` (seeded by ``seed``): reproducible per seed, but a
different stream from torch's, TF's or JAX's, as the backends' streams differ from each other.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from blip_core import decoding
from blip_core.generation import GenerationSettings
from blip_core.outputs import GenerateOutput

# Logical int32 is int64 here (ids feed ONNX graphs as int64, as torch's long).
_DTYPES = {"int32": np.int64, "float32": np.float32, "bool": np.bool_}


class NumpyOps:
    """``blip_core.decoding``'s array vocabulary in numpy (eager; scalars stay Python numbers)."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng

    scalar = staticmethod(lambda v: v)
    rows = staticmethod(lambda x: x.shape[0])
    arange = staticmethod(lambda n: np.arange(n, dtype=np.int64))
    reshape = staticmethod(np.reshape)
    concat = staticmethod(lambda xs, axis: np.concatenate(xs, axis=axis))
    take = staticmethod(lambda x, rows: x[rows])
    take_along = staticmethod(lambda x, idx, axis: np.take_along_axis(x, idx, axis=axis))   # broadcasts
    at = staticmethod(lambda table, i: table[int(i)])
    argmax = staticmethod(lambda x: np.argmax(x, axis=-1))
    argsort = staticmethod(lambda x: np.argsort(x, axis=-1, kind="stable"))
    cumsum = staticmethod(lambda x, axis: np.cumsum(x, axis=axis))
    sum = staticmethod(lambda x, axis: np.sum(x, axis=axis))
    any = staticmethod(lambda x, axis=None, keepdims=False: np.any(x, axis=axis, keepdims=keepdims))
    all = staticmethod(lambda x, axis=None, keepdims=False: np.all(x, axis=axis, keepdims=keepdims))
    min = staticmethod(lambda x, axis, keepdims=False: np.min(x, axis=axis, keepdims=keepdims))
    isin = staticmethod(lambda tokens, ids: np.isin(np.asarray(tokens), ids))

    @staticmethod
    def asarray(a):
        a = np.asarray(a)
        return a.astype(np.int64) if a.dtype.kind in "iu" else a

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, _DTYPES[dtype])

    @staticmethod
    def ones(shape, dtype):
        return np.ones(shape, _DTYPES[dtype])

    @staticmethod
    def full(shape, value, dtype):
        return np.full(shape, value, _DTYPES[dtype])

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(_DTYPES[dtype])

    @staticmethod
    def broadcast(x, shape):
        return np.broadcast_to(np.asarray(x), shape)

    @staticmethod
    def where(c, a, b):
        return np.where(c, a, b)

    @staticmethod
    def maximum(a, b):
        return np.maximum(a, b)

    @staticmethod
    def top_k(x, k):
        """Largest ``k`` per row, descending, the lower index first among equal values (as torch.topk)."""
        idx = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        return np.take_along_axis(x, idx, axis=-1), idx

    @staticmethod
    def unsort(values, order):
        out = np.empty_like(values)
        np.put_along_axis(out, order, values, axis=1)
        return out

    @staticmethod
    def log_softmax(x):
        shifted = x - np.max(x, axis=-1, keepdims=True)
        return (shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))).astype(np.float32)

    @staticmethod
    def softmax(x):
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)

    @staticmethod
    def max(x, axis=None):
        return int(np.max(x)) if axis is None else np.max(x, axis=axis)

    @staticmethod
    def mark(shape, cols, valid):
        """Boolean (N, V): True at ``cols[i, j]`` wherever ``valid[i, j]``."""
        n, v = shape
        out = np.zeros((n, v + 1), np.bool_)
        out[np.arange(n)[:, None], np.where(valid, cols, v)] = True     # invalid entries: a spare column
        return out[:, :v]

    @staticmethod
    def read(x, start, size, axis):
        start = int(start)
        return np.take(x, np.arange(start, start + size), axis=axis)

    @staticmethod
    def write(x, update, index, axis):
        x = x.copy()
        index = int(index)
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(index, index + update.shape[axis])
        x[tuple(sl)] = update
        return x

    def sample(self, rng, scores, num):
        """``num`` draws per row without replacement from softmax(scores) (Gumbel top-k)."""
        if num == 1:
            p = self.softmax(scores).astype(np.float64)
            u = self.rng.random((scores.shape[0], 1))
            return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1, keepdims=True), scores.shape[1] - 1), rng
        keys = scores + self.rng.gumbel(size=scores.shape).astype(np.float32)
        return self.top_k(keys, num)[1], rng


def reorder_rows(cache, rows):
    """Select rows of every array in a nested tuple/list/dict cache."""
    if cache is None:
        return None
    if isinstance(cache, np.ndarray):
        return cache[rows]
    if isinstance(cache, dict):
        return {k: reorder_rows(v, rows) for k, v in cache.items()}
    return type(cache)(reorder_rows(v, rows) for v in cache)


def repeat_rows(tree, n: int):
    """``np.repeat`` every array of a nested context ``n`` times along rows (one copy per beam)."""
    if n == 1 or tree is None:
        return tree
    if isinstance(tree, np.ndarray):
        return np.repeat(tree, n, axis=0)
    if isinstance(tree, dict):
        return {k: repeat_rows(v, n) for k, v in tree.items()}
    return type(tree)(repeat_rows(v, n) for v in tree)


def generate(step: Callable, input_ids, settings: GenerationSettings, *, vocab_size: int, attention_mask=None,
             context=None, reorder_cache: Callable = reorder_rows):
    """Decode from ``input_ids`` (B, P) with ``step``; the loop of ``backends/torch/generation.py``.

    Returns int64 ids (B * num_return_sequences, P + generated) including the prompt, or a
    ``GenerateOutput`` with ``settings.return_dict_in_generate``.
    """
    input_ids = np.asarray(input_ids, np.int64)
    if attention_mask is None:
        attention_mask = decoding.infer_prompt_mask(input_ids, settings)
    attention_mask = np.asarray(attention_mask, np.int64)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} does not match input_ids shape "
                         f"{input_ids.shape}")
    plan, numbers = decoding.make_plan(settings, vocab_size, settings.output_scores)
    xp = NumpyOps(np.random.default_rng(settings.seed))
    num = {k: xp.asarray(v) for k, v in numbers.items()}
    ids, mask = np.repeat(input_ids, plan.expand, 0), np.repeat(attention_mask, plan.expand, 0)
    context = repeat_rows(context, plan.expand)

    seqs, seq_scores, scores = decoding.run_eager(xp, plan, num, ids, mask, step, context, reorder_cache)
    seqs = np.asarray(seqs, np.int64)
    if not settings.return_dict_in_generate:
        return seqs
    return GenerateOutput(sequences=seqs, scores=scores, sequences_scores=seq_scores)
