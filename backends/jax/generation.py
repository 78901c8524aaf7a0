"""The compiled JAX decoding engine: one XLA program per (model, ``DecodePlan``).

The search rules are ``blip_core.decoding``'s; this module supplies their array vocabulary
(``JaxOps``, jax.numpy with dynamic slices) and the loop: a prefill over the prompt, then a
``lax.while_loop`` of one-token steps. A model brings::

    init_cache(rows, total) -> cache            # fixed-size arrays, rows first
    step(ids, positions, key_mask, cache, index, context) -> (logits of the last position (N, V), cache)

``ids`` (N, s) is the prompt at ``index`` 0 and then one token at buffer slot ``index`` (traced);
``positions`` are ``cumsum(mask) - 1`` with padded slots at 1; ``key_mask`` (N, T) marks real
tokens over the whole buffer, from which the model builds its own attention bias; ``context``
(rows first: image keys/values, encoder states) is repeated per beam or sample by the engine.
Beam search reorders the cache rows after each step.

Numeric settings (temperature, top-k, top-p, penalties, eos ids, length penalty) are traced, so
changing them reuses the compiled program; the plan (mode, beams, lengths, which processors run)
is static. Sampling draws from an explicit PRNG key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blip_core import decoding
from blip_core.cache import padding_rows
from blip_core.outputs import GenerateOutput

_DTYPES = {"int32": jnp.int32, "float32": jnp.float32, "bool": jnp.bool_}


class JaxOps:
    """``blip_core.decoding``'s array vocabulary in jax.numpy."""

    scalar = staticmethod(lambda v: jnp.asarray(v, jnp.bool_ if isinstance(v, bool) else jnp.int32))
    asarray = staticmethod(jnp.asarray)
    rows = staticmethod(lambda x: x.shape[0])
    arange = staticmethod(lambda n: jnp.arange(n, dtype=jnp.int32))
    where = staticmethod(jnp.where)
    maximum = staticmethod(jnp.maximum)
    reshape = staticmethod(jnp.reshape)
    concat = staticmethod(lambda xs, axis: jnp.concatenate(xs, axis=axis))
    take = staticmethod(lambda x, rows: x[rows])
    take_along = staticmethod(lambda x, idx, axis: jnp.take_along_axis(x, idx, axis=axis))
    at = staticmethod(lambda table, i: table[i])
    top_k = staticmethod(jax.lax.top_k)
    argmax = staticmethod(lambda x: jnp.argmax(x, axis=-1))
    argsort = staticmethod(lambda x: jnp.argsort(x, axis=-1, stable=True))
    log_softmax = staticmethod(lambda x: jax.nn.log_softmax(x, axis=-1))
    softmax = staticmethod(lambda x: jax.nn.softmax(x, axis=-1))
    cumsum = staticmethod(lambda x, axis: jnp.cumsum(x, axis=axis))
    sum = staticmethod(lambda x, axis: jnp.sum(x, axis=axis))
    any = staticmethod(lambda x, axis=None, keepdims=False: jnp.any(x, axis=axis, keepdims=keepdims))
    all = staticmethod(lambda x, axis=None, keepdims=False: jnp.all(x, axis=axis, keepdims=keepdims))
    min = staticmethod(lambda x, axis, keepdims=False: jnp.min(x, axis=axis, keepdims=keepdims))
    max = staticmethod(lambda x, axis=None: jnp.max(x, axis=axis))
    read = staticmethod(lambda x, start, size, axis: jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis))
    isin = staticmethod(lambda tokens, ids: jnp.any(jnp.asarray(tokens)[..., None] == ids, axis=-1))

    @staticmethod
    def zeros(shape, dtype):
        return jnp.zeros(shape, _DTYPES[dtype])

    @staticmethod
    def ones(shape, dtype):
        return jnp.ones(shape, _DTYPES[dtype])

    @staticmethod
    def full(shape, value, dtype):
        return jnp.full(shape, value, _DTYPES[dtype])

    @staticmethod
    def cast(x, dtype):
        return jnp.asarray(x).astype(_DTYPES[dtype])

    @staticmethod
    def broadcast(x, shape):
        return jnp.broadcast_to(jnp.asarray(x), shape)

    @staticmethod
    def write(x, update, index, axis):
        return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), index, axis=axis)

    @staticmethod
    def mark(shape, cols, valid):
        n, v = shape
        cols = jnp.where(valid, cols, v)                  # invalid entries go to a spare column
        return jnp.zeros((n, v + 1), jnp.bool_).at[jnp.arange(n)[:, None], cols].set(True)[:, :v]

    @staticmethod
    def unsort(values, order):
        return jnp.zeros_like(values).at[jnp.arange(values.shape[0])[:, None], order].set(values)

    @staticmethod
    def sample(key, scores, num):
        """``num`` draws per row without replacement (Gumbel top-k; categorical for one)."""
        key, sub = jax.random.split(key)
        if num == 1:
            return jax.random.categorical(sub, scores, axis=-1)[:, None], key
        return jax.lax.top_k(scores + jax.random.gumbel(sub, scores.shape, jnp.float32), num)[1], key


