"""OPT decoder-only language model (BLIP-2's OPT variants) in Flax linen.

Pre-LN (post-LN for ``do_layer_norm_before=False``) decoder, ReLU feed-forward, learned positions read at row
``p + 2`` of the table where ``p`` counts the real tokens before (``cumsum(mask) - 1``; padding reads row 1, or
row 3 in generation as transformers' ``generate``), so left padding does not move real tokens. ``lm_head`` reads ``embed_tokens`` when tied. Param paths are the
weight table's (``model/decoder/layers_0/self_attn/q_proj/kernel``).
Token embeddings are ``hidden_size`` wide: the BLIP-2 config refuses an OPT with another
``word_embed_proj_dim`` (``Blip2Config.validate_for``), so there is no ``project_in`` / ``project_out``.

One function serves the full forward and cached decoding: ``OPTForCausalLM.__call__(embeds, key_mask, start,
cache)`` runs a chunk of ``s`` tokens that sits at buffer index ``start`` of a fixed-size sequence whose 0/1
``key_mask`` (B, L) covers the whole buffer; with a cache (one ``(keys, values)`` pair of shape (B, L, H, hd)
per layer) the chunk is written at ``start`` with ``dynamic_update_slice`` and attends over the buffer.
Masked keys get the dtype's most negative value, as transformers does.

Example (``params`` being the ``language_model`` subtree of a BLIP-2 model)::

    lm = OPTForCausalLM(config)
    embeds = lm.apply({"params": params}, ids, method=OPTForCausalLM.embed)      # ids (B, L)
    logits, hidden_states, _, attentions = lm.apply({"params": params}, embeds, mask)   # logits (B, L, V)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import activation, softmax
from .text import Embedding
from .vision import LayerNorm


def causal_bias(key_mask, start, length: int, dtype):
    """Additive (B, 1, s, L) bias: the query at buffer index ``start + i`` sees keys ``<=`` it that the mask allows."""
    q_pos = start + jnp.arange(length)[:, None]
    allowed = (jnp.arange(key_mask.shape[1])[None, :] <= q_pos)[None] & (key_mask[:, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None]


def positions(key_mask, start, length: int, pad_position: int = -1):
    """Positions of the chunk: real tokens counted from 0 over the buffer, padding at ``pad_position``.

    OPT's forward puts padding at -1 (table row 1); transformers' ``generate`` derives positions itself and
    puts padding at 1, which decides the first new token after a right-padded prompt."""
    count = jnp.cumsum(key_mask, axis=1) - 1
    pos = jnp.where(key_mask > 0, count, pad_position)
    return jax.lax.dynamic_slice_in_dim(pos, start, length, axis=1)


def write_cache(cache, new, start):
    """Write ``new`` (B, s, H, hd) into the fixed-size ``cache`` (B, L, H, hd) at ``start``."""
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), start, axis=1)


def attend(q, k, v, bias):
    """Multi-head attention of (B, s, H, hd) queries over (B, L, H, hd) keys/values; softmax in float32.

    Returns the (B, s, H * hd) context and the attention map (B, H, s, L). OPT scales the query before the
    product and T5 not at all, so scaling is the caller's."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    probs = softmax(scores)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return ctx.reshape(ctx.shape[0], ctx.shape[1], -1), probs


def split_heads(x, heads: int):
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)


def padded_lookup(embedding, ids, pad_id):
    """``embedding(ids)`` where lookups of ``pad_id`` pass no gradient to the table (torch's ``padding_idx``,
    which transformers sets on OPT's and the Q-Former's word embeddings)."""
    x = embedding(ids)
    if pad_id is None:
        return x
    return jnp.where((ids == pad_id)[..., None], jax.lax.stop_gradient(x), x)


