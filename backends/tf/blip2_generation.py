"""BLIP-2's side of the TensorFlow decoding engine's model contract (``generation.py`` drives it).

* ``generation_context(model, pixels, text_ids, text_mask, slots)`` -> a nest, rows first, of what
  every step closes over: OPT's fused prompt embeddings ``{"embeds": (B, prefix + P, D)}``; T5's
  encoder run once, ``{"cross": per-block cross (K, V), "encoder_mask": (B, S)}``.
* ``init_cache(model, rows, total_len)`` -> the language model's fixed-size self-attention cache;
  OPT on the concatenation path keeps ``Q`` more slots in front for the image queries.
* ``step(model, ids, positions, key_mask, cache, index, context)`` -> (logits (N, V) float32 of the
  last position, new cache). The first call (the whole prompt, ``index`` 0) is OPT's prefill from
  the context embeddings; later calls feed one token written at slot ``index``. ``positions`` are
  not used: OPT counts its own (offset 2) from ``key_mask``, T5 has relative positions.

``key_mask`` (N, T) marks the real tokens of the token buffer; the slot being fed always counts.
"""
from __future__ import annotations

import tensorflow as tf

from blip_core import blip2 as rules

from .opt import with_slot_written


def prefix_length(config) -> int:
    """Cache slots in front of the token buffer: the Q image queries of OPT's concatenation path."""
    if rules.is_decoder_only(config) and not rules.uses_placeholders(config):
        return config.num_query_tokens
    return 0


def fuse_queries(lm_inputs, embeds, slots):
    """Put the Q projected queries (B, Q, D) at the placeholder ``slots`` (B, L) of ``embeds``, in order."""
    order = tf.maximum(tf.cumsum(tf.cast(slots, tf.int32), axis=1) - 1, 0)
    placed = tf.gather(tf.cast(lm_inputs, embeds.dtype), order, batch_dims=1)
    return tf.where(tf.cast(slots, tf.bool)[..., None], placed, embeds)


def generation_context(model, pixel_values, text_ids, text_mask, slots=None, interpolate_pos_encoding=False):
    """Image -> queries -> fused text embeddings (-> T5 encoder); pure TensorFlow, traceable.

    ``slots``: the validated placeholder mask (``model.image_slots(ids)``) on the placeholder path.
    """
    cfg = model.config
    lm = model.language_model
    lm_inputs, _, _ = model._language_inputs(tf.cast(pixel_values, model.dtype), interpolate_pos_encoding)
    embeds = lm.embed(tf.cast(text_ids, tf.int32))
    mask = tf.cast(text_mask, tf.float32)
    if rules.uses_placeholders(cfg):
        if slots is None:
            raise ValueError("the placeholder path needs the image slots (model.image_slots(input_ids))")
        embeds = fuse_queries(lm_inputs, embeds, slots)
    else:
        embeds = tf.concat([tf.cast(lm_inputs, embeds.dtype), embeds], 1)
        mask = tf.concat([tf.ones([tf.shape(mask)[0], cfg.num_query_tokens], tf.float32), mask], 1)
    if rules.is_decoder_only(cfg):
        return {"embeds": embeds}
    enc, _ = lm.encoder(embeds, mask)
    return {"cross": lm.decoder.cross_kv(enc), "encoder_mask": mask}


def init_cache(model, rows, total_len: int):
    return model.language_model.init_cache(rows, prefix_length(model.config) + total_len)


def _is_prompt(ids, index) -> bool:
    """The first call: several tokens, or slot 0 known statically (a one-token prompt)."""
    return ids.shape[1] > 1 or tf.get_static_value(index) == 0


def step(model, ids, positions, key_mask, cache, index, context):
    del positions   # OPT derives its own from key_mask; T5 uses relative positions
    lm = model.language_model
    ids = tf.cast(ids, tf.int32)
    mask = tf.cast(key_mask, tf.int32)
    s = ids.shape[1]
    if rules.is_decoder_only(model.config):
        prefix = prefix_length(model.config)
        if prefix:
            mask = tf.concat([tf.ones([tf.shape(mask)[0], prefix], mask.dtype), mask], 1)
        if _is_prompt(ids, index):
            h, cache = lm.run(context["embeds"], mask, cache, 0, pad_position=1)   # transformers' generate rule
        else:
            start = index + prefix
            h, cache = lm.run(lm.embed(ids), with_slot_written(mask, start, s), cache, start)
    else:
        if s == 1:
            mask = with_slot_written(mask, index, 1)
        h, cache = lm.decoder(lm.embed(ids), mask, context["cross"], context["encoder_mask"], cache, index)
    return tf.cast(lm.logits(h[:, -1]), tf.float32), cache
