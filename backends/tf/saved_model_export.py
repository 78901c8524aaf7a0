"""SavedModels of the BLIP tasks beyond captioning (``export.py``): VQA, ITM/ITC retrieval, embeddings.

Each SavedModel holds the weights and plain serving functions; it loads with ``tf.saved_model.load``
in a process that has TensorFlow but not this library. Signatures (batch and text length dynamic,
image size the config's or ``image_size`` given at export, which resizes the position table as
``interpolate_pos_encoding=True`` does; ids and masks int64, pixels float32 NCHW):

* VQA (``BlipForQuestionAnswering``), generation options fixed at export:
  ``serving_default(pixel_values, input_ids, attention_mask) -> {"sequences": int64 (B, L)}``
  (the answer ids, starting with bos, as ``model.generate``).
* Retrieval (``BlipForImageTextRetrieval``):
  ``serving_default`` = ``itm(pixel_values, input_ids, attention_mask) -> {"itm_score": (B, 2)}``;
  ``itc(pixel_values, input_ids, attention_mask) -> {"cosine": (B_img, B_txt)}``;
  ``image_embeds(pixel_values) -> {"image_feat": (B, P)}`` and
  ``text_embeds(input_ids, attention_mask) -> {"text_feat": (B, P)}`` (normalised projections).
* Embeddings (``BlipModel``): ``serving_default`` = ``logits(pixel_values, input_ids, attention_mask)
  -> {"logits_per_image": (B_img, B_txt), "image_embeds", "text_embeds"}`` (normalised);
  ``image_features(pixel_values) -> {"image_features"}``, ``text_features(input_ids,
  attention_mask) -> {"text_features"}`` (``get_image_features`` / ``get_text_features``).

Example::

    export_saved_model(model, "vqa_sm", max_new_tokens=10, num_beams=3)
    loaded = tf.saved_model.load("vqa_sm")
    ids = loaded.signatures["serving_default"](pixel_values=px, input_ids=q, attention_mask=m)["sequences"]
"""
from __future__ import annotations

import os

import tensorflow as tf

from blip_core.artifact_files import export_image_size
from blip_core.generation import resolve_blip_generation

from ._base import for_xla, padding_bias
from .blip import _normalize
from .export import export_captioner
from .generation import decode, plan_inputs
from .text import run_text


def _specs(height, width):
    return (tf.TensorSpec([None, 3, height, width], tf.float32, name="pixel_values"),
            tf.TensorSpec([None, None], tf.int64, name="input_ids"),
            tf.TensorSpec([None, None], tf.int64, name="attention_mask"))


def _text(ids, mask):
    return tf.cast(ids, tf.int32), tf.cast(mask, tf.float32)


class _Answerer(tf.Module):
    def __init__(self, model, settings, jit_compile: bool, size: int, interpolate: bool):
        super().__init__(name="blip_vqa")
        self.params = dict(model.params)
        tc = model.config.text_config
        lm, dtype = model.text_decoder, model.dtype
        plan, numbers, _ = plan_inputs(settings, tc.vocab_size)
        seed = tf.constant([settings.seed or 0, 0], tf.int64)

        def run(pixel_values, input_ids, attention_mask):
            ids, mask = _text(input_ids, attention_mask)
            _, question = model._question(tf.cast(pixel_values, dtype), ids, mask, interpolate)
            n = tf.shape(ids)[0]
            context = (lm.bert.cross_kv(question), padding_bias(mask))
            prompt = tf.fill([n, 1], tf.constant(tc.bos_token_id, tf.int32))
            seqs, length, _, _, _ = decode(lm.decode_step, context, prompt, tf.ones([n, 1], tf.int32), seed, plan,
                                           numbers)
            return seqs, length

        inner = tf.function(for_xla(run) if jit_compile else run, jit_compile=jit_compile, autograph=False)

        @tf.function(input_signature=_specs(size, size), autograph=False)
        def serve(pixel_values, input_ids, attention_mask):
            seq, length = inner(pixel_values, input_ids, attention_mask)
            return {"sequences": tf.cast(seq[:, :length], tf.int64)}

        self.serve = serve


