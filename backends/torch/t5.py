"""T5 / Flan-T5 encoder-decoder language model (BLIP-2's T5 variants) in PyTorch.

RMS layer norm without bias, unscaled attention with a bucketed relative position bias computed in
block 0 of each stack and shared by the other blocks, ReLU / GELU / gated-GELU feed-forward. The
output projection is tied to ``shared`` only when ``tie_word_embeddings`` (then the decoder output
is scaled by ``d_model ** -0.5`` first); Flan-T5 unties it and skips the scaling.

Attribute names reproduce the Hugging Face keys (``decoder.block.0.layer.1.EncDecAttention.k``).
The decoder cache is a tuple with one ``(self_k, self_v, cross_k, cross_v)`` per block.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from blip_core.configs import T5Config
from blip_core.outputs import BaseModelOutput, BaseModelOutputWithPast, Seq2SeqLMOutput

from ._base import activation
from .opt import causal_bias, reorder_cache
from .layout import Linear


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh-TensorFlow bucketing: exact buckets for short distances, log-spaced up to ``max_distance``."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only avoids log(0) in entries that the `where` below discards anyway
    large = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; the statistic is taken in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)
        self.dropout = config.dropout_rate

    def forward(self, x):
        x = F.dropout(self.act(self.wi(x)), self.dropout, self.training)
        return self.wo(x.to(self.wo.weight.dtype))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)
        self.dropout = config.dropout_rate

    def forward(self, x):
        x = F.dropout(self.act(self.wi_0(x)) * self.wi_1(x), self.dropout, self.training)
        return self.wo(x.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = (T5DenseGatedActDense if config.is_gated_act else T5DenseActDense)(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x):
        return x + F.dropout(self.DenseReluDense(self.layer_norm(x)), self.dropout, self.training)


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (folded into T5's initialisation)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False, is_decoder: bool = False):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_kv).transpose(1, 2)

    def compute_bias(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """(1, heads, q, k) bias for queries at absolute ``query_positions`` over keys 0..key_length-1."""
        memory = torch.arange(key_length, device=query_positions.device)[None, :]
        bucket = relative_position_bucket(memory - query_positions[:, None], not self.is_decoder,
                                          self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def project_kv(self, states):
        return self._heads(self.k(states)), self._heads(self.v(states))

    def forward(self, x, bias, kv):
        """``kv`` is the full (key, value) pair to attend; ``bias`` already holds position bias + mask."""
        q = self._heads(self.q(x))
        k, v = kv
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
        ctx = torch.matmul(F.dropout(probs, self.dropout, self.training), v)
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.o(ctx), probs


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, is_decoder)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, True)
        # the encoder states' keys/values are computed once per input, never per decoding step
        self.EncDecAttention.k.runs_once = self.EncDecAttention.v.runs_once = True
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


def _clamp_fp16(h):
    # transformers clamps float16 activations so an overflow does not turn into inf/NaN downstream.
    if h.dtype == torch.float16:
        top = torch.finfo(h.dtype).max
        top = torch.where(torch.isinf(h).any(), top - 1000, top)
        h = torch.clamp(h, min=-top, max=top)
    return h


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias, is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))
        self.dropout = config.dropout_rate

    def forward(self, h, self_bias, past=None, enc=None, cross_bias=None):
        sa = self.layer[0]
        x = sa.layer_norm(h)
        k, v = sa.SelfAttention.project_kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a, self_probs = sa.SelfAttention(x, self_bias, (k, v))
        h = _clamp_fp16(h + F.dropout(a, self.dropout, self.training))
        present, cross_probs = (k, v), None
        if self.is_decoder:
            ca = self.layer[1]
            ck, cv = past[2:] if past is not None else ca.EncDecAttention.project_kv(enc)
            a, cross_probs = ca.EncDecAttention(ca.layer_norm(h), cross_bias, (ck, cv))
            h = _clamp_fp16(h + F.dropout(a, self.dropout, self.training))
            present = (k, v, ck, cv)
        h = _clamp_fp16(self.layer[-1](h))
        return h, present, self_probs, cross_probs


def _padding_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(config, i == 0, is_decoder) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=False, output_hidden_states=False,
                output_attentions=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = h.shape[:2]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        total = past_len + n
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long, device=h.device)
        if attention_mask.shape != (b, total):
            raise ValueError(f"attention_mask must be {(b, total)}, got {tuple(attention_mask.shape)}")
        query_pos = torch.arange(past_len, total, device=h.device)
        pos_bias = self.block[0].layer[0].SelfAttention.compute_bias(query_pos, total)
        if self.is_decoder:
            mask_bias = causal_bias(attention_mask, n, h.dtype)
        else:
            mask_bias = _padding_bias(attention_mask, h.dtype)
        self_bias = pos_bias + mask_bias
        cross_bias = None
        if self.is_decoder:
            enc_mask = encoder_attention_mask
            if enc_mask is None:
                enc_mask = torch.ones(encoder_hidden_states.shape[:2] if encoder_hidden_states is not None
                                      else (b, past_key_values[0][2].shape[2]), dtype=torch.long, device=h.device)
            cross_bias = _padding_bias(enc_mask, h.dtype)

        h = F.dropout(h, self.dropout, self.training)
        presents = () if use_cache else None
        all_h = () if output_hidden_states else None
        all_a = () if output_attentions else None
        all_c = () if output_attentions and self.is_decoder else None
        for i, block in enumerate(self.block):
            if output_hidden_states:
                all_h += (h,)
            past = None if past_key_values is None else past_key_values[i]
            h, present, sp, cp = block(h, self_bias, past, encoder_hidden_states, cross_bias)
            if use_cache:
                presents += (present,)
            if output_attentions:
                all_a += (sp,)
                if cp is not None:
                    all_c += (cp,)
        h = F.dropout(self.final_layer_norm(h), self.dropout, self.training)
        if output_hidden_states:
            all_h += (h,)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=presents, hidden_states=all_h,
                                       attentions=all_a), all_c


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder + decoder + LM head.

    >>> enc = t5.encode(inputs_embeds=x, attention_mask=m)               # x (B, L, d_model)
    >>> out = t5(encoder_outputs=enc, attention_mask=m, decoder_input_ids=start, use_cache=True)
    >>> out.logits.shape   # (B, T_dec, vocab)
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id must be set to build decoder inputs from labels")
        shifted = torch.full_like(labels, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False,
               output_attentions=False) -> BaseModelOutput:
        out, _ = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                               attentions=out.attentions)

    def decoding_parts(self) -> tuple:
        """The modules a decoding step runs (``layout.prepare_decoding`` prepares them): the decoder and the LM
        head, not the encoder, which runs once per input."""
        return (self.decoder, self.lm_head)

    def decode_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            # With a shared matrix the decoder output is rescaled first (Mesh TensorFlow convention).
            hidden = hidden * (self.config.d_model ** -0.5)
        return self.lm_head(hidden)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, encoder_outputs=None,
                past_key_values=None, use_cache: bool = False, labels=None, output_hidden_states: bool = False,
                output_attentions: bool = False):
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, output_hidden_states,
                                          output_attentions)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.shift_right(labels)
        dec, cross = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                  inputs_embeds=decoder_inputs_embeds,
                                  encoder_hidden_states=encoder_outputs.last_hidden_state,
                                  encoder_attention_mask=attention_mask, past_key_values=past_key_values,
                                  use_cache=use_cache, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = self.decode_logits(dec.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, past_key_values=dec.past_key_values,
                               decoder_hidden_states=dec.hidden_states, decoder_attentions=dec.attentions,
                               cross_attentions=cross,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state,
                               encoder_hidden_states=encoder_outputs.hidden_states,
                               encoder_attentions=encoder_outputs.attentions)

    reorder_cache = staticmethod(reorder_cache)