def repeat_rows(tree, n: int):
    return tree if n == 1 else jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), tree)


def decode(step, init_cache, context, prompt_ids, prompt_mask, key, plan: decoding.DecodePlan, numbers: dict,
           context_per_input: bool = False):
    """Run the search inside a traced function. Returns ``(sequences (rows, T), length,
    sequences_scores or None, scores buffer or None, steps)``; the caller trims.

    ``context_per_input``: the context keeps one row per input and the model's step shares it among
    that input's ``plan.expand`` consecutive rows (BLIP's cross-attention keys/values: not copied per
    beam, which would multiply the largest buffer of beam search by the beam count)."""
    xp = JaxOps
    ids = repeat_rows(jnp.asarray(prompt_ids, jnp.int32), plan.expand)
    mask = repeat_rows(jnp.asarray(prompt_mask, jnp.int32), plan.expand)
    context = context if context_per_input else repeat_rows(context, plan.expand)
    state = decoding.init_state(xp, plan, ids, mask, key, numbers.get("rows"))
    cache = init_cache(ids.shape[0], plan.total)
    logits, cache = step(ids, decoding.prefill_positions(xp, mask), state["key_mask"], cache, 0, context)
    state, rows = decoding.choose(xp, plan, numbers, state, logits)

    def reorder(cache, rows):
        return cache if rows is None else jax.tree_util.tree_map(lambda c: c[rows], cache)

    def body(carry):
        st, c = carry
        tokens, positions, index = decoding.step_inputs(xp, st)
        out, c = step(tokens, positions, st["key_mask"], c, index, context)
        st, r = decoding.choose(xp, plan, numbers, st, out)
        return st, reorder(c, r)

    state, _ = jax.lax.while_loop(lambda carry: decoding.going(xp, plan, carry[0]), body,
                                  (state, reorder(cache, rows)))
    seqs, length, seq_scores, steps = decoding.finish(xp, plan, state)
    return seqs, length, seq_scores, state.get("scores"), steps


def traced_numbers(numbers: dict) -> dict:
    """The plan's numbers as arguments of the compiled program (so they are traced). The spec layer's numpy
    values go in as they are (a program takes host arrays; ``jnp.asarray`` would compile a small program
    per shape in a new process); anything else as ``jnp.asarray`` types it."""
    return {k: v if isinstance(v, (np.ndarray, np.generic)) else jnp.asarray(v) for k, v in numbers.items()}


def prng_key(seed: int):
    """``jax.random.key(seed)``, built on the host where its bits are known (threefry's seeding puts a
    32-bit non-negative seed in the low word): ``jax.random.key`` compiles a small program in every new process."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and 0 <= seed < 2 ** 31:
        return jax.random.wrap_key_data(np.array([0, seed], np.uint32), impl="threefry2x32")
    return jax.random.key(seed)


def sampling_key(settings, key):
    """The PRNG key of a call: the given one, else one from ``seed``, else a fresh seed when sampling."""
    if key is not None:
        return key
    if settings.do_sample:
        seed = settings.seed if settings.seed is not None else int(np.random.SeedSequence().entropy % (2 ** 31))
        return prng_key(int(seed))
    return prng_key(0)     # unused without sampling; keeps one compiled signature


def pad_batch(tree, batch: int, padded: int):
    """Rows-first inputs padded from ``batch`` to ``padded`` rows by the spec layer's rule (``padding_rows``)."""
    if padded == batch:
        return tree
    rows = padding_rows(batch, padded)
    return jax.tree_util.tree_map(lambda x: x[rows], tree)


def _trim(x, *indices):
    """``[x[i] for i in indices]`` of a program's output, cut on the host and put back where ``x`` was: an
    eager slice of a device array compiles a small program in every new process. Arrays split over a mesh
    are sliced as before."""
    if isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
        host = np.asarray(x)
        return [jax.device_put(host[i], x.sharding) for i in indices]
    return [x[i] for i in indices]


def result(settings, seqs, length, seq_scores, scores, steps, batch=None):
    """Trim the compiled program's buffers into ids or a ``GenerateOutput``; with ``batch`` (the real
    input rows of a padded call) only the rows of those inputs are returned."""
    n = None if batch is None else batch * settings.num_return_sequences
    [seqs] = _trim(seqs, np.s_[:n, : int(length)])
    if not settings.return_dict_in_generate:
        return seqs
    per_row = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences   # score rows
    m = None if batch is None else batch * per_row
    score_steps = None if scores is None else tuple(_trim(scores, *(np.s_[:m, i] for i in range(int(steps)))))
    return GenerateOutput(sequences=seqs, scores=score_steps,
                          sequences_scores=None if seq_scores is None else _trim(seq_scores, np.s_[:n])[0])
