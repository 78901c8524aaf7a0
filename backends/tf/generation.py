"""Text generation for the BLIP decoders, compiled once with XLA.

One ``tf.function(jit_compile=True)`` per (model, static settings) runs the whole of ``generate``:
the encoder (vision tower, and the question encoder for VQA), the cross-attention keys/values of
every layer (computed once), a prefill over the prompt, then a ``tf.while_loop`` of one-token
steps over a fixed-size self-attention cache of ``prompt + max_new_tokens`` slots. Calls with the
same shapes and settings reuse the trace (``trace_count``).

The decoding rules reproduce transformers 4.57 ``generate``: logits processors in its order
(repetition penalty, min length, then temperature / top-k / top-p when sampling), greedy with
finished rows padded, and the vectorised beam search (2*num_beams candidates per step, length
penalty, early stopping heuristics, output length = longest returned hypothesis). Sampling uses
the Gumbel-max trick on stateless random numbers, so a ``seed`` reproduces a result exactly.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from blip_core.generation import GenerationSettings

from ._base import NEG_MASK, padding_bias
from .text import TextLMHeadModel, self_attention_bias

_BIG = -1.0e9   # transformers' "never pick" score offset in beam search


def _isin(tokens, ids: tuple):
    hit = tf.zeros_like(tokens, tf.bool)
    for t in ids:
        hit = hit | tf.equal(tokens, t)
    return hit


def _repeat(x, n: int):
    """repeat_interleave along the batch axis (transformers' input expansion for beams / samples)."""
    return x if n == 1 else tf.repeat(x, n, axis=0)


def process_scores(scores, presence, step, s: GenerationSettings, min_keep: int):
    """transformers' logits processors on (N, V) float32 scores at new-token index ``step``."""
    vocab = scores.shape[-1]
    neg_inf = tf.constant(-np.inf, scores.dtype)
    if s.repetition_penalty != 1.0:
        pen = tf.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        scores = tf.where(presence, pen, scores)
    if s.min_new_tokens > 0 and s.eos_token_id:
        eos = _isin(tf.range(vocab), s.eos_token_id)[None]
        scores = tf.where(eos & (step < s.min_new_tokens), neg_inf, scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k:
            k = min(max(s.top_k, min_keep), vocab)
            kth = tf.math.top_k(scores, k).values[:, -1:]
            scores = tf.where(scores < kth, neg_inf, scores)
        if s.top_p < 1.0:
            order = tf.argsort(scores, axis=-1, direction="ASCENDING", stable=True)
            ordered = tf.gather(scores, order, batch_dims=1)
            cum = tf.cumsum(tf.nn.softmax(ordered, axis=-1), axis=-1)
            drop = (cum <= 1.0 - s.top_p) & (tf.range(vocab) < vocab - min_keep)[None]
            drop = tf.gather(drop, tf.argsort(order, axis=-1), batch_dims=1)   # back to vocab order
            scores = tf.where(drop, neg_inf, scores)
    return scores


def _gumbel(shape, seed, step):
    u = tf.random.stateless_uniform(shape, seed=tf.stack([seed[0], seed[1] + tf.cast(step, seed.dtype)]),
                                    minval=np.finfo(np.float32).tiny, maxval=1.0)
    return -tf.math.log(-tf.math.log(u))


class _Decoder:
    """The cached decoder of one generate call: prefill and one-token steps."""

    def __init__(self, lm: TextLMHeadModel, crosses, cross_bias, mask_full, p_len: int, total: int):
        self.lm, self.crosses, self.cross_bias, self.mask_full = lm, crosses, cross_bias, mask_full
        self.p_len, self.total, self.next_position = p_len, total, None

    def prefill(self, ids, mask):
        # transformers' generate derives positions from the mask: cumsum - 1, and 1 on padding
        bert = self.lm.bert
        valid = tf.cast(mask, tf.int32)
        positions = tf.where(valid > 0, tf.cumsum(valid, axis=1) - 1, 1)
        self.next_position = tf.reduce_sum(valid, axis=1)[:, None]   # (N, 1): position of new token 0
        h, kvs = bert.encode(bert.embed(ids, positions), self_attention_bias(mask, ids.shape[1], True), self.crosses,
                             self.cross_bias)
        pad = [[0, 0], [0, 0], [0, self.total - ids.shape[1]], [0, 0]]
        caches = [(tf.pad(k, pad), tf.pad(v, pad)) for k, v in kvs]
        return self._logits(h[:, -1]), caches

    def step(self, tokens, index, caches):
        """Feed ``tokens`` (N,) written at buffer slot ``index`` (new tokens always count in the mask)."""
        bert = self.lm.bert
        h = bert.embed(tokens[:, None], self.next_position + (index - self.p_len))
        slots = tf.range(self.total)
        allowed = (slots[None] <= index) & (self.mask_full > 0)
        bias = tf.where(allowed, 0.0, NEG_MASK)[:, None, None, :]
        h, caches = bert.step(h, bias, self.crosses, self.cross_bias, caches, index)
        return self._logits(h[:, 0]), caches

    def _logits(self, h):
        return tf.cast(self.lm.cls(h), tf.float32)   # transformers scores in float32


def decode(lm: TextLMHeadModel, enc_states, enc_mask, prompt_ids, prompt_mask, seed, s: GenerationSettings):
    """Run generation on tensors; returns (sequences (N, P + max_new) int32, output length scalar)."""
    beams = s.num_beams
    expand = beams if beams > 1 else (s.num_return_sequences if s.do_sample else 1)
    p_len = prompt_ids.shape[1]
    total = p_len + s.max_new_tokens
    ids, mask = _repeat(prompt_ids, expand), _repeat(tf.cast(prompt_mask, tf.float32), expand)
    n = tf.shape(ids)[0]
    crosses = [(_repeat(k, expand), _repeat(v, expand)) for k, v in lm.bert.cross_kv(enc_states)]
    cross_bias = None if enc_mask is None else padding_bias(_repeat(enc_mask, expand))
    mask_full = tf.concat([mask, tf.ones([n, s.max_new_tokens], tf.float32)], axis=1)
    dec = _Decoder(lm, crosses, cross_bias, mask_full, p_len, total)
    logits, caches = dec.prefill(ids, mask)
    vocab = logits.shape[-1]
    presence = tf.reduce_any(tf.one_hot(ids, vocab, on_value=True, off_value=False, dtype=tf.bool), axis=1)
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else 0)
    if beams > 1:
        return _beam_search(dec, ids, logits, caches, presence, seed, s, total, pad)
    return _greedy_or_sample(dec, ids, logits, caches, presence, seed, s, total, pad)


def _greedy_or_sample(dec, ids, logits, caches, presence, seed, s, total, pad):
    p_len, n = ids.shape[1], tf.shape(ids)[0]
    seq = tf.concat([ids, tf.fill([n, s.max_new_tokens], tf.constant(pad, tf.int32))], axis=1)
    cols = tf.range(total)[None]
    has_eos = bool(s.eos_token_id)

    def cond(i, seq, caches, logits, unfinished, presence):
        return (i < s.max_new_tokens) & tf.reduce_any(unfinished)

    def body(i, seq, caches, logits, unfinished, presence):
        cur = p_len + i
        scores = process_scores(logits, presence, i, s, 1)
        if s.do_sample:
            scores = scores + _gumbel(tf.shape(scores), seed, i)
        tok = tf.argmax(scores, axis=-1, output_type=tf.int32)
        if has_eos:
            tok = tf.where(unfinished, tok, pad)
            unfinished = unfinished & ~_isin(tok, s.eos_token_id)
        seq = tf.where(cols == cur, tok[:, None], seq)
        presence = presence | tf.one_hot(tok, scores.shape[-1], on_value=True, off_value=False, dtype=tf.bool)
        more = (i + 1 < s.max_new_tokens) & tf.reduce_any(unfinished)
        logits, caches = tf.cond(more, lambda: dec.step(tok, cur, caches), lambda: (logits, caches))
        return i + 1, seq, caches, logits, unfinished, presence

    state = (tf.constant(0), seq, caches, logits, tf.ones([n], tf.bool), presence)
    i, seq, *_ = tf.while_loop(cond, body, state, maximum_iterations=s.max_new_tokens)
    return seq, p_len + i


def _beam_search(dec, ids, logits, caches, presence, seed, s, total, pad):
    k_beams, p_len = s.num_beams, ids.shape[1]
    vocab = logits.shape[-1]
    n_eos = len(s.eos_token_id)
    keep = max(2, 1 + n_eos) * k_beams
    min_keep = n_eos + 1 if n_eos else 2
    fill = (pad if s.pad_token_id else s.eos_token_id[0]) if s.eos_token_id else -1   # transformers' quirk
    early, lp = s.early_stopping, s.length_penalty
    # a static batch keeps the loop's cache shapes fixed; an exported model leaves it dynamic throughout
    b = ids.shape[0] // k_beams if ids.shape[0] is not None else tf.shape(ids)[0] // k_beams
    cols = tf.range(total)[None, None]
    top_mask = tf.range(keep)[None] < k_beams

    running = tf.concat([tf.reshape(ids, [b, k_beams, p_len]),
                         tf.fill([b, k_beams, s.max_new_tokens], tf.constant(fill, tf.int32))], axis=2)
    running_scores = tf.tile(tf.concat([[0.0], tf.fill([k_beams - 1], _BIG)], 0)[None], [b, 1])
    state = dict(
        i=tf.constant(0), running=running, running_scores=running_scores, seqs=running,
        scores=tf.fill([b, k_beams], _BIG), finished=tf.zeros([b, k_beams], tf.bool),
        lengths=tf.zeros([b, k_beams], tf.int32), unsat=tf.ones([b, 1], tf.bool), done=tf.constant(False),
        caches=caches, logits=logits, presence=presence)

    def length_norm(n):
        return tf.cast(tf.pow(tf.cast(n, tf.float64), lp), tf.float32)

    def cond(st):
        return ~st["done"] & (st["i"] < s.max_new_tokens)

    def body(st):
        i = st["i"]
        cur = p_len + i
        logp = process_scores(tf.nn.log_softmax(st["logits"], axis=-1), st["presence"], i, s, min_keep)
        acc = tf.reshape(tf.reshape(logp, [b, k_beams, vocab]) + st["running_scores"][:, :, None],
                         [b, k_beams * vocab])
        if s.do_sample:   # sampling without replacement = top-k of Gumbel-perturbed scores
            idx = tf.math.top_k(acc + _gumbel(tf.shape(acc), seed, i), keep).indices
            top_lp = tf.gather(acc, idx, batch_dims=1)
        else:
            top_lp, idx = tf.math.top_k(acc, keep)
        top_beam, top_ids = idx // vocab, idx % vocab
        top_seq = tf.gather(st["running"], top_beam, batch_dims=1)
        top_seq = tf.where(cols == cur, top_ids[:, :, None], top_seq)
        hits = _isin(top_ids, s.eos_token_id) | (cur + 1 >= total)

        # live beams for the next step: the best candidates that did not stop
        run_lp = top_lp + tf.cast(hits, tf.float32) * _BIG
        nxt = tf.math.top_k(run_lp, k_beams).indices
        running = tf.gather(top_seq, nxt, batch_dims=1)
        running_scores = tf.gather(run_lp, nxt, batch_dims=1)
        origin = tf.gather(top_beam, nxt, batch_dims=1) + (tf.range(b) * k_beams)[:, None]

        # finished hypotheses: merge the stopped top-k candidates into the kept set
        just_done = hits & top_mask
        cand = top_lp / length_norm(cur + 1 - p_len)
        full = tf.reduce_all(st["finished"], axis=-1, keepdims=True) & (early is True)
        cand += tf.cast(full, tf.float32) * _BIG
        cand += tf.cast(~st["unsat"], tf.float32) * _BIG
        cand += tf.cast(~just_done, tf.float32) * _BIG
        m_scores = tf.concat([st["scores"], cand], 1)
        best = tf.math.top_k(m_scores, k_beams).indices
        seqs = tf.gather(tf.concat([st["seqs"], top_seq], 1), best, batch_dims=1)
        scores = tf.gather(m_scores, best, batch_dims=1)
        finished = tf.gather(tf.concat([st["finished"], just_done], 1), best, batch_dims=1)
        lengths = tf.gather(tf.concat([st["lengths"], tf.fill(tf.shape(top_ids), cur + 1 - p_len)], 1), best,
                            batch_dims=1)

        # early-stopping heuristic and loop condition (transformers' rules)
        i = i + 1
        best_len = (s.max_new_tokens if (early == "never" and lp > 0.0) else i)
        best_running = running_scores[:, :1] / length_norm(best_len)
        worst = tf.where(finished, tf.reduce_min(scores, axis=1, keepdims=True), _BIG)
        unsat = st["unsat"] & tf.reduce_any(best_running > worst, axis=-1, keepdims=True)
        done = ~(tf.reduce_any(unsat) & ~(tf.reduce_all(finished) & (early is True)) & ~tf.reduce_all(hits))

        flat_origin = tf.reshape(origin, [-1])
        tok = tf.reshape(running[:, :, cur], [-1])
        presence = tf.gather(st["presence"], flat_origin) | tf.one_hot(tok, vocab, on_value=True, off_value=False,
                                                                       dtype=tf.bool)
        caches = [(tf.gather(k, flat_origin), tf.gather(v, flat_origin)) for k, v in st["caches"]]
        logits, caches = tf.cond(~done & (i < s.max_new_tokens), lambda: dec.step(tok, cur, caches),
                                 lambda: (st["logits"], caches))
        return [dict(i=i, running=running, running_scores=running_scores, seqs=seqs, scores=scores,
                     finished=finished, lengths=lengths, unsat=unsat, done=done, caches=caches, logits=logits,
                     presence=presence)]

    (st,) = tf.while_loop(cond, body, [state], maximum_iterations=s.max_new_tokens)
    nrs = s.num_return_sequences
    out = tf.reshape(st["seqs"][:, :nrs], [-1, total])
    return out, p_len + tf.reduce_max(st["lengths"][:, :nrs])


# -- compiled entry point ------------------------------------------------------------------------
def compiled(model, key, encode):
    """The XLA-compiled ``(encode_inputs, prompt_ids, prompt_mask, seed) -> (ids, length)`` for ``key``.

    ``key`` = (tag, GenerationSettings without seed, ...); ``encode(*encode_inputs)`` returns the
    cross-attended states and their mask (or None) and runs inside the same compiled function.
    """
    fn = model._compiled.get(key)
    if fn is None:
        settings = next(k for k in key if isinstance(k, GenerationSettings))
        lm = model.text_decoder

        def run(encode_inputs, prompt_ids, prompt_mask, seed):
            states, mask = encode(*encode_inputs)
            return decode(lm, states, mask, prompt_ids, prompt_mask, seed, settings)

        fn = tf.function(run, jit_compile=True, autograph=False)   # explicit loops: no AutoGraph
        model._compiled[key] = fn
    return fn


def run_generate(model, tag, encode, encode_inputs, prompt_ids: np.ndarray, prompt_mask, s: GenerationSettings):
    """Validate, pick/compile the function, run it and cut the output to transformers' length (int64)."""
    max_pos = model.config.text_config.max_position_embeddings
    if s.max_length > max_pos:
        raise ValueError(f"prompt ({s.prompt_length}) + max_new_tokens ({s.max_new_tokens}) exceeds the decoder's "
                         f"max_position_embeddings={max_pos}")
    if prompt_mask is None:
        # transformers infers the mask from padding when pad is a real token distinct from eos
        pad = s.pad_token_id
        if pad is not None and pad not in s.eos_token_id and (prompt_ids == pad).any():
            prompt_mask = (prompt_ids != pad).astype(np.float32)
        else:
            prompt_mask = np.ones(prompt_ids.shape, np.float32)
    seed_val = s.seed if s.seed is not None else int(np.random.randint(0, 2**31 - 1))
    key = (tag, dataclasses.replace(s, seed=None))
    fn = compiled(model, key, encode)
    seq, length = fn(encode_inputs, tf.constant(prompt_ids, tf.int32), tf.constant(prompt_mask, tf.float32),
                     tf.constant([seed_val, 0], tf.int64))
    return tf.cast(seq[:, : int(length)], tf.int64)


def trace_count(model) -> int:
    """How many times the model's generation functions have been traced (for retrace checks)."""
    return sum(fn.experimental_get_tracing_count() for fn in model._compiled.values())
