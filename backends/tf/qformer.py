"""BLIP-2 Querying Transformer (Q-Former) in TensorFlow, built from the BLIP text blocks of ``text.py``.

A post-LN BERT encoder over ``[queries | text]``: self-attention over every position (bidirectional,
-10000 padding mask), cross-attention to the image on the first ``query_length`` positions in layers
``i % cross_attention_frequency == 0`` (mask value: the dtype's most negative number, as
transformers), then the query feed-forward (``intermediate_query`` / ``output_query``) on the
queries and the text feed-forward (``intermediate`` / ``output``) on the rest.

``BertAttention`` and ``FeedForward`` are the BLIP text model's own blocks (``inner="attention"``
selects the Q-Former's weight names). Shapes: ``query_embeds`` (B, Q + L, H), image states
(B, N, D_vision). Example::

    qformer = Blip2QFormerModel.from_pretrained("dir")
    out = qformer(query_embeds=queries, encoder_hidden_states=image)   # last_hidden_state (B, Q, H)
"""
from __future__ import annotations

import tensorflow as tf

from blip_core.configs import Blip2Config
from blip_core.numerics import MASK_VALUE
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ._base import BlipTFModel, LayerNorm, Recorder, as_float, flag
from .text import BertAttention, FeedForward


def _mask_rows(mask):
    """(B, L) or (B, L, L) 0/1 mask -> broadcastable (B, 1, 1|L, L) float32."""
    mask = tf.cast(mask, tf.float32)
    if mask.shape.rank == 2:
        return mask[:, None, None, :]
    if mask.shape.rank == 3:
        return mask[:, None]
    raise ValueError(f"attention mask must be 2-D (batch, length) or 3-D (batch, from, to), got shape "
                     f"{tuple(mask.shape)}")


def self_attention_bias(mask):
    """BERT's additive self-attention mask: -10000 at masked keys."""
    return (1.0 - _mask_rows(mask)) * MASK_VALUE


def cross_attention_bias(mask, dtype: tf.DType):
    """Image padding mask -> additive bias holding the compute dtype's most negative value."""
    return tf.cast(1.0 - _mask_rows(mask), dtype) * dtype.min


class QFormerLayer(tf.Module):
    def __init__(self, params, p, cfg, index: int):
        super().__init__(name=None)
        self.attention = BertAttention(params, f"{p}/attention", cfg, inner="attention")
        self.crossattention = (BertAttention(params, f"{p}/crossattention", cfg, inner="attention")
                               if index % cfg.cross_attention_frequency == 0 else None)
        self.text_ffn = FeedForward(params, p, cfg) if cfg.use_qformer_text_input else None
        self.query_ffn = FeedForward(params, p, cfg, "intermediate_query", "output_query")

    def _text(self, x):
        if self.text_ffn is None:
            raise ValueError("this Q-Former has no text feed-forward (config.use_qformer_text_input=False) and "
                             "was given text positions; text-only Q-Former passes need a retrieval checkpoint")
        return self.text_ffn(x)

    def __call__(self, h, self_bias, image, cross_bias, query_length: int, rec=None):
        k, v = self.attention.kv(h)
        attn = self.attention(h, k, v, self_bias, rec.attn if rec is not None else None)
        if query_length == 0:
            return self._text(attn)
        queries = attn[:, :query_length]
        if self.crossattention is not None:
            if image is None:
                raise ValueError("encoder_hidden_states must be given: this Q-Former layer cross-attends the image")
            ck, cv = self.crossattention.kv(image)
            queries = self.crossattention(queries, ck, cv, cross_bias, rec.cross if rec is not None else None)
        out = self.query_ffn(queries)
        if attn.shape[1] > query_length:
            out = tf.concat([out, self._text(attn[:, query_length:])], axis=1)
        return out


