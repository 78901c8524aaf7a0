"""BLIP-2 Querying Transformer (Q-Former) in PyTorch.

A post-LN BERT encoder over ``[queries | text]`` whose query positions also cross-attend the image
(in layers ``i % cross_attention_frequency == 0``) and run through their own feed-forward
(``intermediate_query`` / ``output_query``). Module attribute names reproduce the Hugging Face
state-dict keys (``encoder.layer.3.crossattention.attention.key.weight``, ...).

Shapes: ``query_embeds`` (B, Q + L, H) with the ``query_length`` = Q first positions being queries;
``encoder_hidden_states`` (B, N, D_vision). The module runs in the dtype of its own parameters
(transformers keeps it float32 inside a float16 BLIP-2), casting its inputs on entry.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from blip_core.configs import Blip2QFormerConfig
from blip_core.numerics import MASK_VALUE
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ._base import PreTrainedModel, as_tensor
from .layout import Linear, linear_act


def self_attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) or (B, L, L) 1/0 mask -> additive (B, 1, [1|L], L) bias with -10000 at masked keys."""
    mask = _broadcastable(mask)
    return (1.0 - mask.to(dtype)) * MASK_VALUE


def cross_attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Encoder padding mask -> additive bias using the dtype's most negative value."""
    mask = _broadcastable(mask)
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def _broadcastable(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 3:
        return mask[:, None, :, :]
    if mask.dim() == 2:
        return mask[:, None, None, :]
    raise ValueError(f"attention mask must be 2-D (batch, length) or 3-D (batch, from, to), got shape "
                     f"{tuple(mask.shape)}")


class Blip2QFormerMultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate query/key/value projections (BERT style)."""

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(kv_in, config.hidden_size)
        self.value = Linear(kv_in, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_bias=None, encoder_hidden_states=None):
        kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(kv))
        v = self._heads(self.value(kv))
        # transformers divides the scores (not the query) by sqrt(head_dim); keep that order.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if attention_bias is not None:
            scores = scores + attention_bias
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(F.dropout(probs, self.dropout, self.training), v)
        ctx = ctx.transpose(1, 2).reshape(hidden_states.shape[0], -1, self.num_heads * self.head_dim)
        return ctx, probs


class Blip2QFormerSelfOutput(nn.Module):
    """Output projection + residual + post-LayerNorm of an attention block."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(F.dropout(self.dense(hidden_states), self.dropout, self.training) + input_tensor)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerSelfOutput(config)

    def forward(self, hidden_states, attention_bias=None, encoder_hidden_states=None):
        ctx, probs = self.attention(hidden_states, attention_bias, encoder_hidden_states)
        return self.output(ctx, hidden_states), probs


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act_name = config.hidden_act

    def forward(self, hidden_states):
        return linear_act(self.dense, hidden_states, self.act_name)


class Blip2QFormerOutput(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(F.dropout(self.dense(hidden_states), self.dropout, self.training) + input_tensor)


class Blip2QFormerLayer(nn.Module):
    """Self-attention over all tokens; cross-attention and the query FFN on the first Q positions."""

    def __init__(self, config: Blip2QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        if config.use_qformer_text_input:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config)

    def _text_ffn(self, x):
        if not hasattr(self, "intermediate"):
            raise ValueError("this Q-Former has no text feed-forward (config.use_qformer_text_input=False) and "
                             "was given text positions; text-only Q-Former passes need a retrieval checkpoint")
        return self.output(self.intermediate(x), x)

    def forward(self, hidden_states, self_bias, encoder_hidden_states, cross_bias, query_length):
        attn, self_probs = self.attention(hidden_states, self_bias)
        cross_probs = None
        if query_length == 0:
            return self._text_ffn(attn), self_probs, cross_probs
        queries = attn[:, :query_length]
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states must be given: this Q-Former layer cross-attends the image")
            queries, cross_probs = self.crossattention(queries, cross_bias, encoder_hidden_states)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attn.shape[1] > query_length:
            out = torch.cat([out, self._text_ffn(attn[:, query_length:])], dim=1)
        return out, self_probs, cross_probs


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class Blip2TextEmbeddings(nn.Module):
    """Q-Former word + absolute position embeddings (retrieval / text classes); queries go in front.

    No LayerNorm here: the Q-Former's own ``layernorm`` normalises whatever it receives.
    """

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids=None, position_ids=None, query_embeds=None):
        if input_ids is None:
            return query_embeds
        n = input_ids.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(f"input_ids has {n} tokens but the Q-Former has only "
                             f"{self.position_embeddings.num_embeddings} positions")
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)[None]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if query_embeds is not None:
            emb = torch.cat([query_embeds.to(emb.dtype), emb], dim=1)
        return emb


class Blip2QFormerModel(PreTrainedModel):
    """The Q-Former trunk: ``layernorm`` -> layers. No embeddings of its own.

    >>> out = qformer(query_embeds=queries, encoder_hidden_states=image_states)   # queries (B, Q, H)
    >>> out.last_hidden_state.shape   # (B, Q, H); pooler_output = last_hidden_state[:, 0]
    """

    architecture = "Blip2QFormerModel"

    def __init__(self, config: Blip2QFormerConfig, seed=0, dtype=None):
        super().__init__(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(config)
        self.post_init(seed, dtype)

    def forward(self, query_embeds, query_length: Optional[int] = None, attention_mask=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True):
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        dtype = self.layernorm.weight.dtype
        device = self.layernorm.weight.device
        x = as_tensor(query_embeds, "query_embeds", kind="float", device=device, ndim=3).to(dtype)
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"query_embeds must be (batch, length, {self.config.hidden_size}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        query_length = n if query_length is None else int(query_length)
        if not 0 <= query_length <= n:
            raise ValueError(f"query_length={query_length} is outside [0, {n}]")
        mask = (torch.ones(b, n, device=device) if attention_mask is None
                else as_tensor(attention_mask, "attention_mask", kind="mask", device=device, ndim=(2, 3)))
        if mask.shape[0] != b or mask.shape[-1] != n:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match query_embeds {(b, n)}")
        self_bias = self_attention_bias(mask, dtype)

        enc, cross_bias = None, None
        if encoder_hidden_states is not None:
            enc = as_tensor(encoder_hidden_states, "encoder_hidden_states", kind="float", device=device,
                            ndim=3).to(dtype)
            if enc.shape[0] != b or enc.shape[-1] != self.config.encoder_hidden_size:
                raise ValueError(f"encoder_hidden_states must be ({b}, N, {self.config.encoder_hidden_size}), "
                                 f"got {tuple(enc.shape)}")
            enc_mask = (torch.ones(enc.shape[:2], device=device) if encoder_attention_mask is None
                        else as_tensor(encoder_attention_mask, "encoder_attention_mask", kind="mask", device=device,
                                       ndim=(2, 3)))
            cross_bias = cross_attention_bias(enc_mask, dtype)

        h = F.dropout(self.layernorm(x), self.config.hidden_dropout_prob, self.training)
        all_h = (h,) if output_hidden_states else None
        self_attn = () if output_attentions else None
        cross_attn = () if output_attentions else None
        for layer in self.encoder.layer:
            h, sp, cp = layer(h, self_bias, enc, cross_bias, query_length)
            if output_hidden_states:
                all_h += (h,)
            if output_attentions:
                self_attn += (sp,)
                if cp is not None:
                    cross_attn += (cp,)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=h, pooler_output=h[:, 0], hidden_states=all_h, attentions=self_attn,
            cross_attentions=cross_attn)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs) -> dict:
        out = self.forward(**inputs)
        return {"qformer": out.last_hidden_state}
