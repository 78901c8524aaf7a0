"""Export a captioning model as a self-contained TensorFlow SavedModel (pixels in, token ids out).

The SavedModel holds the weights and one serving function running the vision tower, the cached
decoder and the generation loop; it loads with plain ``tf.saved_model.load`` in a process that has
TensorFlow but not this library::

    export_captioner(model, "captioner", max_new_tokens=20, num_beams=3)
    # elsewhere:
    loaded = tf.saved_model.load("captioner")
    ids = loaded.serve(pixel_values)["sequences"]        # int64 (B, L), same as model.generate(...)

The batch dimension is dynamic; height and width are fixed (the config's image size unless given).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from blip_core.generation import resolve_blip_generation

from ._base import for_xla
from .generation import decode, plan_inputs


class _Captioner(tf.Module):
    def __init__(self, model, settings, height: int, width: int, interpolate: bool, jit_compile: bool):
        super().__init__(name="blip_captioner")
        self.params = dict(model.params)   # tracked: the variables are saved with the function
        tc = model.config.text_config
        bos, lm, vision = tc.bos_token_id, model.text_decoder, model.vision_model
        dtype = model.dtype
        plan, numbers, seed = plan_inputs(settings, tc.vocab_size)
        seed = tf.constant([settings.seed or 0, 0], tf.int64)

        def run(pixel_values):
            n = tf.shape(pixel_values)[0]
            img = vision(tf.cast(pixel_values, dtype), interpolate)[0]
            prompt = tf.fill([n, 1], tf.constant(bos, tf.int32))
            context = (lm.bert.cross_kv(img), None)
            seqs, length, _, _, _ = decode(lm.decode_step, context, prompt, tf.ones([n, 1], tf.int32), seed, plan,
                                           numbers)
            return seqs, length

        inner = tf.function(for_xla(run) if jit_compile else run, jit_compile=jit_compile, autograph=False)

        @tf.function(input_signature=[tf.TensorSpec([None, 3, height, width], tf.float32, name="pixel_values")],
                     autograph=False)
        def serve(pixel_values):
            seq, length = inner(pixel_values)
            return {"sequences": tf.cast(seq[:, :length], tf.int64)}

        self.serve = serve


def export_captioner(model, out_dir, max_new_tokens: int = 20, num_beams: int = 1, height: int | None = None,
                     width: int | None = None, jit_compile: bool = True, **generate_kwargs) -> str:
    """Write ``model`` (a ``BlipForConditionalGeneration``) as a SavedModel captioner; returns ``out_dir``.

    Generation options are fixed at export (as ``model.generate(..., **options)`` without a text
    prompt). A size other than the config's image size uses ``interpolate_pos_encoding``.
    ``jit_compile=False`` exports a plain graph for runtimes without XLA.
    """
    if not hasattr(model, "text_decoder") or not hasattr(model, "vision_model") or hasattr(model, "text_encoder"):
        raise ValueError("export_captioner needs a BlipForConditionalGeneration model")
    tc, vc = model.config.text_config, model.config.vision_config
    if generate_kwargs.get("do_sample") and generate_kwargs.get("seed") is None:
        raise ValueError("pass seed=... to export a sampling captioner (the seed is baked into the graph)")
    settings = resolve_blip_generation(tc, 1, max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)
    height, width = int(height or vc.image_size), int(width or vc.image_size)
    interpolate = (height, width) != (vc.image_size, vc.image_size)
    if interpolate and (height % vc.patch_size or width % vc.patch_size):
        raise ValueError(f"height and width must be multiples of patch_size={vc.patch_size}")
    module = _Captioner(model, settings, height, width, interpolate, jit_compile)
    out_dir = os.fspath(out_dir)
    tf.saved_model.save(module, out_dir, signatures={"serving_default": module.serve})
    return out_dir


def load_captioner(path):
    """``tf.saved_model.load`` convenience returning ``fn(pixel_values) -> int64 ids`` (numpy in, tf out)."""
    loaded = tf.saved_model.load(os.fspath(path))
    return lambda pixel_values: loaded.serve(tf.constant(np.asarray(pixel_values, np.float32)))["sequences"]
