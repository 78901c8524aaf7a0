"""BLIP text transformer (BERT style, post-LN, cross-attention to image states) in TensorFlow.

``TextTower`` is the ``BlipTextModel`` body (embeddings, layers, optional pooler) and exposes the
pieces generation needs: per-layer cross-attention keys/values computed once and a one-token
``step`` writing into a fixed-size self-attention cache. ``TextLMHeadModel`` adds the prediction
head whose decoder weight *is* the word-embedding variable and whose bias *is*
``cls/predictions/bias`` (the tie transformers' TF port loses when loading PyTorch weights).

Masks follow transformers: additive -10000 for padding, causal only when ``is_decoder=True``
(the LM path). Unlike transformers 4.57 PyTorch, ``encoder_attention_mask`` is applied.
"""
from __future__ import annotations

import tensorflow as tf

from blip_core.configs import BlipConfig
from blip_core.numerics import MASK_VALUE
from blip_core.outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ._base import (BlipTFModel, Dense, LayerNorm, Recorder, activation, as_float, as_ids, as_mask, as_positions, lookup,
                    attend, cross_entropy, dim, flag, merge_heads, padding_bias, plus_bias, split_heads)


class BertAttention(tf.Module):
    """``attention.<inner>.{query,key,value}`` + ``attention.output.{dense,LayerNorm}`` (residual inside).

    ``inner`` is ``self`` in BLIP's text model and ``attention`` in the BLIP-2 Q-Former.
    """

    def __init__(self, params, p, cfg, inner: str = "self"):
        super().__init__(name=None)
        self.heads = cfg.num_attention_heads
        self.query = Dense(params, f"{p}/{inner}/query")
        self.key = Dense(params, f"{p}/{inner}/key")
        self.value = Dense(params, f"{p}/{inner}/value")
        self.dense = Dense(params, f"{p}/output/dense")
        self.norm = LayerNorm(params, f"{p}/output/LayerNorm", cfg.layer_norm_eps)

    def kv(self, states):
        return split_heads(self.key(states), self.heads), split_heads(self.value(states), self.heads)

    def __call__(self, h, k, v, bias, probs_out=None):
        ctx = attend(split_heads(self.query(h), self.heads), k, v, bias, probs_out)
        return self.norm(self.dense(merge_heads(ctx)) + h)


class FeedForward(tf.Module):
    """``<ffn>.dense`` -> act -> ``<out>.dense`` + residual -> ``<out>.LayerNorm`` (BERT's post-LN FFN).

    The Q-Former has two: ``intermediate``/``output`` for text and ``intermediate_query``/``output_query``.
    """

    def __init__(self, params, p, cfg, ffn: str = "intermediate", out: str = "output"):
        super().__init__(name=None)
        self.intermediate = Dense(params, f"{p}/{ffn}/dense")
        self.output = Dense(params, f"{p}/{out}/dense")
        self.norm = LayerNorm(params, f"{p}/{out}/LayerNorm", cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)

    def __call__(self, h):
        return self.norm(self.output(self.act(self.intermediate(h))) + h)


class TextLayer(tf.Module):
    def __init__(self, params, p, cfg):
        super().__init__(name=None)
        self.attention = BertAttention(params, f"{p}/attention", cfg)
        self.crossattention = BertAttention(params, f"{p}/crossattention", cfg) if cfg.is_decoder else None
        self.ffn = FeedForward(params, p, cfg)

    def __call__(self, h, self_bias, cross=None, cross_bias=None, cache=None, index=None, rec=None):
        """One layer. ``cross``: the (k, v) of the cross-attended states or None.

        With ``cache`` = (K, V) buffers of shape (B, H, M, d), the new keys/values of ``h`` (one
        token) are written at ``index`` and attention runs over the whole buffer (``self_bias``
        hides unwritten slots). Returns the new hidden states and the (k, v) used. ``rec`` (a
        ``Recorder``) receives the self- and cross-attention probabilities when asked for.
        """
        k, v = self.attention.kv(h)
        if cache is not None:
            slot = tf.equal(tf.range(cache[0].shape[2]), index)[None, None, :, None]
            k, v = tf.where(slot, k, cache[0]), tf.where(slot, v, cache[1])
        h = self.attention(h, k, v, self_bias, rec.attn if rec is not None else None)
        if cross is not None:
            h = self.crossattention(h, cross[0], cross[1], cross_bias, rec.cross if rec is not None else None)
        return self.ffn(h), (k, v)


