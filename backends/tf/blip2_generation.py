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

from ._base import as_float
from .generation import bucketed_inputs, compiled, decode, pad_batch, result, shape_signature
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


def generation_context(model, pixel_values, text_ids, text_mask, slots=None, interpolate_pos_encoding=False,
                       text_embeds=None, embeds_only=False):
    """Image -> queries -> fused text embeddings (-> T5 encoder); pure TensorFlow, traceable.

    ``slots``: the validated placeholder mask (``model.image_slots(ids)``) on the placeholder path.
    ``text_embeds`` replace the embeddings of ``text_ids``. OPT's context holds the fused prompt
    embeddings and, for what sits in front of the token buffer, its mask ``prefix_mask``: the image
    queries of the concatenation path, or (``embeds_only``: a prompt given as embeddings alone) the
    whole prompt.
    """
    cfg = model.config
    lm = model.language_model
    lm_inputs, _, _ = model._language_inputs(tf.cast(pixel_values, model.dtype), interpolate_pos_encoding)
    embeds = lm.embed(tf.cast(text_ids, tf.int32)) if text_embeds is None else tf.cast(text_embeds, model.dtype)
    mask = tf.cast(text_mask, tf.float32)
    if rules.uses_placeholders(cfg):
        if slots is None:
            raise ValueError("the placeholder path needs the image slots (model.image_slots(input_ids))")
        embeds = fuse_queries(lm_inputs, embeds, slots)
    else:
        embeds = tf.concat([tf.cast(lm_inputs, embeds.dtype), embeds], 1)
        mask = tf.concat([tf.ones([tf.shape(mask)[0], cfg.num_query_tokens], tf.float32), mask], 1)
    if rules.is_decoder_only(cfg):
        if embeds_only:
            return {"embeds": embeds, "prefix_mask": mask}
        if prefix_length(cfg):
            return {"embeds": embeds, "prefix_mask": mask[:, :prefix_length(cfg)]}
        return {"embeds": embeds}
    enc, _ = lm.encoder(embeds, mask)
    return {"cross": lm.decoder.cross_kv(enc), "encoder_mask": mask}


def init_cache(model, rows, total_len: int, prefix: int | None = None):
    """The language model's cache; ``prefix`` slots in front (default: the config's, see ``prefix_length``)."""
    prefix = prefix_length(model.config) if prefix is None else prefix
    return model.language_model.init_cache(rows, prefix + total_len)


def _is_prompt(ids, index) -> bool:
    """The first call: several tokens, or slot 0 known statically (a one-token or empty prompt)."""
    return ids.shape[1] > 1 or tf.get_static_value(index) == 0


def step(model, ids, positions, key_mask, cache, index, context):
    del positions   # OPT derives its own from key_mask (and the prefix); T5 uses relative positions
    lm = model.language_model
    ids = tf.cast(ids, tf.int32)
    mask = tf.cast(key_mask, tf.int32)
    s = ids.shape[1]
    if rules.is_decoder_only(model.config):
        prefix = 0
        if "prefix_mask" in context:
            prefix = context["prefix_mask"].shape[1]
            mask = tf.concat([tf.cast(context["prefix_mask"], mask.dtype), mask], 1)
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