class _Matcher(tf.Module):
    def __init__(self, model, size: int, interpolate: bool):
        super().__init__(name="blip_retrieval")
        self.params = dict(model.params)
        px_spec, ids_spec, mask_spec = _specs(size, size)

        def image(pixel_values):
            return model.vision_model(tf.cast(pixel_values, model.dtype), interpolate)[0]

        def image_feat(pixel_values):
            return _normalize(model.vision_proj(image(pixel_values)[:, 0]))

        def text_feat(input_ids, attention_mask):
            text, _ = run_text(model.text_encoder, *_text(input_ids, attention_mask), None, None, False)
            return _normalize(model.text_proj(text[:, 0]))

        @tf.function(input_signature=(px_spec, ids_spec, mask_spec), autograph=False)
        def itm(pixel_values, input_ids, attention_mask):
            ids, mask = _text(input_ids, attention_mask)
            text, _ = run_text(model.text_encoder, ids, mask, image(pixel_values), None, False)
            return {"itm_score": model.itm_head(text[:, 0])}

        @tf.function(input_signature=(px_spec, ids_spec, mask_spec), autograph=False)
        def itc(pixel_values, input_ids, attention_mask):
            return {"cosine": tf.matmul(image_feat(pixel_values), text_feat(input_ids, attention_mask), transpose_b=True)}

        @tf.function(input_signature=(px_spec,), autograph=False)
        def image_embeds(pixel_values):
            return {"image_feat": image_feat(pixel_values)}

        @tf.function(input_signature=(ids_spec, mask_spec), autograph=False)
        def text_embeds(input_ids, attention_mask):
            return {"text_feat": text_feat(input_ids, attention_mask)}

        self.itm, self.itc, self.image_embeds, self.text_embeds = itm, itc, image_embeds, text_embeds
        self.serve = itm


class _Embedder(tf.Module):
    def __init__(self, model, size: int, interpolate: bool):
        super().__init__(name="blip_embed")
        self.params = dict(model.params)
        px_spec, ids_spec, mask_spec = _specs(size, size)

        def image(pixel_values):
            return model.visual_projection(model.vision_model(tf.cast(pixel_values, model.dtype), interpolate)[1])

        def text(input_ids, attention_mask):
            ids, mask = _text(input_ids, attention_mask)
            return model.text_projection(run_text(model.text_model, ids, mask, None, None, False)[1])

        @tf.function(input_signature=(px_spec,), autograph=False)
        def image_features(pixel_values):
            return {"image_features": image(pixel_values)}

        @tf.function(input_signature=(ids_spec, mask_spec), autograph=False)
        def text_features(input_ids, attention_mask):
            return {"text_features": text(input_ids, attention_mask)}

        @tf.function(input_signature=(px_spec, ids_spec, mask_spec), autograph=False)
        def logits(pixel_values, input_ids, attention_mask):
            image_embeds = _normalize(image(pixel_values))
            text_embeds = _normalize(text(input_ids, attention_mask))
            scores = tf.matmul(image_embeds, text_embeds, transpose_b=True) * tf.exp(model.logit_scale)
            return {"logits_per_image": scores, "image_embeds": image_embeds, "text_embeds": text_embeds}

        self.image_features, self.text_features, self.logits = image_features, text_features, logits
        self.serve = logits


def export_saved_model(model, out_dir, jit_compile: bool = True, image_size: int | None = None,
                       **generate_kwargs) -> str:
    """Write a TF BLIP model as a SavedModel with the signatures of its task (module docstring);
    captioners go through ``export.export_captioner``. ``image_size``: the square pixel size the
    signatures take (default: the config's). Returns ``out_dir``."""
    arch = getattr(model, "architecture", type(model).__name__)
    out_dir = os.fspath(out_dir)
    vc = model.config.vision_config
    size = export_image_size(vc, image_size)
    interpolate = size != vc.image_size
    if arch == "BlipForConditionalGeneration":
        return export_captioner(model, out_dir, jit_compile=jit_compile, height=size, width=size, **generate_kwargs)
    if arch == "BlipForQuestionAnswering":
        if generate_kwargs.get("do_sample") and generate_kwargs.get("seed") is None:
            raise ValueError("pass seed=... to export a sampling model (the seed is baked into the graph)")
        settings = resolve_blip_generation(model.config.text_config, 1, **generate_kwargs)
        module = _Answerer(model, settings, jit_compile, size, interpolate)
        signatures = {"serving_default": module.serve}
    elif generate_kwargs:
        raise ValueError(f"generation options do not apply to {arch}: {', '.join(sorted(generate_kwargs))}")
    elif arch == "BlipForImageTextRetrieval":
        module = _Matcher(model, size, interpolate)
        signatures = {"serving_default": module.itm, "itm": module.itm, "itc": module.itc,
                      "image_embeds": module.image_embeds, "text_embeds": module.text_embeds}
    elif arch == "BlipModel":
        module = _Embedder(model, size, interpolate)
        signatures = {"serving_default": module.logits, "logits": module.logits,
                      "image_features": module.image_features, "text_features": module.text_features}
    else:
        raise ValueError(f"SavedModel export supports the BLIP task models and BLIP-2 captioning "
                         f"(blip2_export.py); got {arch}")
    tf.saved_model.save(module, out_dir, signatures=signatures)
    return out_dir