class TextTower(tf.Module):
    """Embeddings + layers (+ pooler) under ``prefix`` (e.g. ``text_encoder``, ``text_decoder/bert``)."""

    def __init__(self, params, prefix, cfg, pooler: bool):
        super().__init__(name=None)
        p = f"{prefix}/" if prefix else ""
        self.cfg = cfg
        self.word_embeddings = params[f"{p}embeddings/word_embeddings/embeddings"]
        self.position_embeddings = params[f"{p}embeddings/position_embeddings/embeddings"]
        self.emb_norm = LayerNorm(params, f"{p}embeddings/LayerNorm", cfg.layer_norm_eps)
        self.layers = [TextLayer(params, f"{p}encoder/layer_{i}", cfg) for i in range(cfg.num_hidden_layers)]
        self.pooler = Dense(params, f"{p}pooler/dense") if pooler else None

    def embed(self, input_ids=None, position_ids=None, inputs_embeds=None):
        x = lookup(self.word_embeddings, input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = tf.range(tf.shape(x)[1])[None]
        return self.emb_norm(x + lookup(self.position_embeddings, position_ids))

    def cross_kv(self, states):
        """Cross-attention keys/values of ``states`` for every layer (computed once per generate)."""
        states = tf.cast(states, self.word_embeddings.dtype)
        return [layer.crossattention.kv(states) for layer in self.layers]

    def encode(self, h, self_bias, crosses=None, cross_bias=None, rec=None):
        """Full-sequence pass (no cache); ``crosses`` from ``cross_kv``. Returns (hidden, per-layer (k, v)).

        ``rec`` (a ``Recorder``) collects the input ``h`` and every layer's output, as transformers'
        ``hidden_states``, and the attention probabilities.
        """
        if rec is not None:
            rec.add_hidden(h)
        kvs = []
        for layer, cross in zip(self.layers, crosses or [None] * len(self.layers)):
            h, kv = layer(h, self_bias, cross, cross_bias, rec=rec)
            kvs.append(kv)
            if rec is not None:
                rec.add_hidden(h)
        return h, kvs

    def step(self, h, self_bias, crosses, cross_bias, caches, index):
        """Cached pass of one token embedding ``h`` (B, 1, D) at position ``index``."""
        new = []
        for layer, cross, cache in zip(self.layers, crosses, caches):
            h, kv = layer(h, self_bias, cross, cross_bias, cache, index)
            new.append(kv)
        return h, new

    def pool(self, h):
        return tf.tanh(self.pooler(h[:, 0])) if self.pooler is not None else None


def self_attention_bias(mask, length: int, is_decoder: bool):
    """(B, L) 0/1 mask -> additive bias; causal x padding when ``is_decoder`` (transformers' rule)."""
    if not is_decoder:
        return padding_bias(mask)
    steps = tf.range(length)      # lower triangle of ones (not MatrixBandPart: ~10 ms to convert for XLA)
    causal = tf.cast(steps[:, None] >= steps[None, :], tf.float32)
    allowed = causal[None, None] * tf.cast(mask, tf.float32)[:, None, None, :]
    return (1.0 - allowed) * MASK_VALUE


def run_text(tower: TextTower, ids, mask, enc_states, enc_mask, is_decoder, position_ids=None,
             inputs_embeds=None, encoder_embeds=None, rec=None):
    """The BlipTextModel forward on prepared tensors -> (sequence_output, pooled_output).

    ``rec``: an optional ``Recorder`` for hidden states / attentions (see ``TextTower.encode``).
    """
    if encoder_embeds is not None:
        h = encoder_embeds
    else:
        h = tower.embed(ids, position_ids, inputs_embeds)
    b, n = dim(h, 0), h.shape[1]
    if mask is None:
        mask = tf.ones([b, n], tf.float32)
    cross_bias = None
    if enc_states is not None:
        if tower.layers and tower.layers[0].crossattention is None:
            raise ValueError("encoder_hidden_states were given but this text config has is_decoder=False "
                             "(no cross-attention layers)")
        if enc_mask is not None:
            cross_bias = padding_bias(enc_mask)
    crosses = tower.cross_kv(enc_states) if enc_states is not None else None
    if rec is not None and enc_states is None:
        rec.cross = None   # transformers returns cross_attentions only when there is something to attend
    seq, _ = tower.encode(h, self_attention_bias(mask, n, is_decoder), crosses, cross_bias, rec)
    return seq, tower.pool(seq)


class LMHead(tf.Module):
    """``cls.predictions``: dense -> act -> LayerNorm -> tied decoder (word embeddings^T + bias)."""

    def __init__(self, params, prefix, cfg, word_embeddings):
        super().__init__(name=None)
        p = f"{prefix}/cls/predictions"
        self.dense = Dense(params, f"{p}/transform/dense")
        self.norm = LayerNorm(params, f"{p}/transform/LayerNorm", cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)
        self.word_embeddings = word_embeddings     # the same tf.Variable as the embedding table
        self.bias = params[f"{p}/bias"]

    def __call__(self, h):
        x = self.norm(self.act(self.dense(h)))
        return plus_bias(tf.matmul(x, self.word_embeddings, transpose_b=True), self.bias)


class TextLMHeadModel(tf.Module):
    """``BlipTextLMHeadModel``: ``bert`` (no pooler) + tied LM head, with the shifted LM loss."""

    def __init__(self, params, prefix, cfg):
        super().__init__(name=None)
        self.cfg = cfg
        self.bert = TextTower(params, f"{prefix}/bert", cfg, pooler=False)
        self.cls = LMHead(params, prefix, cfg, self.bert.word_embeddings)

    def decode_step(self, ids, positions, key_mask, cache, index, context):
        """The step of ``generation.decode``; ``context`` = (cross keys/values per layer, cross bias or None).

        The first call (``cache`` None) runs the prompt and pads its keys/values to the buffer size;
        later calls write one token's keys/values at ``index``.
        """
        crosses, cross_bias = context
        bert, total = self.bert, key_mask.shape[1]
        h = bert.embed(ids, positions)
        if cache is None:
            n = ids.shape[1]
            h, kvs = bert.encode(h, self_attention_bias(key_mask[:, :n], n, True), crosses, cross_bias)
            pad = [[0, 0], [0, 0], [0, total - n], [0, 0]]
            cache = [(tf.pad(k, pad), tf.pad(v, pad)) for k, v in kvs]
        else:
            allowed = (tf.range(total)[None] <= index) & (key_mask > 0)
            bias = tf.where(allowed, 0.0, MASK_VALUE)[:, None, None, :]
            h, cache = bert.step(h, bias, crosses, cross_bias, cache, index)
        return tf.cast(self.cls(h[:, -1]), tf.float32), cache

    def __call__(self, ids, mask, enc_states, enc_mask, labels=None, is_decoder=True):
        """-> (logits (B, L, V), hidden (B, L, D), loss or None)."""
        hidden, _ = run_text(self.bert, ids, mask, enc_states, enc_mask, is_decoder)
        logits = self.cls(hidden)
        loss = None
        if labels is not None:
            loss = cross_entropy(logits[:, :-1], labels[:, 1:], self.cfg.label_smoothing)
        return logits, hidden, loss


def text_output(seq, pooled, rec=None):
    """``BaseModelOutputWithPoolingAndCrossAttentions`` with whatever ``rec`` recorded."""
    if rec is None:
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=pooled)
    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=seq, pooler_output=pooled, hidden_states=Recorder.tup(rec.hidden),
        attentions=Recorder.tup(rec.attn), cross_attentions=Recorder.tup(rec.cross))


