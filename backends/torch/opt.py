"""OPT decoder-only language model (BLIP-2's OPT variants) in PyTorch.

Pre-LN (or post-LN for ``do_layer_norm_before=False``) decoder with learned absolute positions
that start at row 2 of the table and are counted from the cumulative attention mask, so left
padding does not shift the positions of real tokens. ``lm_head`` shares the word embeddings.
Attribute names reproduce the Hugging Face keys (``model.decoder.layers.0.self_attn.q_proj``).

The key/value cache is a tuple with one ``(key, value)`` pair per layer, each (B, heads, T, head_dim);
``reorder_cache`` picks rows for beam search.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from blip_core.blip2 import check_opt_position
from blip_core.configs import OPTConfig
from blip_core.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .layout import Linear, linear_act, project


def causal_bias(mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, q, T) bias: a query at absolute step ``T - q + i`` sees keys ``<=`` it that are not padding.

    ``mask`` is the (B, T) 0/1 mask over the past and current tokens. Masked entries hold the
    dtype's most negative value, as transformers does.
    """
    total = mask.shape[1]
    past = total - query_length
    q_pos = torch.arange(past, total, device=mask.device)[:, None]
    k_pos = torch.arange(total, device=mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (mask[:, None, None, :] != 0)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def reorder_cache(cache, index: torch.Tensor):
    """Select batch rows of every cached tensor (beam search bookkeeping)."""
    if cache is None:
        return None
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Position table with 2 leading rows that fairseq reserved; position p reads row p + 2."""

    offset = 2

    def __init__(self, num_positions: int, dim: int):
        super().__init__(num_positions + self.offset, dim)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids + self.offset)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.k_proj = Linear(d, d, bias=config.enable_bias)
        self.v_proj = Linear(d, d, bias=config.enable_bias)
        self.q_proj = Linear(d, d, bias=config.enable_bias)
        self.out_proj = Linear(d, d, bias=config.enable_bias)
        self.dropout = config.attention_dropout
        # one decoding product for the three (``layout.project``)
        self.fused_projections = ("q_proj", "k_proj", "v_proj")

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, bias, past=None):
        # OPT scales the query before the product (transformers keeps this order for exactness).
        q, k, v = project(self, hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = self._heads(q * self.scaling), self._heads(k), self._heads(v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        ctx = torch.matmul(F.dropout(probs, self.dropout, self.training), v)
        ctx = ctx.transpose(1, 2).reshape(hidden_states.shape)
        return self.out_proj(ctx), (k, v), probs


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d = config.hidden_size
        affine = config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine, bias=affine)
        self.fc1 = Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine, bias=affine)
        self.act_name = config.activation_function
        self.dropout = config.dropout

    def forward(self, h, bias, past=None):
        x = self.self_attn_layer_norm(h) if self.pre_norm else h
        x, present, probs = self.self_attn(x, bias, past)
        h = h + F.dropout(x, self.dropout, self.training)
        if not self.pre_norm:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if self.pre_norm else h
        h = h + F.dropout(self.fc2(linear_act(self.fc1, x, self.act_name)), self.dropout, self.training)
        if not self.pre_norm:
            h = self.final_layer_norm(h)
        return h, present, probs


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, e)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, d)
        self.project_out = Linear(d, e, bias=False) if e != d else None
        self.project_in = Linear(e, d, bias=False) if e != d else None
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            affine = config.layer_norm_elementwise_affine
            self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine, bias=affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList([OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                use_cache: bool = False, position_ids=None, output_hidden_states: bool = False,
                output_attentions: bool = False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, n = inputs_embeds.shape[:2]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + n, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (b, past_len + n):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(b, past_len + n)}, "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.long()
        if position_ids is None:
            # Count only real tokens: left padding leaves the first real token at position 0.
            position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1)[:, past_len:]
        check_opt_position(int(position_ids.max()), self.config.max_position_embeddings)
        x = inputs_embeds if self.project_in is None else self.project_in(inputs_embeds)
        h = x + self.embed_positions(position_ids).to(x.dtype)
        bias = causal_bias(attention_mask, n, h.dtype)

        presents = () if use_cache else None
        all_h = () if output_hidden_states else None
        all_a = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_h += (h,)
            h, present, probs = layer(h, bias, None if past_key_values is None else past_key_values[i])
            if use_cache:
                presents += (present,)
            if output_attentions:
                all_a += (probs,)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        if output_hidden_states:
            all_h += (h,)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=presents, hidden_states=all_h,
                                       attentions=all_a)


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, :-1] against labels[:, 1:], ignoring -100, mean, in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


class OPTForCausalLM(nn.Module):
    """OPT trunk + ``lm_head`` tied to ``model.decoder.embed_tokens`` (when ``tie_word_embeddings``).

    >>> out = lm(input_ids=ids, attention_mask=mask, use_cache=True)   # ids (B, T)
    >>> out.logits.shape   # (B, T, vocab); out.past_key_values feeds the next step
    """

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                use_cache: bool = False, position_ids=None, labels=None, output_hidden_states: bool = False,
                output_attentions: bool = False):
        out = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                 past_key_values=past_key_values, use_cache=use_cache, position_ids=position_ids,
                                 output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.lm_head(out.last_hidden_state)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    reorder_cache = staticmethod(reorder_cache)

    def decoding_parts(self) -> tuple:
        """The modules a decoding step runs (``layout.prepare_decoding`` prepares them): all of it."""
        return (self,)
