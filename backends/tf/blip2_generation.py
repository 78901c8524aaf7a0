"""BLIP-2 generation in TensorFlow: the model side of the decoding engine's contract, and ``generate``.

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

import numpy as np
import tensorflow as tf

from blip_core import blip2 as rules

from .generation import compiled, decode, plan_inputs, result
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


def generate(model, pixel_values, input_ids=None, attention_mask=None, interpolate_pos_encoding=False, **kwargs):
    """``Blip2ForConditionalGeneration.generate``: one XLA program (image -> queries -> fused prompt
    [-> T5 encoder once] -> prefill -> decoding loop), reused for calls with the same shapes and plan.

    Returns transformers' ids: OPT the given ids followed by the new tokens, T5 the decoder ids from
    ``decoder_start_token_id``.
    """
    cfg = model.config
    tc = cfg.text_config
    px = model._pixels(pixel_values, interpolate_pos_encoding)
    b = px.shape[0]
    ids = rules.default_prompt(cfg, b) if input_ids is None else np.asarray(_eager(input_ids))
    ids = model._ids(ids, tc.vocab_size).numpy()
    if ids.shape[0] != b:
        raise ValueError(f"the text batch ({ids.shape[0]}) and the image batch ({b}) differ")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(_eager(attention_mask))
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    slots = model.image_slots(ids)
    if rules.is_decoder_only(cfg):
        settings = rules.generation_settings(cfg, ids.shape[1], **kwargs)
        prompt, prompt_mask = ids, mask
        needed = prefix_length(cfg) + settings.max_length
        if needed > tc.max_position_embeddings:
            raise ValueError(f"the image queries, prompt and new tokens need {needed} positions but OPT has only "
                             f"max_position_embeddings={tc.max_position_embeddings}")
    else:
        start = rules.decoder_start_token_id(cfg, kwargs.pop("decoder_start_token_id", None))
        settings = rules.generation_settings(cfg, 1, **kwargs)
        prompt, prompt_mask = np.full((b, 1), start, np.int32), np.ones((b, 1), np.int32)
    plan, numbers, seed = plan_inputs(settings, tc.vocab_size)

    def program(inputs, prompt_ids, prompt_mask, seed, numbers):
        pixels, text_ids, text_mask, image_slots = inputs
        context = generation_context(model, pixels, text_ids, text_mask, image_slots, interpolate_pos_encoding)
        return decode(model.step, context, prompt_ids, prompt_mask, seed, plan, numbers, init_cache=model.init_cache)

    fn = compiled(model, ("blip2", interpolate_pos_encoding, plan), program)
    inputs = (px, tf.constant(ids, tf.int32), tf.constant(mask, tf.int32),
              tf.constant(np.zeros(ids.shape, bool) if slots is None else slots))
    out = fn(inputs, tf.constant(prompt, tf.int32), tf.constant(prompt_mask, tf.int32), seed, numbers)
    return result(settings, *out)


def _eager(x):
    return x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else x
