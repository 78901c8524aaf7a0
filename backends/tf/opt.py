"""OPT decoder-only language model (BLIP-2's OPT variants) in TensorFlow.

Pre-LN (or post-LN for ``do_layer_norm_before=False``) decoder; learned positions read row
``p + 2`` of the table, with ``p`` counted from the cumulative attention mask so left padding does
not move real tokens; ReLU (or the configured) FFN; ``lm_head`` is the word-embedding variable itself
when ``tie_word_embeddings``. Built from the backend's ``Dense`` / ``LayerNorm`` / ``attend`` blocks.
Token embeddings are ``hidden_size`` wide: the BLIP-2 config refuses an OPT with another
``word_embed_proj_dim`` (``Blip2Config.validate_for``), so there is no ``project_in`` / ``project_out``.

Cache for generation: one ``(K, V)`` pair per layer, each (rows, heads, slots, head_dim), fixed size
(``init_cache``); ``run`` writes the keys/values of its tokens at their slots and attends over the
whole buffer, the causal + padding bias hiding unwritten and padded slots. Masked scores hold the
compute dtype's most negative value, as transformers does.
"""
from __future__ import annotations

import tensorflow as tf

from blip_core.blip2 import check_opt_position

from ._base import Dense, LayerNorm, activation, attend, merge_heads, split_heads

OPT_LAYER_NORM_EPS = 1e-5   # torch.nn.LayerNorm's default, which OPT uses


def layer_norm(params, p):
    """OPT's LayerNorm; a norm without affine parameters (``layer_norm_elementwise_affine=False``)
    reads 1 and 0 in their place."""
    if f"{p}/gamma" in params and f"{p}/beta" in params:
        return LayerNorm(params, p, OPT_LAYER_NORM_EPS)
    view = {f"{p}/gamma": params.get(f"{p}/gamma", tf.constant(1.0)),
            f"{p}/beta": params.get(f"{p}/beta", tf.constant(0.0))}
    return LayerNorm(view, p, OPT_LAYER_NORM_EPS)


def write_slots(cache, new, start):
    """Write ``new`` (rows, heads, s, d) into ``cache`` (rows, heads, T, d) at slots ``[start, start + s)``.

    One token (s = 1) may go to any slot, ``start`` a tensor inside the decoding loop; several
    tokens (the prompt) are written from slot 0.
    """
    s, total = new.shape[2], cache.shape[2]
    if s == 1:
        slot = tf.equal(tf.range(total), start)[None, None, :, None]
        return tf.where(slot, tf.cast(new, cache.dtype), cache)
    if tf.get_static_value(start) not in (0, None):
        raise ValueError("several tokens can only be written from slot 0 (the prompt)")
    return tf.concat([tf.cast(new, cache.dtype), cache[:, :, s:]], axis=2)


def causal_bias(key_mask, query_slots, dtype: tf.DType):
    """Additive (rows, 1, q, T) bias: a query at slot ``t`` sees the real keys at slots ``<= t``.

    ``key_mask`` (rows, T) 0/1 over every slot; ``query_slots`` (q,) int32.
    """
    slots = tf.range(tf.shape(key_mask)[1])
    allowed = (slots[None, :] <= query_slots[:, None])[None] & (key_mask[:, None, :] > 0)
    return tf.where(allowed, tf.zeros([], dtype), tf.constant(dtype.min, dtype))[:, None]


def mask_positions(key_mask, query_slots, pad_position: int = -1):
    """OPT's positions of the tokens at ``query_slots``: ``cumsum(mask) - 1`` on real tokens and
    ``pad_position`` on padding (transformers: -1 in ``forward``, 1 in ``generate``)."""
    m = tf.cast(key_mask > 0, tf.int32)
    return tf.gather(tf.where(m > 0, tf.cumsum(m, axis=1) - 1, pad_position), query_slots, axis=1)


def with_slot_written(key_mask, start, s: int):
    """``key_mask`` with slots ``[start, start + s)`` marked real (the tokens being fed are)."""
    slots = tf.range(tf.shape(key_mask)[1])
    fed = (slots >= start) & (slots < start + s)
    return tf.where(fed[None], tf.ones([], key_mask.dtype), key_mask)