def generate(model, pixel_values, input_ids=None, attention_mask=None, inputs_embeds=None,
             interpolate_pos_encoding=False, **kwargs):
    """``Blip2ForConditionalGeneration.generate``: one XLA program (image -> queries -> fused prompt
    [-> T5 encoder once] -> prefill -> decoding loop), reused for calls with the same shapes and plan.

    Returns transformers' ids: OPT the given ids followed by the new tokens (the new tokens alone for
    a prompt given as ``inputs_embeds`` only), T5 the decoder ids from ``decoder_start_token_id``.
    """
    cfg = model.config
    tc = cfg.text_config
    px = model._pixels(pixel_values, interpolate_pos_encoding)
    b = px.shape[0]
    embeds = None if inputs_embeds is None else as_float(_eager(inputs_embeds), model.dtype, "inputs_embeds")
    ids = None
    if input_ids is not None or embeds is None:
        ids = rules.default_prompt(cfg, b) if input_ids is None else np.asarray(_eager(input_ids))
        ids = model._ids(ids, tc.vocab_size).numpy()
    shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2])
    if shape[0] != b or (embeds is not None and tuple(embeds.shape[:2]) != shape):
        raise ValueError(f"the text batch {shape} and the image batch ({b}) (or inputs_embeds) differ")
    mask = np.ones(shape, np.int32) if attention_mask is None else np.asarray(_eager(attention_mask))
    if mask.shape != shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match the prompt's {shape}")
    slots = _slots(model, ids, embeds)
    cache_prefix = None
    if rules.is_decoder_only(cfg):
        if ids is None:   # as transformers: the prompt is all prefix, the output holds the new tokens alone
            cache_prefix = shape[1] + (0 if rules.uses_placeholders(cfg) else cfg.num_query_tokens)
            prompt, prompt_mask = np.zeros((b, 0), np.int32), np.zeros((b, 0), np.int32)
        else:
            prompt, prompt_mask = ids, mask
        settings = rules.generation_settings(cfg, prompt.shape[1], **kwargs)
        rules.check_opt_positions(cfg, prefix_length(cfg) if cache_prefix is None else cache_prefix,
                                  settings.max_length)
    else:
        start = rules.decoder_start_token_id(cfg, kwargs.pop("decoder_start_token_id", None))
        settings = rules.generation_settings(cfg, 1, **kwargs)
        prompt, prompt_mask = np.full((b, 1), start, np.int32), np.ones((b, 1), np.int32)
    limit = None                 # T5's positions are relative: any buffer fits
    if rules.is_decoder_only(cfg):
        front = prefix_length(cfg) if cache_prefix is None else cache_prefix
        limit = tc.max_position_embeddings - front - prompt.shape[1]
    plan, numbers, seed, padded = bucketed_inputs(settings, tc.vocab_size, b, limit)
    embeds_only = ids is None

    def make_cache(rows, total):
        return init_cache(model, rows, total, cache_prefix)

    def program(inputs, prompt_ids, prompt_mask, seed, numbers):
        pixels, text_ids, text_mask, image_slots, text_embeds = inputs
        context = generation_context(model, pixels, text_ids, text_mask, image_slots, interpolate_pos_encoding,
                                     text_embeds, embeds_only)
        return decode(model.step, context, prompt_ids, prompt_mask, seed, plan, numbers, init_cache=make_cache)

    inputs = (px, tf.zeros(shape, tf.int32) if ids is None else tf.constant(ids, tf.int32),
              tf.constant(mask, tf.int32), tf.constant(np.zeros(shape, bool) if slots is None else slots), embeds)
    inputs, prompt, prompt_mask = pad_batch((inputs, prompt, prompt_mask), b, padded)
    fn = compiled(model, ("blip2", interpolate_pos_encoding, embeds_only, embeds is not None, plan), program,
                  shape_signature((inputs, prompt)))
    out = fn(inputs, tf.constant(prompt, tf.int32), tf.constant(prompt_mask, tf.int32), seed, numbers)
    return result(settings, *out, batch=b)


def _slots(model, ids, embeds):
    """Validated placeholder slots, from the ids or (prompt given as embeddings) from the placeholder's embedding."""
    cfg = model.config
    if ids is not None or not rules.uses_placeholders(cfg):
        return model.image_slots(ids) if ids is not None else None
    ref = tf.cast(model.language_model.embed(cfg.image_token_index), embeds.dtype)
    slots = tf.reduce_all(tf.equal(embeds, ref), axis=-1).numpy()
    rules.check_image_slots(slots.sum(1), cfg)
    return slots


def _eager(x):
    return x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else x
