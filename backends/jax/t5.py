"""T5 / Flan-T5 encoder-decoder language model (BLIP-2's T5 variants) in Flax linen.

RMS layer norm without bias, unscaled attention (``attend`` from ``opt.py``) with a bucketed relative position
bias computed in block 0 of each stack and shared by the others, ReLU / GELU / gated feed-forward. The output
projection reads ``shared`` when ``tie_word_embeddings`` (after scaling the decoder output by
``d_model ** -0.5``); Flan-T5 unties it. Param paths are the weight table's
(``decoder/block_0/layer_1/EncDecAttention/k/kernel``); the stacks' ``embed_tokens`` are ``shared`` itself.

The decoder runs a chunk of ``s`` tokens at buffer index ``start`` of a fixed-size sequence (key mask (B, L)
over the buffer), with a self-attention cache of one ``(keys, values)`` pair (B, L, H, d_kv) per block and
cross-attention keys/values computed once from the encoder states (``T5ForConditionalGeneration.cross_kv``).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import activation
from .opt import attend, causal_bias, split_heads, write_cache
from .text import Embedding


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh-TensorFlow bucketing: exact buckets for short distances, log-spaced up to ``max_distance``."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    # float32 as torch computes it; the maximum(., 1) only avoids log(0) where the `where` keeps `distance`
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm (param ``scale``): the statistic in float32, then cast to the weight's dtype."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(scale.dtype)


class T5Attention(nn.Module):
    config: Any
    has_relative_attention_bias: bool = False
    is_decoder: bool = False

    def setup(self):
        c = self.config
        inner = c.num_heads * c.d_kv
        self.q, self.k, self.v = (nn.Dense(inner, use_bias=False) for _ in range(3))
        self.o = nn.Dense(c.d_model, use_bias=False)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, query_positions, key_length: int):
        """(1, heads, q, k) bias of queries at absolute ``query_positions`` over keys 0..key_length-1."""
        c = self.config
        rel = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions.astype(jnp.int32)[:, None]
        bucket = relative_position_bucket(rel, not self.is_decoder, c.relative_attention_num_buckets,
                                          c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(bucket), (2, 0, 1))[None]

    def project_kv(self, states):
        return split_heads(self.k(states), self.config.num_heads), split_heads(self.v(states), self.config.num_heads)

    def __call__(self, x, bias, kv):
        """``(output, attention map (B, H, s, L))``."""
        ctx, probs = attend(split_heads(self.q(x), self.config.num_heads), kv[0], kv[1], bias)
        return self.o(ctx), probs


class T5DenseReluDense(nn.Module):
    """``wi`` -> act -> ``wo``, or gated: act(``wi_0``) * ``wi_1`` -> ``wo``."""

    config: Any

    def setup(self):
        c = self.config
        if c.is_gated_act:
            self.wi_0, self.wi_1 = nn.Dense(c.d_ff, use_bias=False), nn.Dense(c.d_ff, use_bias=False)
        else:
            self.wi = nn.Dense(c.d_ff, use_bias=False)
        self.wo = nn.Dense(c.d_model, use_bias=False)

    def __call__(self, x):
        act = activation(self.config.dense_act_fn)
        h = act(self.wi_0(x)) * self.wi_1(x) if self.config.is_gated_act else act(self.wi(x))
        return self.wo(h)


class T5LayerSelfAttention(nn.Module):
    config: Any
    has_relative_attention_bias: bool
    is_decoder: bool

    def setup(self):
        self.SelfAttention = T5Attention(self.config, self.has_relative_attention_bias, self.is_decoder)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon)


class T5LayerCrossAttention(nn.Module):
    config: Any

    def setup(self):
        self.EncDecAttention = T5Attention(self.config, False, True)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon)


class T5LayerFF(nn.Module):
    config: Any

    def setup(self):
        self.DenseReluDense = T5DenseReluDense(self.config)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(h):
    # transformers clamps float16 activations so that an overflow does not become inf/NaN downstream.
    if h.dtype != jnp.float16:
        return h
    top = jnp.finfo(h.dtype).max
    top = jnp.where(jnp.any(jnp.isinf(h)), top - 1000, top).astype(h.dtype)
    return jnp.clip(h, -top, top)


class T5Block(nn.Module):
    config: Any
    has_relative_attention_bias: bool
    is_decoder: bool

    def setup(self):
        layers = [T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.is_decoder)]
        if self.is_decoder:
            layers.append(T5LayerCrossAttention(self.config))
        self.layer = layers + [T5LayerFF(self.config)]

    def __call__(self, h, self_bias, cache=None, start=0, cross_kv=None, cross_bias=None):
        """``(h, cache, self-attention map, cross-attention map or None)``."""
        sa = self.layer[0]
        x = sa.layer_norm(h)
        k, v = sa.SelfAttention.project_kv(x)
        if cache is not None:
            k, v = write_cache(cache[0], k, start), write_cache(cache[1], v, start)
            cache = (k, v)
        x, probs = sa.SelfAttention(x, self_bias, (k, v))
        h, cross = _clamp_fp16(h + x), None
        if self.is_decoder:
            ca = self.layer[1]
            x, cross = ca.EncDecAttention(ca.layer_norm(h), cross_bias, cross_kv)
            h = _clamp_fp16(h + x)
        return _clamp_fp16(self.layer[-1](h)), cache, probs, cross


def padding_bias(mask, dtype):
    """(B, S) 0/1 mask -> additive (B, 1, 1, S) bias with the dtype's most negative value at padding."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