class OPTDecoderLayer(tf.Module):
    def __init__(self, params, p, cfg):
        super().__init__(name=None)
        bias = cfg.enable_bias
        self.heads = cfg.num_attention_heads
        self.pre_norm = cfg.do_layer_norm_before
        self.q_proj = Dense(params, f"{p}/self_attn/q_proj", bias)
        self.k_proj = Dense(params, f"{p}/self_attn/k_proj", bias)
        self.v_proj = Dense(params, f"{p}/self_attn/v_proj", bias)
        self.out_proj = Dense(params, f"{p}/self_attn/out_proj", bias)
        self.self_attn_layer_norm = layer_norm(params, f"{p}/self_attn_layer_norm")
        self.fc1 = Dense(params, f"{p}/fc1", bias)
        self.fc2 = Dense(params, f"{p}/fc2", bias)
        self.final_layer_norm = layer_norm(params, f"{p}/final_layer_norm")
        self.act = activation(cfg.activation_function)

    def __call__(self, h, bias, cache=None, start=None, probs_out=None):
        """-> (hidden, (K, V)): the keys/values of ``h``, or the cache with them written at ``start``."""
        x = self.self_attn_layer_norm(h) if self.pre_norm else h
        q = split_heads(self.q_proj(x), self.heads)
        k, v = split_heads(self.k_proj(x), self.heads), split_heads(self.v_proj(x), self.heads)
        if cache is not None:
            k, v = write_slots(cache[0], k, start), write_slots(cache[1], v, start)
        h = h + self.out_proj(merge_heads(attend(q, k, v, bias, probs_out)))
        if not self.pre_norm:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if self.pre_norm else h
        h = h + self.fc2(self.act(self.fc1(x)))
        if not self.pre_norm:
            h = self.final_layer_norm(h)
        return h, (k, v)


class OPTForCausalLM(tf.Module):
    """OPT trunk + LM head under ``prefix`` (``language_model`` in BLIP-2).

    ``run(embeds, mask)`` -> (hidden (B, L, E), caches); ``logits(hidden)`` -> (B, L, V).
    """

    def __init__(self, params, prefix, cfg):
        super().__init__(name=None)
        m = f"{prefix}/model/decoder"
        self.cfg = cfg
        self.embed_tokens = params[f"{m}/embed_tokens/embeddings"]
        self.embed_positions = params[f"{m}/embed_positions/embeddings"]
        self.final_layer_norm = (layer_norm(params, f"{m}/final_layer_norm")
                                 if cfg.do_layer_norm_before and not cfg._remove_final_layer_norm else None)
        self.layers = [OPTDecoderLayer(params, f"{m}/layers_{i}", cfg) for i in range(cfg.num_hidden_layers)]
        # tied: the embedding variable itself, used transposed; untied: the (E, V) kernel
        self.lm_head = None if cfg.tie_word_embeddings else params[f"{prefix}/lm_head/kernel"]

    def embed(self, ids):
        return tf.gather(self.embed_tokens, ids)

    def logits(self, h):
        if self.lm_head is None:
            return tf.matmul(h, self.embed_tokens, transpose_b=True)
        return tf.matmul(h, self.lm_head)

    def init_cache(self, rows, total_len: int):
        hd = self.cfg.hidden_size // self.cfg.num_attention_heads
        shape = [rows, self.cfg.num_attention_heads, total_len, hd]
        dtype = self.embed_tokens.dtype
        return tuple((tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in self.layers)

    def run(self, embeds, key_mask, cache=None, start=0, rec=None, pad_position: int = -1):
        """Decoder over ``embeds`` (B, s, E) placed at slots ``[start, start + s)``.

        ``key_mask`` (B, T) 0/1 over every slot (T = s without a cache). With ``cache`` the new
        keys/values are written into it and attention runs over all its slots; padded tokens read
        position ``pad_position``. Returns
        (hidden (B, s, E), per-layer (K, V)); ``rec`` records hidden states and attentions.
        """
        s = embeds.shape[1]
        slots = tf.range(s) + start
        positions = mask_positions(key_mask, slots, pad_position)
        if self.cfg.max_position_embeddings and tf.get_static_value(positions) is not None:
            check_opt_position(int(tf.reduce_max(positions)), self.cfg.max_position_embeddings)
        h = embeds + tf.cast(tf.gather(self.embed_positions, positions + 2), embeds.dtype)
        bias = causal_bias(key_mask, slots, h.dtype)
        kvs = []
        for i, layer in enumerate(self.layers):
            if rec is not None:
                rec.add_hidden(h)
            h, kv = layer(h, bias, None if cache is None else cache[i], start, rec.attn if rec is not None else None)
            kvs.append(kv)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if rec is not None:
            rec.add_hidden(h)
        return h, tuple(kvs)
