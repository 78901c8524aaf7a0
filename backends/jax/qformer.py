"""BLIP-2 Querying Transformer (Q-Former) in Flax linen, built from the BLIP text blocks of ``text.py``.

A post-LN BERT encoder over ``[queries | text]``: every layer self-attends over all positions (bidirectional,
-10000 additive padding bias); layers ``i % cross_attention_frequency == 0`` also let the first
``query_length`` positions cross-attend the image; query positions use their own feed-forward
(``intermediate_query`` / ``output_query``), text positions ``intermediate`` / ``output`` (present only with
``use_qformer_text_input``). Param paths are the weight table's (``encoder/layer_0/attention/attention/query``).

The module computes in the dtype it is given (``compute_dtype``): transformers keeps the Q-Former float32 inside
a float16 BLIP-2, so its inputs are cast on entry and its outputs come back float32.

Example::

    model = Blip2QFormerModel(Blip2QFormerConfig(), seed=0)
    out = model(query_embeds=np.zeros((1, 32, 768), np.float32), encoder_hidden_states=image_states)
    out.last_hidden_state.shape    # (1, 32, 768); pooler_output = last_hidden_state[:, 0]
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip_core.blip2 import keeps_float32
from blip_core.configs import Blip2QFormerConfig
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions
from blip_core.pretrained import hf_loading_kwargs

from ._base import JaxModel, as_input, mask_like, resolve_dtype
from .opt import padded_lookup
from .text import Attention, DenseLayerNorm, Embedding, Intermediate, cross_attention_bias, self_attention_bias
from .vision import LayerNorm


class QFormerLayer(nn.Module):
    """One Q-Former layer; returns ``(output, self-attention probs, cross-attention probs or None)``."""

    config: Any
    has_cross_attention: bool

    def setup(self):
        c = self.config
        self.attention = Attention(c, inner="attention")
        if self.has_cross_attention:
            self.crossattention = Attention(c, inner="attention")
        if c.use_qformer_text_input:
            self.intermediate = Intermediate(c)
            self.output = DenseLayerNorm(c.hidden_size, c.layer_norm_eps)
        self.intermediate_query = Intermediate(c)
        self.output_query = DenseLayerNorm(c.hidden_size, c.layer_norm_eps)

    def _text_ffn(self, x):
        if not self.config.use_qformer_text_input:
            raise ValueError("this Q-Former has no text feed-forward (config.use_qformer_text_input=False) and "
                             "was given text positions; text-only Q-Former passes need a retrieval checkpoint")
        return self.output(self.intermediate(x), x)

    def __call__(self, h, self_bias, context, cross_bias, query_length: int):
        attn, _, probs = self.attention(h, self_bias)
        if query_length == 0:
            return self._text_ffn(attn), probs, None
        queries, cross_probs = attn[:, :query_length], None
        if self.has_cross_attention:
            if context is None:
                raise ValueError("encoder_hidden_states must be given: this Q-Former layer cross-attends the image")
            queries, _, cross_probs = self.crossattention(queries, cross_bias, context=context)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attn.shape[1] > query_length:
            out = jnp.concatenate([out, self._text_ffn(attn[:, query_length:])], axis=1)
        return out, probs, cross_probs


class QFormerEncoder(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.layer = [QFormerLayer(c, i % c.cross_attention_frequency == 0) for i in range(c.num_hidden_layers)]


class QFormer(nn.Module):
    """``layernorm`` -> layers. ``__call__`` returns ``(last_hidden_state, hidden_states, attentions,
    cross_attentions)``; under jit the entries a caller drops cost nothing."""

    config: Any

    def setup(self):
        self.layernorm = LayerNorm(self.config.layer_norm_eps)
        self.encoder = QFormerEncoder(self.config)

    def __call__(self, embeds, mask=None, context=None, context_mask=None, query_length=None,
                 compute_dtype=jnp.float32):
        b, n, _ = embeds.shape
        query_length = n if query_length is None else query_length
        mask = jnp.ones((b, n), jnp.int32) if mask is None else mask
        self_bias = self_attention_bias(mask, False, compute_dtype)
        cross_bias = None
        if context is not None:
            context = context.astype(compute_dtype)
            cmask = jnp.ones(context.shape[:2], jnp.int32) if context_mask is None else context_mask
            cross_bias = cross_attention_bias(cmask, compute_dtype)
        h = self.layernorm(embeds.astype(compute_dtype))
        hidden, attentions, crosses = [h], [], []
        for layer in self.encoder.layer:
            h, probs, cross_probs = layer(h, self_bias, context, cross_bias, query_length)
            hidden.append(h)
            attentions.append(probs)
            if cross_probs is not None:
                crosses.append(cross_probs)
        return h, tuple(hidden), tuple(attentions), tuple(crosses)


class TextEmbeddings(nn.Module):
    """Q-Former word + absolute position embeddings (retrieval / text classes), queries in front, no LayerNorm
    (the Q-Former's own ``layernorm`` normalises what it receives)."""

    config: Any

    def setup(self):
        c = self.config
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)

    def __call__(self, input_ids, position_ids=None, query_embeds=None):
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
        emb = padded_lookup(self.word_embeddings, input_ids, self.config.pad_token_id) + \
            self.position_embeddings(position_ids)
        if query_embeds is not None:
            emb = jnp.concatenate([query_embeds.astype(emb.dtype), emb], axis=1)
        return emb


