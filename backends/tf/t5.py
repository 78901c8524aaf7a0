"""T5 / Flan-T5 encoder-decoder language model (BLIP-2's T5 variants) in TensorFlow.

RMS layer norm without bias (statistic in float32), unscaled attention with a bucketed relative
position bias computed by block 0 of each stack and shared by the others, ReLU / GELU / gated
feed-forward. The output projection is the ``shared`` embedding only when ``tie_word_embeddings``
(then the decoder output is scaled by ``d_model ** -0.5`` first); Flan-T5 unties it and skips the
scaling. Built from the backend's ``Dense`` / ``split_heads`` / ``merge_heads`` blocks; the
causal mask and the cache writes are OPT's (``opt.py``).

Generation cache: one ``(K, V)`` self-attention pair per decoder block, each (rows, heads, slots,
d_kv); the cross-attention keys/values of the encoder states are computed once (``cross_kv``).
"""
from __future__ import annotations

import math

import tensorflow as tf

from ._base import Dense, activation, merge_heads, rsqrt_eps, softmax, split_heads
from .opt import causal_bias, write_slots


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh-TensorFlow bucketing: exact buckets for short distances, log-spaced up to ``max_distance``."""
    buckets = tf.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += tf.cast(relative_position > 0, relative_position.dtype) * num_buckets
        distance = tf.abs(relative_position)
    else:
        distance = tf.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    # maximum(., 1) only avoids log(0) in entries that the `where` below discards anyway
    scaled = (tf.math.log(tf.cast(tf.maximum(distance, 1), tf.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = tf.minimum(max_exact + tf.cast(scaled, distance.dtype), num_buckets - 1)
    return buckets + tf.where(distance < max_exact, distance, large)


class T5LayerNorm(tf.Module):
    """RMS norm: no mean subtraction, no bias; the statistic is taken in float32."""

    def __init__(self, params, p, eps):
        super().__init__(name=None)
        self.gamma, self.eps = params[f"{p}/gamma"], float(eps)

    def __call__(self, x):
        x32 = tf.cast(x, tf.float32)
        y = x32 * rsqrt_eps(tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True), self.eps)
        return self.gamma * tf.cast(y, self.gamma.dtype)


class T5Attention(tf.Module):
    """q/k/v/o without bias and without 1/sqrt(d) scaling (folded into T5's initialisation)."""

    def __init__(self, params, p, cfg, is_decoder: bool, relative: bool):
        super().__init__(name=None)
        self.heads, self.is_decoder = cfg.num_heads, is_decoder
        self.buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q, self.k = Dense(params, f"{p}/q", False), Dense(params, f"{p}/k", False)
        self.v, self.o = Dense(params, f"{p}/v", False), Dense(params, f"{p}/o", False)
        self.relative_attention_bias = params[f"{p}/relative_attention_bias/embeddings"] if relative else None

    def compute_bias(self, query_slots, key_length):
        """(1, heads, q, k) bias for queries at ``query_slots`` over keys ``0 .. key_length - 1``."""
        memory = tf.range(key_length)[None, :]
        bucket = relative_position_bucket(memory - query_slots[:, None], not self.is_decoder, self.buckets,
                                          self.max_distance)
        return tf.transpose(tf.gather(self.relative_attention_bias, bucket), [2, 0, 1])[None]

    def kv(self, states):
        return split_heads(self.k(states), self.heads), split_heads(self.v(states), self.heads)

    def __call__(self, x, k, v, bias, probs_out=None):
        scores = tf.matmul(split_heads(self.q(x), self.heads), k, transpose_b=True) + tf.cast(bias, x.dtype)
        probs = tf.cast(softmax(tf.cast(scores, tf.float32)), x.dtype)
        if probs_out is not None:
            probs_out.append(probs)
        return self.o(merge_heads(tf.matmul(probs, v)))


class T5FeedForward(tf.Module):
    """``DenseReluDense`` (gated or not) behind its RMS norm, with the residual."""

    def __init__(self, params, p, cfg):
        super().__init__(name=None)
        d = f"{p}/DenseReluDense"
        self.gated = cfg.is_gated_act
        self.wi = Dense(params, f"{d}/wi_0" if self.gated else f"{d}/wi", False)
        self.wi_1 = Dense(params, f"{d}/wi_1", False) if self.gated else None
        self.wo = Dense(params, f"{d}/wo", False)
        self.act = activation(cfg.dense_act_fn)
        self.layer_norm = T5LayerNorm(params, f"{p}/layer_norm", cfg.layer_norm_epsilon)

    def __call__(self, h):
        x = self.layer_norm(h)
        y = self.act(self.wi(x))
        if self.gated:
            y = y * self.wi_1(x)
        return h + self.wo(y)


class T5Block(tf.Module):
    def __init__(self, params, p, cfg, index: int, is_decoder: bool):
        super().__init__(name=None)
        q = f"{p}/layer_"
        self.is_decoder = is_decoder
        self.self_attn = T5Attention(params, f"{q}0/SelfAttention", cfg, is_decoder, index == 0)
        self.self_norm = T5LayerNorm(params, f"{q}0/layer_norm", cfg.layer_norm_epsilon)
        if is_decoder:
            self.cross_attn = T5Attention(params, f"{q}1/EncDecAttention", cfg, True, False)
            self.cross_norm = T5LayerNorm(params, f"{q}1/layer_norm", cfg.layer_norm_epsilon)
        self.ff = T5FeedForward(params, f"{q}{2 if is_decoder else 1}", cfg)

    def __call__(self, h, self_bias, cross=None, cross_bias=None, cache=None, start=None, rec=None):
        """-> (hidden, (K, V)); ``cross`` = this block's encoder (K, V) in the decoder."""
        x = self.self_norm(h)
        k, v = self.self_attn.kv(x)
        if cache is not None:
            k, v = write_slots(cache[0], k, start), write_slots(cache[1], v, start)
        h = h + self.self_attn(x, k, v, self_bias, rec.attn if rec is not None else None)
        if self.is_decoder:
            h = h + self.cross_attn(self.cross_norm(h), cross[0], cross[1], cross_bias,
                                    rec.cross if rec is not None else None)
        return self.ff(h), (k, v)


def padding_bias(mask, dtype: tf.DType):
    """(B, S) 0/1 mask -> additive (B, 1, 1, S) bias holding the dtype's most negative value."""
    return tf.where(tf.cast(mask, tf.float32) > 0, tf.zeros([], dtype), tf.constant(dtype.min, dtype))[:, None,
                                                                                                         None, :]


class T5Stack(tf.Module):
    def __init__(self, params, p, cfg, is_decoder: bool):
        super().__init__(name=None)
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.is_decoder = is_decoder
        self.block = [T5Block(params, f"{p}/block_{i}", cfg, i, is_decoder) for i in range(n)]
        self.final_layer_norm = T5LayerNorm(params, f"{p}/final_layer_norm", cfg.layer_norm_epsilon)

    def __call__(self, h, mask, crosses=None, cross_mask=None, cache=None, start=0, rec=None):
        """Encoder: ``mask`` (B, L). Decoder: ``mask`` (B, T) over every slot, ``h`` at ``[start, start + s)``."""
        s = h.shape[1]
        slots = tf.range(s) + start
        total = tf.shape(mask)[1]
        pos_bias = tf.cast(self.block[0].self_attn.compute_bias(slots, total), h.dtype)
        if self.is_decoder:
            self_bias = pos_bias + causal_bias(mask, slots, h.dtype)
            cross_bias = padding_bias(cross_mask, h.dtype)
        else:
            self_bias, cross_bias = pos_bias + padding_bias(mask, h.dtype), None
        kvs = []
        for i, block in enumerate(self.block):
            if rec is not None:
                rec.add_hidden(h)
            h, kv = block(h, self_bias, None if crosses is None else crosses[i], cross_bias,
                          None if cache is None else cache[i], start, rec)
            kvs.append(kv)
        h = self.final_layer_norm(h)
        if rec is not None:
            rec.add_hidden(h)
        return h, tuple(kvs)

    def cross_kv(self, enc):
        """Every decoder block's cross-attention (K, V) of the encoder states (computed once)."""
        return tuple(block.cross_attn.kv(enc) for block in self.block)


class T5ForConditionalGeneration(tf.Module):
    """T5 encoder + decoder + LM head under ``prefix`` (``language_model`` in BLIP-2)."""

    def __init__(self, params, prefix, cfg):
        super().__init__(name=None)
        self.cfg = cfg
        self.shared = params[f"{prefix}/shared/embeddings"]
        self.encoder = T5Stack(params, f"{prefix}/encoder", cfg, False)
        self.decoder = T5Stack(params, f"{prefix}/decoder", cfg, True)
        self.lm_head = None if cfg.tie_word_embeddings else params[f"{prefix}/lm_head/kernel"]

    def embed(self, ids):
        return tf.gather(self.shared, ids)

    def logits(self, h):
        if self.lm_head is None:
            # with a shared matrix the decoder output is rescaled first (Mesh TensorFlow convention)
            return tf.matmul(h * (self.cfg.d_model ** -0.5), self.shared, transpose_b=True)
        return tf.matmul(h, self.lm_head)

    def shift_right(self, labels):
        start = self.cfg.decoder_start_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id must be set to build decoder inputs from labels")
        shifted = tf.concat([tf.fill([tf.shape(labels)[0], 1], tf.constant(start, labels.dtype)), labels[:, :-1]], 1)
        return tf.where(shifted == -100, tf.constant(self.cfg.pad_token_id, labels.dtype), shifted)

    def init_cache(self, rows, total_len: int):
        shape = [rows, self.cfg.num_heads, total_len, self.cfg.d_kv]
        return tuple((tf.zeros(shape, self.shared.dtype), tf.zeros(shape, self.shared.dtype))
                     for _ in self.decoder.block)
