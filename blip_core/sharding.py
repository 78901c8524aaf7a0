"""Tensor-parallel partitioning of every BLIP / BLIP-2 weight (Megatron style), framework-free.

One table (``RULES``) says, by canonical name, which role a parameter plays when a model is split over a
"model" axis of devices:

* ``COLUMN``: a linear layer whose *output* features are split (q/k/v, so attention heads; the first MLP
  layer: ViT ``fc1``, BERT ``intermediate``, OPT ``fc1``, T5 ``wi`` / ``wi_0`` / ``wi_1``). Weight and bias
  split along the output dimension.
* ``ROW``: a linear layer whose *input* features are split (attention output: ViT ``projection``, BERT
  ``attention.output.dense``, OPT ``out_proj``, T5 ``o``; the second MLP layer: ``fc2``, ``output.dense``,
  ``wo``). Its bias is replicated: it is added once, after the partial sums are reduced.
* ``VOCAB``: a word-embedding table or LM head split over vocabulary rows (OPT ``embed_tokens``, T5
  ``shared`` and untied ``lm_head``, BERT ``word_embeddings``, BLIP's ``cls.predictions.bias``). These are
  the largest single matrices of a BLIP-2 language model, so they are split rather than replicated.

Everything else (layer norms, position embeddings, T5's relative position bias, the query tokens, the
language projection, the small heads) is replicated. A parameter whose split dimension does not divide by
the number of devices on the axis is replicated as well (``partition_specs`` reports it), so any mesh size
works; the compiled program (GSPMD) inserts the collectives either way.

``partition_specs(table, backend, axis_size)`` turns the roles into a per-parameter spec in the backend's
own layout: a tuple with one entry per array dimension, the axis name on the split dimension and ``None``
elsewhere (what ``jax.sharding.PartitionSpec`` takes).
"""
from __future__ import annotations

import re

import numpy as np

from .weights.spec import WeightTable, owned

MODEL_AXIS = "model"
COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

_W, _WB = r"\.weight$", r"\.(weight|bias)$"
# (regex over the canonical name, role); the first match wins.
RULES = (
    # attention inputs: split heads
    (r"\.self_attn\.qkv" + _WB, COLUMN),                                  # ViT (BLIP / BLIP-2), fused q|k|v
    (r"\.(self|attention)\.(query|key|value)" + _WB, COLUMN),             # BERT: BLIP text, Q-Former
    (r"\.self_attn\.[qkv]_proj" + _WB, COLUMN),                           # OPT
    (r"\.(SelfAttention|EncDecAttention)\.[qkv]" + _W, COLUMN),           # T5
    # attention outputs: reduce over heads
    (r"\.self_attn\.projection" + _WB, ROW),                              # ViT
    (r"\.self_attn\.out_proj" + _WB, ROW),                                # OPT
    (r"\.(SelfAttention|EncDecAttention)\.o" + _W, ROW),                  # T5
    # feed-forward: first layer column, second row
    (r"\.mlp\.fc1" + _WB, COLUMN), (r"\.mlp\.fc2" + _WB, ROW),            # ViT
    (r"\.layers\.\d+\.fc1" + _WB, COLUMN), (r"\.layers\.\d+\.fc2" + _WB, ROW),   # OPT
    (r"\.(intermediate|intermediate_query)\.dense" + _WB, COLUMN),        # BERT
    (r"\.(output|output_query)\.dense" + _WB, ROW),                       # BERT (attention and FFN outputs)
    (r"\.DenseReluDense\.wi(_0|_1)?" + _W, COLUMN), (r"\.DenseReluDense\.wo" + _W, ROW),   # T5
    # vocabulary
    (r"(^|\.)(embed_tokens|shared|word_embeddings)" + _W, VOCAB),
    (r"(^|\.)lm_head" + _W, VOCAB),
    (r"\.predictions\.(decoder\.weight|decoder\.bias|bias)$", VOCAB),     # BLIP text LM head
)
_COMPILED = tuple((re.compile(p), role) for p, role in RULES)


def role(name: str) -> str:
    """The partitioning role of the parameter with canonical name ``name``."""
    for pattern, r in _COMPILED:
        if pattern.search(name):
            return r
    return REPLICATED


def split_dimension(name: str, shape: tuple):
    """The canonical-layout dimension that ``name`` is split along, or None (replicated).

    Canonical linear weights are (out, in): COLUMN splits dim 0 (and the bias), ROW dim 1 (not the bias);
    VOCAB splits dim 0 of an embedding / LM head (V, D) or of a vocabulary bias (V,)."""
    r = role(name)
    if r == REPLICATED:
        return None
    if r == ROW:
        return 1 if len(shape) == 2 else None
    return 0


def _axis_permutation(spec) -> tuple:
    """``perm`` with ``backend_dim i = canonical dim perm[i]``, read off the layout transform itself."""
    primes = (2, 3, 5, 7, 11, 13)[:len(spec.shape)]
    out = spec.transform.forward(np.empty(primes, dtype=np.uint8)).shape
    return tuple(primes.index(n) for n in out)


def partition_specs(table: WeightTable, backend: str, axis_size: int, axis: str = MODEL_AXIS):
    """``({backend path: spec tuple}, [canonical names replicated because the split does not divide])``.

    Each spec has one entry per dimension of the parameter in ``backend``'s layout: ``axis`` on the split
    dimension, ``None`` elsewhere (all ``None``: replicated). Tied rows are left out, as in loading."""
    if not isinstance(axis_size, (int, np.integer)) or axis_size < 1:
        raise ValueError(f"axis_size must be a positive integer, got {axis_size!r}")
    specs, uneven = {}, []
    for spec in owned(table):
        dim = split_dimension(spec.name, spec.shape)
        if dim is not None and spec.shape[dim] % axis_size:
            uneven.append(spec.name)
            dim = None
        perm = tuple(range(len(spec.shape))) if backend == "torch" else _axis_permutation(spec)
        specs[spec.backend_path(backend)] = tuple(axis if dim is not None and perm[i] == dim else None
                                                  for i in range(len(spec.shape)))
    return specs, uneven
