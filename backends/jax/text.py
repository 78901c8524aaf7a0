"""BLIP text tower in Flax linen: post-LN BERT with optional cross-attention, pooler and tied LM head.

Attention works on explicit arrays so the same modules serve the plain forward and the compiled decoder:
a self-attention cache is a ``(keys, values)`` pair of fixed shape (``init_cache``) written in place with
``dynamic_update_slice`` at ``index``; cross-attention keys/values can be computed once
(``TextModel.cross_kv``) and passed back in every step. Keys are kept heads-first and transposed
(B, H, hd, L) and values heads-first (B, H, L, hd): the layouts XLA's CPU dot reads as they are, so a
decoding step reads its cache and the image keys/values without copying them into another layout
(in the (B, L, H, hd) layout of the projections, every step transposed all 24 of them). Masks arrive as additive biases (-10000 where
blocked, as transformers does); the cross-attention mask is applied (transformers 4.57 PyTorch drops it).

Example::

    model = BlipTextModel(BlipTextConfig(is_decoder=False), seed=0)
    out = model(input_ids=np.array([[101, 2023, 102]]))
    out.last_hidden_state.shape, out.pooler_output.shape    # (1, 3, 768), (1, 768)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip_core.configs import BlipTextConfig
from blip_core.numerics import MASK_VALUE
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ._base import JaxModel, activation, as_input, mask_like, softmax, token_ids
from .vision import LayerNorm


# -- masks ---------------------------------------------------------------------------------------------
def self_attention_bias(mask, causal: bool, dtype):
    """(B, T) 0/1 mask -> additive bias (B, 1, T|1, T); ``causal`` adds the lower-triangular rule."""
    m = mask.astype(dtype)
    if causal:
        t = mask.shape[1]
        tri = jnp.tril(jnp.ones((t, t), dtype))
        ext = tri[None, None] * m[:, None, None, :]
    else:
        ext = m[:, None, None, :]
    return (1.0 - ext) * MASK_VALUE


def cross_attention_bias(mask, dtype):
    """(B, S) 0/1 mask over the cross-attended states -> additive bias (B, 1, 1, S)."""
    return (1.0 - mask.astype(dtype)[:, None, None, :]) * MASK_VALUE


def decoder_bias(key_mask, index, length: int, dtype):
    """Additive bias (N, 1, s, T) for ``length`` queries written at ``index..index+s`` of a fixed
    buffer: each attends to the real keys at or before its own slot."""
    slots = jnp.arange(key_mask.shape[1])[None, :] <= index + jnp.arange(length)[:, None]       # (s, T)
    allowed = slots[None] & (key_mask > 0)[:, None, :]
    return ((1.0 - allowed.astype(dtype)) * MASK_VALUE)[:, None]


# -- modules -------------------------------------------------------------------------------------------
class Embedding(nn.Module):
    """An embedding table (param ``embedding``) that can also act as a tied output projection."""

    num: int
    dim: int

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.02), (self.num, self.dim))

    def __call__(self, ids):
        # Values of traced ids (a caller's jax.jit) cannot be checked on the host; jnp.take would read
        # -1 as the last row. Any id outside the table gives a NaN row instead, never a real one.
        rows = jnp.take(self.embedding, jnp.clip(ids, 0, self.num - 1), axis=0)
        return jnp.where(((ids >= 0) & (ids < self.num))[..., None], rows, jnp.nan)

    def attend(self, x):
        """``x @ embedding.T``, computed as ``embedding @ x.T`` and transposed back: the table is the product's
        left operand in its stored layout, so XLA does not copy the whole (V, D) table into a transposed
        layout, which its CPU matrix-vector product did on every decoding step."""
        rows = x.reshape(-1, x.shape[-1])
        out = jax.lax.dot_general(self.embedding.astype(x.dtype), rows, (((1,), (1,)), ((), ())))
        return out.T.reshape(x.shape[:-1] + (self.num,))


class TextEmbeddings(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = LayerNorm(c.layer_norm_eps)

    def __call__(self, input_ids, position_ids, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return self.LayerNorm(x + self.position_embeddings(position_ids).astype(x.dtype))


class SelfAttention(nn.Module):
    """query/key/value projections; keys and values from ``hidden`` (self) or given ``kv`` (cross)."""

    config: Any

    def setup(self):
        d = self.config.hidden_size
        self.query, self.key, self.value = nn.Dense(d), nn.Dense(d), nn.Dense(d)

    def _split(self, x):
        heads = self.config.num_attention_heads
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)

    def project_kv(self, states):
        """Keys (B, H, hd, S) and values (B, H, S, hd) of ``states`` (B, S, D), in the module's layouts."""
        return (self._split(self.key(states)).transpose(0, 2, 3, 1),
                self._split(self.value(states)).transpose(0, 2, 1, 3))

    def __call__(self, hidden, bias, kv=None, cache=None, index=None):
        b, t, d = hidden.shape
        q = self._split(self.query(hidden))
        if kv is None:
            kv = self.project_kv(hidden)
            if cache is not None:   # write this chunk into the fixed-size cache and attend over all of it
                kv = tuple(jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=axis)
                           for c, new, axis in zip(cache, kv, (3, 2)))
                cache = kv
        k, v = kv
        group = b // k.shape[0] if k.shape[0] else 1   # decoding: an input's beams share its cross keys/values
        if group != 1:
            q = q.reshape((k.shape[0], group * t) + q.shape[2:])
        scores = jnp.einsum("bqhd,bhdk->bhqk", q, k) / math.sqrt(d // self.config.num_attention_heads)
        if bias is not None:
            scores = scores + bias.astype(scores.dtype)
        probs = softmax(scores)      # (B, heads, T, S); unused probs are dropped by XLA under jit
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)   # heads-first: see vision.py
        return ctx.reshape(b, t, d), cache, probs


class DenseLayerNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(x) + residual)."""

    features: int
    eps: float

    def setup(self):
        self.dense = nn.Dense(self.features)
        self.LayerNorm = LayerNorm(self.eps)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    """Attention projections + ``output`` block. ``inner`` names the projections' submodule: ``self`` in the BLIP
    text model, ``attention`` in the BLIP-2 Q-Former (the Hugging Face keys differ only there)."""

    config: Any
    inner: str = "self"

    def setup(self):
        setattr(self, self.inner, SelfAttention(self.config))
        self.output = DenseLayerNorm(self.config.hidden_size, self.config.layer_norm_eps)

    @property
    def core(self) -> SelfAttention:
        return getattr(self, self.inner)

    def __call__(self, hidden, bias, context=None, kv=None, cache=None, index=None):
        if kv is None and context is not None:
            kv = self.core.project_kv(context)
        ctx, cache, probs = self.core(hidden, bias, kv=kv, cache=cache, index=index)
        return self.output(ctx, hidden), cache, probs


class Intermediate(nn.Module):
    config: Any

    def setup(self):
        self.dense = nn.Dense(self.config.intermediate_size)

    def __call__(self, x):
        return activation(self.config.hidden_act)(self.dense(x))


class TextLayer(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.attention = Attention(c)
        if c.is_decoder:
            self.crossattention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLayerNorm(c.hidden_size, c.layer_norm_eps)

    def __call__(self, h, self_bias, context=None, cross_bias=None, cross_kv=None, cache=None, index=None):
        """Returns ``(output, new_cache, self-attention probs, cross-attention probs or None)``."""
        h, cache, probs = self.attention(h, self_bias, cache=cache, index=index)
        cross_probs = None
        if context is not None or cross_kv is not None:
            h, _, cross_probs = self.crossattention(h, cross_bias, context=context, kv=cross_kv)
        return self.output(self.intermediate(h), h), cache, probs, cross_probs


class TextEncoder(nn.Module):
    config: Any

    def setup(self):
        self.layer = [TextLayer(self.config) for _ in range(self.config.num_hidden_layers)]


class Pooler(nn.Module):
    config: Any

    def setup(self):
        self.dense = nn.Dense(self.config.hidden_size)

    def __call__(self, h):
        return jnp.tanh(self.dense(h[:, 0]))


class TextModel(nn.Module):
    """``BlipTextModel``: returns ``(last_hidden_state, pooler_output or None, new_cache or None)``."""

    config: Any
    add_pooling_layer: bool = True

    def setup(self):
        self.embeddings = TextEmbeddings(self.config)
        self.encoder = TextEncoder(self.config)
        if self.add_pooling_layer:
            self.pooler = Pooler(self.config)

    def cross_kv(self, context):
        """Per-layer cross-attention (keys, values) of ``context``, computed once for decoding."""
        return tuple(layer.crossattention.core.project_kv(context) for layer in self.encoder.layer)

    def __call__(self, input_ids, position_ids, self_bias, context=None, cross_bias=None, cross_kv=None,
                 cache=None, index=None, inputs_embeds=None, encoder_embeds=None):
        return self.full(input_ids, position_ids, self_bias, context, cross_bias, cross_kv, cache, index,
                         inputs_embeds, encoder_embeds)[:3]

    def full(self, input_ids, position_ids, self_bias, context=None, cross_bias=None, cross_kv=None,
             cache=None, index=None, inputs_embeds=None, encoder_embeds=None):
        """``(last, pooled, new_cache, hidden_states, attentions, cross_attentions)``: hidden_states are the
        embeddings output and every layer's output; cross_attentions is None without cross-attention input.
        ``encoder_embeds`` go to the first layer as they are (no embedding layer). Under jit the entries a
        caller drops cost nothing."""
        h = encoder_embeds if encoder_embeds is not None else self.embeddings(input_ids, position_ids, inputs_embeds)
        new_cache = [] if cache is not None else None
        hidden, attentions, crosses = [h], [], []
        for i, layer in enumerate(self.encoder.layer):
            h, c, probs, cross_probs = layer(h, self_bias, context=context, cross_bias=cross_bias,
                                             cross_kv=None if cross_kv is None else cross_kv[i],
                                             cache=None if cache is None else cache[i], index=index)
            if new_cache is not None:
                new_cache.append(c)
            hidden.append(h)
            attentions.append(probs)
            crosses.append(cross_probs)
        pooled = self.pooler(h) if self.add_pooling_layer else None
        cross = tuple(crosses) if context is not None or cross_kv is not None else None
        return (h, pooled, (tuple(new_cache) if new_cache is not None else None), tuple(hidden),
                tuple(attentions), cross)


class PredictionHeadTransform(nn.Module):
    config: Any

    def setup(self):
        self.dense = nn.Dense(self.config.hidden_size)
        self.LayerNorm = LayerNorm(self.config.layer_norm_eps)

    def __call__(self, h):
        return self.LayerNorm(activation(self.config.hidden_act)(self.dense(h)))


class Predictions(nn.Module):
    config: Any

    def setup(self):
        self.transform = PredictionHeadTransform(self.config)
        self.bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,))


class OnlyMLMHead(nn.Module):
    config: Any

    def setup(self):
        self.predictions = Predictions(self.config)


class TextLMHeadModel(nn.Module):
    """``BlipTextLMHeadModel``: ``bert`` (no pooler) + ``cls`` head whose decoder is the word embedding."""

    config: Any

    def setup(self):
        self.bert = TextModel(self.config, add_pooling_layer=False)
        self.cls = OnlyMLMHead(self.config)

    def cross_kv(self, context):
        return self.bert.cross_kv(context)

    def __call__(self, input_ids, position_ids, self_bias, context=None, cross_bias=None, cross_kv=None,
                 cache=None, index=None):
        """Returns ``(logits, last_hidden_state, new_cache)``."""
        h, _, cache = self.bert(input_ids, position_ids, self_bias, context=context, cross_bias=cross_bias,
                                cross_kv=cross_kv, cache=cache, index=index)
        pred = self.cls.predictions
        logits = self.bert.embeddings.word_embeddings.attend(pred.transform(h)) + pred.bias.astype(h.dtype)
        return logits, h, cache


def init_cache(config, rows: int, length: int, dtype):
    """Zeroed self-attention cache of a ``length``-slot buffer: per layer, keys (rows, H, hd, length) and
    values (rows, H, length, hd), the layouts ``SelfAttention`` writes and reads."""
    heads = config.num_attention_heads
    hd = config.hidden_size // heads
    return tuple((jnp.zeros((rows, heads, hd, length), dtype), jnp.zeros((rows, heads, length, hd), dtype))
                 for _ in range(config.num_hidden_layers))


# -- functional entry points used by the public classes ------------------------------------------------
def encode_text(module, ids, mask, causal: bool, context=None, context_mask=None, position_ids=None,
                inputs_embeds=None, dtype=jnp.float32, full: bool = False, encoder_embeds=None):
    """Run a ``TextModel`` / ``TextLMHeadModel`` over a full sequence (no cache).

    ``full=True`` (``TextModel`` only) returns ``TextModel.full``'s six entries instead of three."""
    b, t = mask.shape
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bias = self_attention_bias(mask, causal, dtype)
    cross = None
    if context is not None:
        cmask = jnp.ones(context.shape[:2], jnp.int32) if context_mask is None else context_mask
        cross = cross_attention_bias(cmask, dtype)
    fn = module.full if full else module
    if encoder_embeds is not None:
        return fn(ids, position_ids, bias, context=context, cross_bias=cross, encoder_embeds=encoder_embeds)
    if inputs_embeds is not None:
        return fn(ids, position_ids, bias, context=context, cross_bias=cross, inputs_embeds=inputs_embeds)
    return fn(ids, position_ids, bias, context=context, cross_bias=cross)