class OPTAttention(nn.Module):
    config: Any

    def setup(self):
        d, bias = self.config.hidden_size, self.config.enable_bias
        self.k_proj, self.v_proj = nn.Dense(d, use_bias=bias), nn.Dense(d, use_bias=bias)
        self.q_proj, self.out_proj = nn.Dense(d, use_bias=bias), nn.Dense(d, use_bias=bias)

    def __call__(self, x, bias, cache=None, start=0):
        heads = self.config.num_attention_heads
        scaling = (self.config.hidden_size // heads) ** -0.5
        q = split_heads(self.q_proj(x) * jnp.asarray(scaling, x.dtype), heads)
        k, v = split_heads(self.k_proj(x), heads), split_heads(self.v_proj(x), heads)
        if cache is not None:
            k, v = write_cache(cache[0], k, start), write_cache(cache[1], v, start)
            cache = (k, v)
        ctx, probs = attend(q, k, v, bias)
        return self.out_proj(ctx), cache, probs


class OPTDecoderLayer(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = LayerNorm(1e-5)
        self.fc1 = nn.Dense(c.ffn_dim, use_bias=c.enable_bias)
        self.fc2 = nn.Dense(c.hidden_size, use_bias=c.enable_bias)
        self.final_layer_norm = LayerNorm(1e-5)

    def __call__(self, h, bias, cache=None, start=0):
        """Returns ``(h, cache, attention map)``."""
        pre = self.config.do_layer_norm_before
        x, cache, probs = self.self_attn(self.self_attn_layer_norm(h) if pre else h, bias, cache, start)
        h = h + x
        if not pre:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if pre else h
        h = h + self.fc2(activation(self.config.activation_function)(self.fc1(x)))
        if not pre:
            h = self.final_layer_norm(h)
        return h, cache, probs


class OPTDecoder(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        if not c.layer_norm_elementwise_affine:
            raise ValueError("the JAX OPT supports layer_norm_elementwise_affine=True only (every OPT checkpoint)")
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.embed_positions = Embedding(c.max_position_embeddings + 2, c.hidden_size)
        if c.do_layer_norm_before and not c._remove_final_layer_norm:
            self.final_layer_norm = LayerNorm(1e-5)
        self.layers = [OPTDecoderLayer(c) for _ in range(c.num_hidden_layers)]

    def __call__(self, embeds, key_mask, start=0, cache=None, pad_position=-1):
        """Returns ``(last_hidden_state, hidden_states, new_cache, attentions)``."""
        c = self.config
        s = embeds.shape[1]
        h = embeds + self.embed_positions(positions(key_mask, start, s, pad_position) + 2).astype(embeds.dtype)
        bias = causal_bias(key_mask, start, s, h.dtype)
        hidden, new_cache, attentions = [], [], []
        for i, layer in enumerate(self.layers):
            hidden.append(h)
            h, layer_cache, probs = layer(h, bias, None if cache is None else cache[i], start)
            new_cache.append(layer_cache)
            attentions.append(probs)
        if c.do_layer_norm_before and not c._remove_final_layer_norm:
            h = self.final_layer_norm(h)
        hidden.append(h)
        return h, tuple(hidden), (tuple(new_cache) if cache is not None else None), tuple(attentions)


class OPTModel(nn.Module):
    config: Any

    def setup(self):
        self.decoder = OPTDecoder(self.config)


class OPTForCausalLM(nn.Module):
    """OPT trunk + ``lm_head`` (the word embedding when ``tie_word_embeddings``)."""

    config: Any

    def setup(self):
        self.model = OPTModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False)

    def embed(self, ids):
        return padded_lookup(self.model.decoder.embed_tokens, ids, self.config.pad_token_id)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.model.decoder.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, embeds, key_mask, start=0, cache=None, pad_position=-1):
        """Returns ``(logits, hidden_states, new_cache, attentions)``; ``hidden_states[-1]`` is the final hidden
        state, ``attentions`` one (B, H, s, L) map per layer (unused outputs cost nothing under jit)."""
        h, hidden, cache, attentions = self.model.decoder(embeds, key_mask, start, cache, pad_position)
        return self.logits(h), hidden, cache, attentions


def init_cache(config, rows: int, length: int, dtype):
    """Zeroed self-attention cache: one ``(keys, values)`` pair of (rows, length, heads, head_dim) per layer."""
    heads = config.num_attention_heads
    shape = (rows, length, heads, config.hidden_size // heads)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))