class T5Stack(nn.Module):
    config: Any
    is_decoder: bool

    def setup(self):
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        self.block = [T5Block(c, i == 0, self.is_decoder) for i in range(n)]
        self.final_layer_norm = T5LayerNorm(c.layer_norm_epsilon)

    def __call__(self, h, key_mask, start=0, cache=None, cross_kv=None, cross_mask=None):
        """Returns ``(last_hidden_state, hidden_states, new_cache, attentions, cross_attentions)``; ``h`` is the
        embedded chunk at ``start``; the attention maps are one per block (cross: decoder only, else ())."""
        s, total = h.shape[1], key_mask.shape[1]
        query_pos = start + jnp.arange(s)
        pos_bias = self.block[0].layer[0].SelfAttention.position_bias(query_pos, total).astype(h.dtype)
        mask_bias = causal_bias(key_mask, start, s, h.dtype) if self.is_decoder else padding_bias(key_mask, h.dtype)
        self_bias = pos_bias + mask_bias
        cross_bias = padding_bias(cross_mask, h.dtype) if self.is_decoder else None
        hidden, new_cache, attentions, crosses = [], [], [], []
        for i, block in enumerate(self.block):
            hidden.append(h)
            h, c, probs, cross = block(h, self_bias, None if cache is None else cache[i], start,
                                       None if cross_kv is None else cross_kv[i], cross_bias)
            new_cache.append(c)
            attentions.append(probs)
            if cross is not None:
                crosses.append(cross)
        h = self.final_layer_norm(h)
        hidden.append(h)
        return h, tuple(hidden), (tuple(new_cache) if cache is not None else None), tuple(attentions), tuple(crosses)


class T5ForConditionalGeneration(nn.Module):
    """``shared`` embedding, ``encoder`` and ``decoder`` stacks, ``lm_head`` (``shared`` when tied)."""

    config: Any

    def setup(self):
        c = self.config
        self.shared = Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False)

    def embed(self, ids):
        return self.shared(ids)

    def encode(self, embeds, mask):
        """Encoder ``(last_hidden_state, hidden_states, attentions)`` of embedded inputs."""
        h, hidden, _, attentions, _ = self.encoder(embeds, mask)
        return h, hidden, attentions

    def cross_kv(self, encoder_states):
        """Per-block cross-attention (keys, values), computed once per input."""
        return tuple(block.layer[1].EncDecAttention.project_kv(encoder_states) for block in self.decoder.block)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.shared.attend(h * jnp.asarray(self.config.d_model ** -0.5, h.dtype))
        return self.lm_head(h)

    def decode(self, ids, key_mask, cross_kv, cross_mask, start=0, cache=None):
        """Returns ``(logits, decoder hidden_states, new_cache, attentions, cross_attentions)`` of the decoder
        chunk ``ids`` at ``start``."""
        h, hidden, cache, attentions, crosses = self.decoder(self.shared(ids), key_mask, start, cache, cross_kv,
                                                             cross_mask)
        return self.logits(h), hidden, cache, attentions, crosses

    def __call__(self, embeds, mask, decoder_ids, decoder_mask):
        """Full forward: a dict of ``logits``, ``decoder_hidden_states``, ``decoder_attentions``,
        ``cross_attentions``, ``encoder_last_hidden_state``, ``encoder_hidden_states``, ``encoder_attentions``
        (under jit, the ones a caller drops are never computed)."""
        enc, enc_hidden, enc_attentions = self.encode(embeds, mask)
        logits, hidden, _, attentions, crosses = self.decode(decoder_ids, decoder_mask, self.cross_kv(enc), mask)
        return dict(logits=logits, decoder_hidden_states=hidden, decoder_attentions=attentions,
                    cross_attentions=crosses, encoder_last_hidden_state=enc, encoder_hidden_states=enc_hidden,
                    encoder_attentions=enc_attentions)


def shift_right(labels, start: int, pad: int):
    """Decoder inputs from labels: ``start`` in front, labels shifted by one, -100 replaced by ``pad``."""
    shifted = jnp.concatenate([jnp.full((labels.shape[0], 1), start, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad, shifted)


def token_loss(logits, labels):
    """Cross entropy of every position (no shift), -100 ignored, mean, in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != -100
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid).astype(jnp.float32)


def init_cache(config, rows: int, length: int, dtype):
    """Zeroed decoder self-attention cache: one ``(keys, values)`` of (rows, length, heads, d_kv) per block."""
    shape = (rows, length, config.num_heads, config.d_kv)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_decoder_layers))