def qformer_inputs(config, query_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask,
                   query_length):
    """Validated ``(embeds, mask, context, context_mask, query_length)`` of a Q-Former call."""
    x = as_input(query_embeds, "query_embeds", "f", ndim=3)
    if x is None:
        raise ValueError("query_embeds are required")
    if x.shape[-1] != config.hidden_size:
        raise ValueError(f"query_embeds must be (batch, length, {config.hidden_size}), got {tuple(x.shape)}")
    b, n, _ = x.shape
    query_length = n if query_length is None else int(query_length)
    if not 0 <= query_length <= n:
        raise ValueError(f"query_length={query_length} is outside [0, {n}]")
    mask = mask_like(attention_mask, (b, n))
    context = context_mask = None
    if encoder_hidden_states is not None:
        context = as_input(encoder_hidden_states, "encoder_hidden_states", "f", ndim=3)
        if context.shape[0] != b or context.shape[-1] != config.encoder_hidden_size:
            raise ValueError(f"encoder_hidden_states must be ({b}, N, {config.encoder_hidden_size}), "
                             f"got {tuple(context.shape)}")
        if encoder_attention_mask is not None:
            context_mask = mask_like(encoder_attention_mask, context.shape[:2], "encoder_attention_mask")
    return jnp.asarray(x), mask, None if context is None else jnp.asarray(context), context_mask, query_length


# -- half precision shared by the BLIP-2 classes ------------------------------------------------------------
def blip2_dtype(dtype) -> np.dtype:
    """The backend's dtypes plus float16 (BLIP-2 follows transformers' float16 rule, see ``Blip2Weights``)."""
    if dtype is not None and (dtype if isinstance(dtype, str) else np.dtype(dtype).name) == "float16":
        return np.dtype(jnp.float16)
    return resolve_dtype(dtype)


class Blip2Weights(JaxModel):
    """Base of the BLIP-2 classes: float32, bfloat16 and float16, where a float16 model keeps the top-level
    params named in ``kept_float32`` (the Q-Former and the query tokens) float32, as transformers does."""

    kept_float32: tuple = ()

    def __init__(self, config, seed: int = 0, dtype=None):
        dt = blip2_dtype(dtype)
        super().__init__(config, seed=seed, dtype=None)
        self._cast_to(dt)

    def _cast_to(self, dt):
        keep = keeps_float32(np.dtype(dt).name)
        params = {k: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32 if keep and k in self.kept_float32
                                                               else dt), v) for k, v in self.params.items()}
        self._setup(self.config, params, dt)

    @property
    def qformer_dtype(self):
        return np.dtype(jnp.float32) if keeps_float32(self.dtype.name) else self.dtype

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, allow_pickle_bin: bool = False, device=None, strict: bool = True,
                        seed: int = 0, **hf_kwargs):
        """As ``JaxModel.from_pretrained`` (same keywords); every dtype loads straight into the final arrays, the
        float16 rule applied per tensor (the kept parameters are read as float32, never passing through float16)."""
        torch_dtype = hf_kwargs.pop("torch_dtype", None)
        dt = blip2_dtype(dtype if torch_dtype is None else hf_loading_kwargs(dtype, None, torch_dtype=torch_dtype)[0])
        direct = None if keeps_float32(dt.name) else dt
        if direct is None:     # the float16 rule per tensor while loading: no float32 copy of the whole model
            hf_kwargs["_leaf_dtype"] = lambda p: jnp.float32 if p[0] in cls.kept_float32 else dt
        model = super().from_pretrained(path, dtype=direct, allow_pickle_bin=allow_pickle_bin, device=device,
                                        strict=strict, seed=seed, **hf_kwargs)
        if direct is None:
            model._cast_to(dt)                      # (no copies: the per-tensor casts made every leaf's dtype)
        return model

    def astype(self, dtype):
        model = super().astype(None)
        model._cast_to(blip2_dtype(dtype))
        return model


class Blip2QFormerModel(Blip2Weights):
    """The Q-Former trunk alone: ``last_hidden_state`` (B, Q + L, H), ``pooler_output`` = position 0."""

    config_class = Blip2QFormerConfig

    def _module(self):
        return QFormer(self.config)

    def _forward(self, params, x, mask, context, context_mask, query_length):
        return self.module.apply({"params": params}, x, mask, context, context_mask, query_length, self.dtype)

    def __call__(self, query_embeds, query_length=None, attention_mask=None, head_mask=None,
                 encoder_hidden_states=None, encoder_attention_mask=None, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        x, mask, context, context_mask, q = qformer_inputs(self.config, query_embeds, attention_mask,
                                                           encoder_hidden_states, encoder_attention_mask,
                                                           query_length)
        fn = self._jit("forward", "_forward", ("query_length",))
        h, hidden, attentions, crosses = fn(self._params(params), x, mask, context, context_mask, query_length=q)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=h, pooler_output=h[:, 0], hidden_states=hidden if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
            cross_attentions=crosses if output_attentions else None)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs) -> dict:
        return {"qformer": self(**inputs).last_hidden_state}