def lm_loss(logits, labels, label_smoothing: float = 0.0):
    """Next-token cross entropy: logits[:, :-1] vs labels[:, 1:], ignore -100, label smoothing, mean.

    Matches torch's ``CrossEntropyLoss(label_smoothing=eps)``: (1-eps)*nll + eps*mean_over_vocab(-logp),
    averaged over the non-ignored positions.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = labels[:, 1:]
    valid = target != -100
    safe = jnp.where(valid, target, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    per_token = nll
    if label_smoothing:
        per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    count = jnp.sum(valid).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / count


def text_inputs(config, input_ids, attention_mask, inputs_embeds=None):
    """Validated (ids, mask); exactly one of ids / inputs_embeds."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        ids = token_ids(input_ids, "input_ids", config.vocab_size, config.max_position_embeddings)
        shape = ids.shape
    else:
        emb = as_input(inputs_embeds, "inputs_embeds", "f", ndim=3)
        shape = emb.shape[:2]
        ids = np.zeros(shape, np.int32)
    return ids, mask_like(attention_mask, shape)


class BlipTextModel(JaxModel):
    """BERT-style text tower (with pooler). ``is_decoder=True`` makes self-attention causal."""

    config_class = BlipTextConfig

    def _module(self):
        return TextModel(self.config, add_pooling_layer=True)

    def _forward(self, params, ids, mask, position_ids, embeds, context, context_mask, causal,
                 output_hidden_states=False, output_attentions=False, encoder_embeds=None):
        h, pooled, _, hidden, attentions, cross = self.module.apply(
            {"params": params}, ids, mask, causal, context, context_mask, position_ids, embeds, self.dtype, True,
            encoder_embeds, method=encode_text)
        if not output_attentions:
            attentions = cross = None
        return h, pooled, hidden if output_hidden_states else None, attentions, cross

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                 encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                 use_cache=None, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = True, is_decoder: bool = False, params=None):
        """transformers' ``BlipTextModel`` arguments. ``encoder_embeds`` skip the embedding layer. No cache is
        kept or returned (``use_cache`` is accepted and has no effect): ``generate`` decodes with its own."""
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        if past_key_values is not None:
            raise NotImplementedError("past_key_values are not supported by the JAX BlipTextModel; decode with "
                                      "generate(), which keeps its own cache")
        if encoder_embeds is not None:
            encoder_embeds = as_input(encoder_embeds, "encoder_embeds", "f", ndim=3)
        shape_source = encoder_embeds if input_ids is None and inputs_embeds is None else inputs_embeds
        ids, mask = text_inputs(self.config, input_ids, attention_mask, shape_source)
        if position_ids is not None:
            position_ids = token_ids(position_ids, "position_ids", self.config.max_position_embeddings)
            if tuple(position_ids.shape) != tuple(ids.shape):
                raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match {tuple(ids.shape)}")
        embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds).astype(self.dtype)
        if encoder_embeds is not None:
            encoder_embeds = jnp.asarray(encoder_embeds).astype(self.dtype)
        context = context_mask = None
        if encoder_hidden_states is not None:
            if not self.config.is_decoder:
                raise ValueError("encoder_hidden_states given but the config has no cross-attention (is_decoder=False)")
            context = jnp.asarray(as_input(encoder_hidden_states, "encoder_hidden_states", "f", 3)).astype(self.dtype)
            if encoder_attention_mask is not None:
                context_mask = mask_like(encoder_attention_mask, context.shape[:2], "encoder_attention_mask")
        fn = self._jit("forward", "_forward", ("causal", "output_hidden_states", "output_attentions"))
        h, pooled, hidden, attentions, cross = fn(
            self._params(params), ids, mask, position_ids, embeds, context, context_mask, causal=bool(is_decoder),
            output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions),
            encoder_embeds=encoder_embeds)
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=pooled,
                                                         hidden_states=hidden, attentions=attentions,
                                                         cross_attentions=cross)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs) -> dict:
        return {"text": self(**inputs).last_hidden_state}