def check_length(ids, cfg, name="input_ids"):
    if ids is not None and ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{name} has {ids.shape[1]} tokens, more than max_position_embeddings="
                         f"{cfg.max_position_embeddings}")


class BlipTextModel(BlipTFModel):
    """The BLIP text encoder/decoder trunk with pooler (``BlipModel.text_model`` on its own).

    ``model(input_ids, attention_mask, encoder_hidden_states=img)`` -> ``last_hidden_state``
    (B, L, D), ``pooler_output`` (B, D). Bidirectional unless ``is_decoder=True``.
    """

    architecture = "BlipTextModel"

    def _build(self):
        if isinstance(self.config, BlipConfig):
            self.config = self.config.text_config
        self.text_model = TextTower(self.params, "", self.config, pooler=True)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_attentions=False, output_hidden_states=False, return_dict: bool = True,
                is_decoder: bool = False):
        """transformers' ``BlipTextModel`` arguments. ``encoder_embeds`` skip the embedding layer. No cache is
        kept or returned (``use_cache`` is accepted and has no effect): ``generate`` decodes with its own."""
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported")
        if past_key_values is not None:
            raise NotImplementedError("past_key_values are not supported by the TF BlipTextModel; decode with "
                                      "generate(), which keeps its own cache")
        cfg = self.config
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        ids = as_ids(input_ids, cfg.vocab_size)
        check_length(ids, cfg)
        embeds = as_float(inputs_embeds, self.dtype, "inputs_embeds") if inputs_embeds is not None else None
        enc_embeds = as_float(encoder_embeds, self.dtype, "encoder_embeds") if encoder_embeds is not None else None
        first = ids if ids is not None else (embeds if embeds is not None else enc_embeds)
        if first is None:
            raise ValueError("you have to specify input_ids, inputs_embeds or encoder_embeds")
        shape = tuple(first.shape[:2])
        mask = as_mask(attention_mask, shape)
        enc = None
        enc_mask = None
        if encoder_hidden_states is not None:
            enc = as_float(encoder_hidden_states, self.dtype, "encoder_hidden_states")
            if enc.shape.rank != 3 or enc.shape[-1] != cfg.encoder_hidden_size:
                raise ValueError(f"encoder_hidden_states must be (batch, length, {cfg.encoder_hidden_size}), "
                                 f"got {tuple(enc.shape)}")
            enc_mask = as_mask(encoder_attention_mask, tuple(enc.shape[:2]), "encoder_attention_mask")
        pos = None if position_ids is None else as_positions(position_ids, cfg.max_position_embeddings)
        rec = Recorder.make(flag(output_hidden_states, cfg, "output_hidden_states"),
                            flag(output_attentions, cfg, "output_attentions"))
        seq, pooled = run_text(self.text_model, ids, mask, enc, enc_mask, is_decoder, pos, embeds, enc_embeds, rec)
        out = text_output(seq, pooled, rec)
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs):
        return {"text": self.forward(**inputs).last_hidden_state}
