"""Export BLIP-2 captioning (OPT or T5) as a self-contained TensorFlow SavedModel: image + prompt ids in,
token ids out.

The SavedModel holds the weights and one serving function running the vision tower, the Q-Former,
the image-query fusion, (T5) the encoder, and the generation loop of ``generation.py``; it loads with
plain ``tf.saved_model.load`` in a process that has TensorFlow but not this library::

    export_blip2_captioner(model, "captioner", prompt_length=ids.shape[1], max_new_tokens=20, num_beams=3)
    # elsewhere:
    loaded = tf.saved_model.load("captioner")
    out = loaded.serve(pixel_values=pixels, input_ids=ids, attention_mask=mask)["sequences"]   # int64

The batch is dynamic; the image size and the prompt length are fixed at export. Ids are those of
``model.generate`` (OPT: the prompt + new tokens; T5: decoder ids from ``decoder_start_token_id``).
Prompts without the image placeholders fail with an ``InvalidArgumentError`` naming them.
"""
from __future__ import annotations

import os

import tensorflow as tf

from blip_core import blip2 as rules

from .blip2_generation import generation_context, prefix_length
from ._base import for_xla
from .generation import decode, plan_inputs


class _Blip2Captioner(tf.Module):
    def __init__(self, model, settings, start, height, width, prompt_length, interpolate, jit_compile):
        super().__init__(name="blip2_captioner")
        self.params = dict(model.params)   # tracked: the variables are saved with the function
        cfg = model.config
        vocab = cfg.text_config.vocab_size
        plan, numbers, _ = plan_inputs(settings, vocab)
        seed = tf.constant([settings.seed or 0, 0], tf.int64)

        def run(pixel_values, ids, attention_mask, slots):
            context = generation_context(model, pixel_values, ids, attention_mask, slots, interpolate)
            if start is None:
                prompt, prompt_mask = ids, tf.cast(attention_mask, tf.int32)
            else:
                prompt = tf.fill([tf.shape(ids)[0], 1], tf.constant(start, tf.int32))
                prompt_mask = tf.ones_like(prompt)
            seqs, length, _, _, _ = decode(model.step, context, prompt, prompt_mask, seed, plan, numbers,
                                           init_cache=model.init_cache)
            return seqs, length

        inner = tf.function(for_xla(run) if jit_compile else run, jit_compile=jit_compile, autograph=False)
        signature = [tf.TensorSpec([None, 3, height, width], tf.float32, name="pixel_values"),
                     tf.TensorSpec([None, prompt_length], tf.int64, name="input_ids"),
                     tf.TensorSpec([None, prompt_length], tf.int64, name="attention_mask")]

        @tf.function(input_signature=signature, autograph=False)
        def serve(pixel_values, input_ids, attention_mask):
            # the checks run here, outside the XLA program (XLA drops assertions)
            ids = tf.cast(input_ids, tf.int32)
            checks = [tf.debugging.assert_non_negative(ids, message="input_ids must be >= 0"),
                      tf.debugging.assert_less(ids, vocab, message=f"input_ids must be < vocab_size={vocab}")]
            with tf.control_dependencies(checks):
                ids = tf.identity(ids)
            slots = model.image_slots(ids)   # a graph assertion on the placeholder count
            if slots is None:
                slots = tf.zeros(tf.shape(ids), tf.bool)
            seqs, length = inner(pixel_values, ids, attention_mask, slots)
            return {"sequences": tf.cast(seqs[:, :length], tf.int64)}

        self.serve = serve


def export_blip2_captioner(model, out_dir, prompt_length: int, max_new_tokens: int = 20, num_beams: int = 1,
                           height: int | None = None, width: int | None = None, jit_compile: bool = True,
                           **generate_kwargs) -> str:
    """Write ``model`` (a ``Blip2ForConditionalGeneration``) as a SavedModel captioner; returns ``out_dir``.

    ``prompt_length``: the length of the ``input_ids`` the captioner takes (placeholders included on
    the placeholder path). Generation options are fixed at export, as ``model.generate(**options)``.
    A size other than the config's image size uses ``interpolate_pos_encoding``.
    """
    if type(model).__name__ != "Blip2ForConditionalGeneration" or not hasattr(model, "step"):
        raise ValueError("export_blip2_captioner needs a Blip2ForConditionalGeneration model")
    cfg, vc = model.config, model.config.vision_config
    if generate_kwargs.get("do_sample") and generate_kwargs.get("seed") is None:
        raise ValueError("pass seed=... to export a sampling captioner (the seed is baked into the graph)")
    options = dict(generate_kwargs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if rules.is_decoder_only(cfg):
        start = None
        settings = rules.generation_settings(cfg, prompt_length, **options)
        rules.check_opt_positions(cfg, prefix_length(cfg), settings.max_length)
    else:
        start = rules.decoder_start_token_id(cfg, options.pop("decoder_start_token_id", None))
        settings = rules.generation_settings(cfg, 1, **options)
    if rules.uses_placeholders(cfg) and prompt_length < cfg.num_query_tokens:
        raise ValueError(f"prompt_length={prompt_length} cannot hold the num_query_tokens={cfg.num_query_tokens} "
                         f"image placeholders")
    height, width = int(height or vc.image_size), int(width or vc.image_size)
    interpolate = (height, width) != (vc.image_size, vc.image_size)
    if interpolate and (height % vc.patch_size or width % vc.patch_size):
        raise ValueError(f"height and width must be multiples of patch_size={vc.patch_size}")
    module = _Blip2Captioner(model, settings, start, height, width, int(prompt_length), interpolate, jit_compile)
    out_dir = os.fspath(out_dir)
    tf.saved_model.save(module, out_dir, signatures={"serving_default": module.serve})
    return out_dir