class QFormerTower(tf.Module):
    """``layernorm`` -> layers under ``prefix`` (``qformer`` in composite models, empty on its own)."""

    def __init__(self, params, prefix, cfg):
        super().__init__(name=None)
        p = f"{prefix}/" if prefix else ""
        self.cfg = cfg
        self.layernorm = LayerNorm(params, f"{p}layernorm", cfg.layer_norm_eps)
        self.layers = [QFormerLayer(params, f"{p}encoder/layer_{i}", cfg, i) for i in range(cfg.num_hidden_layers)]
        self.dtype = self.layernorm.gamma.dtype

    def __call__(self, x, query_length=None, attention_mask=None, image=None, image_mask=None, rec=None):
        """(B, Q + L, H) embeddings -> last hidden state; ``rec`` collects hidden states and attentions."""
        x = tf.cast(x, self.dtype)
        n = x.shape[1]
        query_length = n if query_length is None else int(query_length)
        if not 0 <= query_length <= n:
            raise ValueError(f"query_length={query_length} is outside [0, {n}]")
        mask = tf.ones(tf.shape(x)[:2], tf.float32) if attention_mask is None else attention_mask
        self_bias = self_attention_bias(mask)
        cross_bias = None
        if image is not None:
            image = tf.cast(image, self.dtype)
            if image_mask is not None:
                cross_bias = cross_attention_bias(image_mask, self.dtype)
        h = self.layernorm(x)
        if rec is not None:
            rec.add_hidden(h)
        for layer in self.layers:
            h = layer(h, self_bias, image, cross_bias, query_length, rec)
            if rec is not None:
                rec.add_hidden(h)
        return h


class QFormerTextEmbeddings(tf.Module):
    """Q-Former word + absolute position embeddings (retrieval / text classes); queries go in front.

    No LayerNorm here: the Q-Former's ``layernorm`` normalises whatever it receives.
    """

    def __init__(self, params, cfg):
        super().__init__(name=None)
        self.cfg = cfg
        self.word_embeddings = params["embeddings/word_embeddings/embeddings"]
        self.position_embeddings = params["embeddings/position_embeddings/embeddings"]

    def __call__(self, input_ids, position_ids=None, query_embeds=None):
        n = input_ids.shape[1]
        if n is not None and n > self.cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {n} tokens but the Q-Former has only "
                             f"{self.cfg.max_position_embeddings} positions")
        if position_ids is None:
            position_ids = tf.range(tf.shape(input_ids)[1])[None]
        emb = tf.gather(self.word_embeddings, input_ids) + tf.gather(self.position_embeddings, position_ids)
        if query_embeds is not None:
            q = tf.broadcast_to(tf.cast(query_embeds, emb.dtype), [tf.shape(emb)[0]] + query_embeds.shape[1:].as_list())
            emb = tf.concat([q, emb], axis=1)
        return emb


def qformer_output(h, rec=None):
    """``BaseModelOutputWithPoolingAndCrossAttentions``: the pooler is position 0 (no dense)."""
    if rec is None:
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=h[:, 0])
    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=h, pooler_output=h[:, 0], hidden_states=Recorder.tup(rec.hidden),
        attentions=Recorder.tup(rec.attn), cross_attentions=Recorder.tup(rec.cross))


def _mask_input(x):
    """A 0/1 mask (numpy or tf) as float32; None stays None."""
    if x is None:
        return None
    t = x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.constant(x)
    return tf.cast(t, tf.float32)


class Blip2QFormerModel(BlipTFModel):
    """The Q-Former trunk: ``layernorm`` -> layers. No embeddings of its own.

    ``model(query_embeds=(B, Q, H), encoder_hidden_states=(B, N, D))`` -> ``last_hidden_state``
    (B, Q, H); ``pooler_output`` = ``last_hidden_state[:, 0]``.
    """

    architecture = "Blip2QFormerModel"

    def _build(self):
        if isinstance(self.config, Blip2Config):
            self.config = self.config.qformer_config
        self.qformer = QFormerTower(self.params, "", self.config)

    def forward(self, query_embeds, query_length=None, attention_mask=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, output_attentions=False,
                output_hidden_states=False, return_dict: bool = True):
        cfg = self.config
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        x = as_float(query_embeds, self.dtype, "query_embeds")
        if x.shape.rank != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"query_embeds must be (batch, length, {cfg.hidden_size}), got {tuple(x.shape)}")
        mask = _mask_input(attention_mask)
        if mask is not None and (mask.shape[-1] != x.shape[1] or mask.shape[0] != x.shape[0]):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match query_embeds "
                             f"{tuple(x.shape[:2])}")
        image = None
        if encoder_hidden_states is not None:
            image = as_float(encoder_hidden_states, self.dtype, "encoder_hidden_states")
            if image.shape.rank != 3 or image.shape[-1] != cfg.encoder_hidden_size:
                raise ValueError(f"encoder_hidden_states must be (batch, N, {cfg.encoder_hidden_size}), "
                                 f"got {tuple(image.shape)}")
        rec = Recorder.make(flag(output_hidden_states, cfg, "output_hidden_states"),
                            flag(output_attentions, cfg, "output_attentions"))
        h = self.qformer(x, query_length, mask, image, _mask_input(encoder_attention_mask),
                         rec)
        out = qformer_output(h, rec)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs):
        return {"qformer": self.forward(**inputs).last_hidden_state}
