"""BLIP's BERT-style text tower: encoder, causal decoder with cross-attention, LM head, KV cache.

Module names reproduce the Hugging Face keys (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query``, ``...crossattention...``, ``cls.predictions.*``).
Post-LN layers: self-attention, cross-attention to ``encoder_hidden_states`` (layers have it when
``config.is_decoder``; it runs only when states are given), then the FFN. Padding masks are
additive ``-10000``; the causal mask is used only with the forward argument ``is_decoder=True``.

Difference from transformers 4.57: the cross-attention mask (``encoder_attention_mask``) is
applied. transformers drops it, which only matters when the cross-attended sequence is padded
(the VQA answer decoder over a padded question).

``TextCache`` holds each layer's self-attention keys/values (grown per step) and the
cross-attention keys/values (computed once, on the first call, and reused).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.numerics import MASK_VALUE
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions, CausalLMOutputWithCrossAttentions

from ._base import (INT8_BAGS, ImageKV, PreTrainedModel, as_tensor, attention, fits_one_query_attention,
                    image_rows8, one_query_attention, repeated_rows)
from .layout import Linear, linear_act, prepare_decoding, project


def _select_runs(kv: ImageKV, runs: torch.Tensor) -> ImageKV:
    """Image keys/values ``kv`` of the rows ``runs`` (the keys stay a transposed view of contiguous rows; an int8
    model's 8-bit tables are made again for them)."""
    k = kv[0].transpose(-1, -2).index_select(0, runs).transpose(-1, -2)
    v = kv[1].index_select(0, runs)
    return ImageKV(k, v, None if kv.rows8 is None else image_rows8(k, v))


class TextCache:
    """Per-layer ``(k, v)``: ``self_kv`` (N, H, T, hd) grows, ``cross_kv`` is fixed, one row per run of
    ``cross_repeats`` equal rows of the cross-attended states (beam search's beams of one image share it).

    Self-attention keys/values are written in place into per-layer buffers with room for more
    positions (``self_kv[i]`` are views of their first ``length`` positions); a full buffer is
    replaced by one of twice the size, so a step copies only its new token's keys/values instead of
    concatenating the whole cache. Cross-attention keys/values are stored contiguous, and in float32
    for a float16 model on the CPU (see ``BlipTextSelfAttention.cross_kv``).
    """

    MIN_ROOM = 32   # positions a new buffer holds at least

    def __init__(self, num_layers: int):
        self.self_kv = [None] * num_layers
        self.cross_kv = [None] * num_layers
        self.cross_repeats = None     # ``repeated_rows`` of the cross-attended states, found once for every layer
        self._buffers = [None] * num_layers

    def _rows(self, g: int) -> int:
        """The rows the cache holds (its self-attention buffers', else ``g`` per cross row)."""
        buf = next((b for b in self._buffers if b is not None), None)
        if buf is not None:
            return buf[0].shape[0]
        return g * next((kv[0].shape[0] for kv in self.cross_kv if kv is not None), 0)

    @property
    def length(self) -> int:
        kv = self.self_kv[0]
        return 0 if kv is None else kv[0].shape[2]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Layer ``i``'s keys/values extended by ``k``, ``v`` (N, H, t, hd); returns the views to attend to."""
        past = self.self_kv[i]
        start = 0 if past is None else past[0].shape[2]
        end = start + k.shape[2]
        buf = self._buffers[i]
        if past is None or buf[0].shape[2] < end:     # a layer's first call, or its buffer is full
            room = max(end, 2 * start, self.MIN_ROOM)
            new = tuple(k.new_empty(k.shape[:2] + (room,) + k.shape[3:]) for _ in range(2))
            if past is not None:
                new[0][:, :, :start].copy_(past[0])
                new[1][:, :, :start].copy_(past[1])
            buf = self._buffers[i] = new
        buf[0][:, :, start:end].copy_(k)
        buf[1][:, :, start:end].copy_(v)
        self.self_kv[i] = (buf[0][:, :, :end], buf[1][:, :, :end])
        return self.self_kv[i]

    def reorder(self, idx: torch.Tensor) -> "TextCache":
        """The cache of rows ``idx``. Beam search reorders each input's beams among themselves: the cross
        keys/values (one row per run of ``cross_repeats`` equal rows) stay as they are. Any other selection (rows
        moved between runs, dropped or added) gives each new row its run's keys/values, one row each."""
        g = self.cross_repeats or 1
        runs = idx // g
        if not torch.equal(runs, torch.arange(self._rows(g), device=idx.device) // g):
            self.cross_kv = [None if kv is None else _select_runs(kv, runs) for kv in self.cross_kv]
            self.cross_repeats = 1
        # ``self_kv[i]`` is only ever set by ``append``, so a layer with keys/values has a buffer.
        for i, buf in enumerate(self._buffers):
            if buf is not None:
                end = self.self_kv[i][0].shape[2]
                buf = self._buffers[i] = (buf[0].index_select(0, idx), buf[1].index_select(0, idx))
                self.self_kv[i] = (buf[0][:, :, :end], buf[1][:, :, :end])
        return self


def check_ids(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """A clear error for token ids outside the vocabulary (instead of an index error in the embedding)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary of size {vocab_size}")


class BlipTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None   # no gradient to the pad row
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        x = inputs_embeds + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BlipTextSelfAttention(nn.Module):
    def __init__(self, config, is_cross_attention: bool):
        super().__init__()
        d = config.hidden_size
        kv_dim = config.encoder_hidden_size if is_cross_attention else d
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.query = Linear(d, d)
        self.key = Linear(kv_dim, d)
        self.value = Linear(kv_dim, d)
        # the image's keys/values are computed once per input, never per decoding step
        self.key.runs_once = self.value.runs_once = is_cross_attention
        # a self-attention's three projections read the same input: one decoding product (``layout.project``)
        self.fused_projections = () if is_cross_attention else ("query", "key", "value")
        self.dropout = float(config.attention_probs_dropout_prob)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def cross_kv(self, states, repeats: Optional[int] = None):
        """The image's keys/values for a cache, one row per run of ``repeats`` equal rows of ``states`` (beam
        search's beams of one image share one copy): (N / repeats, H, S, hd), the keys a transposed view of
        contiguous (N / repeats, H, hd, S) keys and the values contiguous, the layouts ``one_query_attention``
        reads every step. float32 and bfloat16 stay in their dtype (``one_query_attention`` reads both: bfloat16
        as the model's other products, float32 sums rounded once); a float16 model's are up-cast to float32 on the
        CPU (exactly), where torch's fused attention of one query row over float16 keys runs 5-8x slower.
        Until stop 30 bfloat16 was up-cast too: its decoding steps attended in float32, 5% slower per
        token (BLIP base) and 100% against 99.5% of held-out captions equal to float32's (bundled
        captioner, 200 images). An int8 model (``quantize.Int8Linear`` projections) also gets their 8-bit row-wise
        tables (``ImageKV.rows8``), which its one-row decoding steps read. ``repeats``: ``repeated_rows(states)``
        where the caller has it (a cache finds it once for all its layers)."""
        g = repeated_rows(states) if repeats is None else repeats
        # one row per run, copied contiguous (oneDNN's product takes no strided rows; 8 BLIP-base images 29 -> 26 ms
        # a product)
        src = states[::g].contiguous() if g > 1 else states
        k, v = self.split(self.key(src)), self.split(self.value(src))
        dtype = torch.float32 if k.device.type == "cpu" and k.dtype == torch.float16 else k.dtype
        # one buffer and one pass each, layout and dtype together (``.to`` then ``.contiguous`` made two strided
        # passes and two fresh buffers of a half-precision model's keys/values)
        kt = k.new_empty(k.transpose(-1, -2).shape, dtype=dtype)
        kt.copy_(k.transpose(-1, -2))
        vs = v.new_empty(v.shape, dtype=dtype)
        vs.copy_(v)
        k = kt.transpose(-1, -2)
        return ImageKV(k, vs, image_rows8(k, vs) if self.key.int8 and dtype == torch.float32 and INT8_BAGS else None)

    def forward(self, x, mask, kv_states, cached=None, append=False, output_attentions=False, cache=None, i=0):
        """``cached``: (k, v) to reuse (cross) or extend (self, when ``append``; in place in ``cache``'s
        layer ``i`` when given). Returns ctx, probs, (k, v)."""
        if cached is not None and not append:
            q, (k, v) = self.split(self.query(x)), cached
        else:
            lins = (self.query, self.key, self.value)
            q, k, v = map(self.split, project(self, x, lins) if kv_states is x else
                          (self.query(x), self.key(kv_states), self.value(kv_states)))
            if cache is not None:
                k, v = cache.append(i, k, v)
            elif cached is not None:
                k, v = torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)
        dtype = q.dtype
        if k.dtype != dtype:      # float32 cross keys/values of a half-precision model (``cross_kv``)
            q = q.to(k.dtype)
        if not output_attentions and not self.training and fits_one_query_attention(q, k, v):
            rows8 = cached.rows8 if isinstance(cached, ImageKV) and not append else None
            ctx = one_query_attention(q, k, v, mask, scale=self.head_dim ** -0.5, rows8=rows8).to(dtype)
            return ctx.transpose(1, 2).reshape(x.shape), None, (k, v)
        if k.shape[0] != q.shape[0]:      # one cached row per run of equal rows (``cross_kv``): each row's own
            k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], 0) for t in (k, v))
        ctx, probs = attention(q, k, v, mask, scale=self.head_dim ** -0.5, output_attentions=output_attentions,
                               dropout=self.dropout if self.training else 0.0)
        if ctx.dtype != dtype:
            ctx, probs = ctx.to(dtype), None if probs is None else probs.to(dtype)
        return ctx.transpose(1, 2).reshape(x.shape), probs, (k, v)


class BlipTextSelfOutput(nn.Module):
    """``LayerNorm(dense(h) + residual)`` (post-LN); also the FFN output block."""

    def __init__(self, config, n_in=None):
        super().__init__()
        self.dense = Linear(n_in or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BlipTextAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BlipTextSelfAttention(config, is_cross_attention)
        self.output = BlipTextSelfOutput(config)

    def forward(self, x, mask, kv_states, cached=None, append=False, output_attentions=False, cache=None, i=0):
        ctx, probs, kv = self.self(x, mask, kv_states, cached, append, output_attentions, cache, i)
        return self.output(ctx, x), probs, kv


class BlipTextIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act_name = config.hidden_act

    def forward(self, x):
        return linear_act(self.dense, x, self.act_name)


class BlipTextLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BlipTextAttention(config)
        if config.is_decoder:
            self.crossattention = BlipTextAttention(config, is_cross_attention=True)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextSelfOutput(config, n_in=config.intermediate_size)

    def forward(self, x, mask, enc, enc_mask, cache: Optional[TextCache], i: int, output_attentions=False):
        h, self_probs, _ = self.attention(x, mask, x, append=True, output_attentions=output_attentions,
                                          cache=cache, i=i)
        cross_probs = None
        if enc is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("encoder_hidden_states given, but this text config has no cross-attention "
                                 "(config.is_decoder is False)")
            past = None
            if cache is not None:
                if cache.cross_kv[i] is None:
                    if cache.cross_repeats is None:
                        cache.cross_repeats = repeated_rows(enc)
                    cache.cross_kv[i] = self.crossattention.self.cross_kv(enc, cache.cross_repeats)
                past = cache.cross_kv[i]
            h, cross_probs, _ = self.crossattention(h, enc_mask, enc, past, output_attentions=output_attentions)
        return self.output(self.intermediate(h), h), self_probs, cross_probs


class BlipTextEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([BlipTextLayer(config) for _ in range(config.num_hidden_layers)])


class BlipTextPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class BlipTextTransformer(nn.Module):
    """Embeddings -> layers (-> pooler); the module every BLIP class nests (``text_encoder``, ``bert``...)."""

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipTextEncoder(config)
        self.pooler = BlipTextPooler(config) if add_pooling_layer else None

    def _self_mask(self, mask, q_len, past, is_decoder, dtype):
        """Additive mask (B, 1, L, S) from a (B, S) or (B, L, S) 0/1 mask, causal when decoding."""
        if mask.dim() == 3:
            keep = mask[:, None].to(dtype)
        elif mask.dim() == 2:
            keep = mask[:, None, None, :].to(dtype)
            if is_decoder:
                s = mask.shape[1]
                rows = torch.arange(q_len, device=mask.device)[:, None] + (s - q_len)
                causal = torch.arange(s, device=mask.device)[None, :] <= rows
                keep = keep * causal[None, None].to(dtype)
        else:
            raise ValueError(f"attention_mask must be 2D or 3D, got shape {tuple(mask.shape)}")
        return (1.0 - keep) * MASK_VALUE

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_attentions=False, output_hidden_states=False, return_dict=True,
                is_decoder=False):
        """transformers' ``BlipTextModel.forward`` arguments; ``encoder_embeds`` skips the embeddings."""
        dev = self.embeddings.word_embeddings.weight.device
        dtype = self.embeddings.word_embeddings.weight.dtype
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("give input_ids or inputs_embeds, not both")
        if input_ids is not None:
            input_ids = as_tensor(input_ids, "input_ids", kind="int", device=dev, ndim=2)
            check_ids(input_ids, self.config.vocab_size)
            b, q_len = input_ids.shape
        elif inputs_embeds is not None or encoder_embeds is not None:
            given = inputs_embeds if inputs_embeds is not None else encoder_embeds
            given = as_tensor(given, "inputs_embeds", kind="float", device=dev, ndim=3).to(dtype)
            inputs_embeds, encoder_embeds = (given, None) if inputs_embeds is not None else (None, given)
            b, q_len = given.shape[:2]
        else:
            raise ValueError("input_ids (or inputs_embeds) is required")
        cache = past_key_values
        # As transformers: a decoding call (is_decoder=True) keeps a cache unless told otherwise.
        if cache is None and is_decoder and (use_cache if use_cache is not None else self.config.use_cache):
            cache = TextCache(len(self.encoder.layer))
        past = cache.length if cache is not None else 0
        if past + q_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + q_len} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones(b, past + q_len, device=dev)
        attention_mask = as_tensor(attention_mask, "attention_mask", kind="mask", device=dev, ndim=(2, 3))
        if attention_mask.shape[0] != b or attention_mask.shape[-1] != past + q_len:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not fit {b} sequences of "
                             f"{past + q_len} tokens")
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=dev)[None].expand(b, -1)
        else:
            position_ids = as_tensor(position_ids, "position_ids", kind="int", device=dev, ndim=2)
        mask = self._self_mask(attention_mask, q_len, past, is_decoder, dtype)

        enc, enc_mask = encoder_hidden_states, None
        if enc is not None:
            enc = as_tensor(enc, "encoder_hidden_states", kind="float", device=dev, ndim=3).to(dtype)
            if enc.shape[0] != b:
                raise ValueError(f"encoder_hidden_states has batch {enc.shape[0]} but the text has batch {b}")
            if encoder_attention_mask is not None:
                m = as_tensor(encoder_attention_mask, "encoder_attention_mask", kind="mask", device=dev, ndim=2)
                if tuple(m.shape) != tuple(enc.shape[:2]):
                    raise ValueError(f"encoder_attention_mask shape {tuple(m.shape)} does not match "
                                     f"encoder_hidden_states {tuple(enc.shape[:2])}")
                # Applied (transformers 4.57 drops it): masked positions get the dtype's minimum.
                enc_mask = (1.0 - m[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

        x = encoder_embeds if encoder_embeds is not None else self.embeddings(input_ids, position_ids, inputs_embeds)
        states = () if output_hidden_states else None
        attns = () if output_attentions else None
        cross = () if output_attentions and enc is not None else None
        for i, layer in enumerate(self.encoder.layer):
            if output_hidden_states:
                states += (x,)
            x, sp, cp = layer(x, mask, enc, enc_mask, cache, i, bool(output_attentions))
            if output_attentions:
                attns += (sp,)
                if enc is not None:
                    cross += (cp,)
        if output_hidden_states:
            states += (x,)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x, pooler_output=pooled, hidden_states=states, past_key_values=cache,
            attentions=attns, cross_attentions=cross)
        return out if return_dict or return_dict is None else out.to_tuple()


class BlipTextModel(BlipTextTransformer, PreTrainedModel):
    """Public text tower (``BlipTextConfig``): ``model(input_ids, attention_mask, encoder_hidden_states=...)``.

    Returns ``BaseModelOutputWithPoolingAndCrossAttentions`` (``last_hidden_state`` (B, L, D),
    ``pooler_output`` (B, D) = tanh(dense(h[:, 0]))).
    """

    architecture = "BlipTextModel"

    def __init__(self, config, add_pooling_layer: bool = True, seed=0, dtype=None):
        BlipTextTransformer.__init__(self, config, add_pooling_layer)
        self.post_init(seed, dtype)

    def stages(self, input_ids, attention_mask=None, **kw):
        out = self.forward(input_ids, attention_mask, **kw)
        return {"text": out.last_hidden_state}


class BlipTextPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.act_name = config.hidden_act
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(linear_act(self.dense, x, self.act_name))


class BlipTextLMPredictionHead(nn.Module):
    """transform -> ``decoder`` (weight tied to the word embeddings, bias = ``self.bias``)."""

    def __init__(self, config):
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(self.transform(x))


class BlipTextOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BlipTextLMPredictionHead(config)


class BlipTextLMHeadModel(nn.Module):
    """``bert`` (no pooler) + ``cls`` LM head; the captioning and VQA answer decoder.

    ``forward(..., labels=...)`` computes the next-token loss (``logits[:, :-1]`` vs
    ``labels[:, 1:]``, ignore -100, ``config.label_smoothing``). ``step`` is the cached decoding
    step used by ``generate``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BlipTextTransformer(config, add_pooling_layer=False)
        self.cls = BlipTextOnlyMLMHead(config)
        self.tie_weights()

    def tie_weights(self):
        p = self.cls.predictions
        p.decoder.weight = self.bert.embeddings.word_embeddings.weight
        p.decoder.bias = p.bias

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, past_key_values=None,
                use_cache=None, output_attentions=False, output_hidden_states=False, return_dict=True,
                return_logits=False, is_decoder=True, reduction="mean"):
        if labels is not None:
            use_cache = False
        out = self.bert(input_ids, attention_mask, position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        past_key_values=past_key_values, use_cache=use_cache, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, is_decoder=is_decoder)
        logits = self.cls.predictions(out.last_hidden_state)
        if return_logits:
            return logits[:, :-1].contiguous()
        loss = None
        if labels is not None:
            labels = as_tensor(labels, "labels", kind="int", device=logits.device, ndim=2)
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match the decoder input "
                                 f"{tuple(logits.shape[:2])}")
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), reduction=reduction, ignore_index=-100,
                                   label_smoothing=float(self.config.label_smoothing))
            if reduction == "none":
                loss = loss.view(logits.shape[0], -1).sum(1)
        result = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            attentions=out.attentions, cross_attentions=out.cross_attentions)
        return result if return_dict or return_dict is None else result.to_tuple()

    def decode_step(self, ids, positions, key_mask, cache, index, context):
        """The step of ``generation.generate``; ``context`` = (encoder states, encoder mask or None)."""
        if cache is None:
            cache = TextCache(len(self.bert.encoder.layer))
            # later steps feed one token per row: weights in oneDNN's layout for that many rows
            prepare_decoding(self, ids.shape[0])
        states, states_mask = context
        out = self.bert(ids, key_mask[:, : index + ids.shape[1]], positions, encoder_hidden_states=states,
                        encoder_attention_mask=states_mask, past_key_values=cache, use_cache=True, is_decoder=True)
        return self.cls.predictions(out.last_hidden_state[:, -1]), out.past_key_values
