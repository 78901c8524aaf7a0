"""Export JAX BLIP programs as serialized StableHLO (``jax.export``): reloadable without Flax or this library.

An artifact directory holds one ``<name>.stablehlo`` per program (``jax.export.Exported.serialize()``
bytes), the weights as ``params.npz`` (the parameter tree's leaves ``p0 ... pN`` in the order the
programs take them), the model's ``config.json`` and processor files, and ``manifest.json``
naming the programs and their inputs. Every program takes ``(leaves, *inputs)``::

    exp = jax.export.deserialize(open("caption.stablehlo", "rb").read())
    leaves = [params[f"p{i}"] for i in range(len(params.files))]
    sequences, length = exp.call(leaves, pixel_values)        # ids = sequences[:, :length]

Programs (batch and text length symbolic; the image size is the config's, or ``image_size`` given at
export, which runs the library's ``interpolate_pos_encoding`` inside the program):

* ``BlipForConditionalGeneration``: ``caption(leaves, pixel_values) -> (sequences (B*R, T) int32,
  length)``: the vision tower, the cross keys/values and the whole decoding loop of the library's
  ``generate`` in one program; generation options are fixed at export.
* ``Blip2ForConditionalGeneration`` (OPT or T5): ``caption(leaves, pixel_values, input_ids,
  attention_mask) -> (sequences, length)``, the prompt length fixed at export (``prompt_length``,
  placeholders included), ids as the library's ``generate`` returns them.
* ``BlipForQuestionAnswering``: ``answer(leaves, pixel_values, input_ids, attention_mask) -> (sequences,
  length)``: vision tower, question encoder, the decoder's cross keys/values of the question and the
  decoding loop of the library's VQA ``generate`` (options fixed at export; the question mask is
  applied to the decoder's cross-attention, as the library does).
* ``BlipForImageTextRetrieval``: ``itm(leaves, pixel_values, input_ids, attention_mask) -> itm_score (B, 2)``;
  ``image_embeds(leaves, pixel_values) -> (B, P)`` and ``text_embeds(leaves, input_ids, attention_mask) ->
  (B, P)``, the normalised ITC projections (their product is ``use_itm_head=False``'s cosine).
* ``BlipModel``: ``image_features(leaves, pixel_values)`` and ``text_features(leaves, input_ids,
  attention_mask)`` (``get_image_features`` / ``get_text_features``).

``blip_runtime.stablehlo_runner.StableHLOBlip`` runs an artifact with jax and numpy only.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from blip_core import decoding
from blip_core.artifact_files import copy_processor_files, export_image_size
from blip_core.generation import resolve_blip_generation

from ._base import float32_products

FORMAT = "blip-stablehlo"
ARCHITECTURES = ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel",
                 "Blip2ForConditionalGeneration")


def _write(exported, out, name):
    with open(os.path.join(out, f"{name}.stablehlo"), "wb") as fh:
        fh.write(exported.serialize())


def _search(settings, vocab_size):
    if settings.do_sample and settings.seed is None:
        raise ValueError("pass seed=... to export a sampling model (the seed is baked into the program)")
    plan, numbers = decoding.make_plan(settings, vocab_size)
    return plan, lambda: {k: jnp.asarray(v) for k, v in numbers.items()}, jax.random.key(settings.seed or 0)


def export_stablehlo(model, out_dir, processor_dir=None, image_size: int | None = None, **generate_kwargs) -> str:
    """Write a JAX BLIP task model (captioning, VQA: options as ``generate``'s, fixed at export; retrieval;
    ``BlipModel``) or BLIP-2 captioner as StableHLO programs; returns ``out_dir``. ``image_size``: the
    square pixel size the programs take (default the config's; another size interpolates the position
    table as ``interpolate_pos_encoding=True`` does). A float32 model's programs multiply in float32
    (``_base.float32_products``), as its own calls do."""
    with float32_products(model.dtype):
        return _export_stablehlo(model, out_dir, processor_dir, image_size, **generate_kwargs)


def _export_stablehlo(model, out_dir, processor_dir, image_size, **generate_kwargs) -> str:
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ValueError(f"StableHLO export supports {', '.join(ARCHITECTURES)}; got {arch}")
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    size = export_image_size(vc, image_size)
    interpolate = size != vc.image_size
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    b, n = jax.export.symbolic_shape("batch, length")
    pixels = jax.ShapeDtypeStruct((b, 3, size, size), model.dtype)
    ids_spec = jax.ShapeDtypeStruct((b, n), jnp.int32)
    manifest = {"format": FORMAT, "version": 1, "architecture": arch, "dtype": str(np.dtype(model.dtype)),
                "image_size": size, "programs": {}}

    def params_of(flat):
        return jax.tree_util.tree_unflatten(treedef, flat)

    if arch == "BlipForConditionalGeneration":
        plan, numbers, key = _search(resolve_blip_generation(tc, 1, **generate_kwargs), tc.vocab_size)

        def caption(flat, pv):
            rows = pv.shape[0]
            prompt = jnp.full((rows, 1), tc.bos_token_id, jnp.int32)
            seqs, length, _, _, _ = model._generate_program(
                params_of(flat), pv, prompt, jnp.ones((rows, 1), jnp.int32), None, None, key, numbers(), plan=plan,
                interpolate=interpolate)
            return seqs, length

        _write(jax.export.export(jax.jit(caption))(leaf_specs, pixels), out, "caption")
        manifest["programs"]["caption"] = {"inputs": ["pixel_values"], "outputs": ["sequences", "length"]}
        manifest["generation"] = {k: v for k, v in generate_kwargs.items()}
    elif arch == "Blip2ForConditionalGeneration":
        from blip_core import blip2 as rules
        prompt_length = generate_kwargs.pop("prompt_length", None)
        if prompt_length is None:
            raise ValueError("BLIP-2 programs take prompts of one length: pass prompt_length (placeholders included)")
        decoder_only = model.is_decoder_only
        settings = rules.generation_settings(cfg, prompt_length if decoder_only else 1, **generate_kwargs)
        if settings.do_sample and settings.seed is None:
            raise ValueError("pass seed=... to export a sampling captioner (the seed is baked into the program)")
        plan, numbers = decoding.make_plan(settings, tc.vocab_size)
        start = None if decoder_only else rules.decoder_start_token_id(cfg)

        def caption(flat, pv, input_ids, attention_mask):
            if decoder_only:
                prompt, prompt_mask = input_ids, attention_mask
            else:
                prompt = jnp.full((pv.shape[0], 1), start, jnp.int32)
                prompt_mask = jnp.ones_like(prompt)
            seqs, length, _, _, _ = model._generate_program(
                params_of(flat), pv, input_ids, None, attention_mask, prompt, prompt_mask,
                jax.random.key(settings.seed or 0), {k: jnp.asarray(v) for k, v in numbers.items()}, plan=plan,
                interpolate=interpolate)
            return seqs, length

        text = jax.ShapeDtypeStruct((b, prompt_length), jnp.int32)
        _write(jax.export.export(jax.jit(caption))(leaf_specs, pixels, text, text), out, "caption")
        manifest["programs"]["caption"] = {"inputs": ["pixel_values", "input_ids", "attention_mask"],
                                           "outputs": ["sequences", "length"]}
        manifest["generation"] = dict(generate_kwargs, prompt_length=prompt_length)
    elif arch == "BlipForQuestionAnswering":
        plan, numbers, key = _search(resolve_blip_generation(tc, 1, **generate_kwargs), tc.vocab_size)

        def answer(flat, pv, input_ids, attention_mask):
            rows = pv.shape[0]
            bos = jnp.full((rows, 1), tc.bos_token_id, jnp.int32)
            seqs, length, _, _, _ = model._generate_program(
                params_of(flat), pv, bos, jnp.ones((rows, 1), jnp.int32), input_ids, attention_mask, key, numbers(),
                plan=plan, interpolate=interpolate)
            return seqs, length

        _write(jax.export.export(jax.jit(answer))(leaf_specs, pixels, ids_spec, ids_spec), out, "answer")
        manifest["programs"]["answer"] = {"inputs": ["pixel_values", "input_ids", "attention_mask"],
                                          "outputs": ["sequences", "length"]}
        manifest["generation"] = dict(generate_kwargs)
    elif arch == "BlipForImageTextRetrieval":
        if generate_kwargs:
            raise ValueError(f"generation options do not apply to {arch}")
        from .blip import _normalize
        from .text import encode_text

        def itm(flat, pv, input_ids, attention_mask):
            return model._forward(params_of(flat), pv, input_ids, attention_mask, interpolate=interpolate,
                                  use_itm_head=True)["itm_score"]

        def image_embeds(flat, pv):
            return model._apply(params_of(flat), pv, method=lambda m, x: _normalize(
                m.vision_proj(m.vision_model(x, interpolate)[0][:, 0])))

        def text_embeds(flat, input_ids, attention_mask):
            return model._apply(params_of(flat), input_ids, attention_mask, method=lambda m, i, a: _normalize(
                m.text_proj(encode_text(m.text_encoder, i, a, False, dtype=model.dtype)[0][:, 0])))

        _write(jax.export.export(jax.jit(itm))(leaf_specs, pixels, ids_spec, ids_spec), out, "itm")
        _write(jax.export.export(jax.jit(image_embeds))(leaf_specs, pixels), out, "image_embeds")
        _write(jax.export.export(jax.jit(text_embeds))(leaf_specs, ids_spec, ids_spec), out, "text_embeds")
        manifest["programs"]["itm"] = {"inputs": ["pixel_values", "input_ids", "attention_mask"],
                                       "outputs": ["itm_score"]}
        manifest["programs"]["image_embeds"] = {"inputs": ["pixel_values"], "outputs": ["image_feat"]}
        manifest["programs"]["text_embeds"] = {"inputs": ["input_ids", "attention_mask"], "outputs": ["text_feat"]}
    else:   # BlipModel
        if generate_kwargs:
            raise ValueError(f"generation options do not apply to {arch}")

        def image_features(flat, pv):
            return model._features(params_of(flat), pv, None, None, None, interpolate, "image")

        def text_features(flat, input_ids, attention_mask):
            return model._features(params_of(flat), None, input_ids, attention_mask, None, False, "text")

        _write(jax.export.export(jax.jit(image_features))(leaf_specs, pixels), out, "image_features")
        _write(jax.export.export(jax.jit(text_features))(leaf_specs, ids_spec, ids_spec), out, "text_features")
        manifest["programs"]["image_features"] = {"inputs": ["pixel_values"], "outputs": ["image_features"]}
        manifest["programs"]["text_features"] = {"inputs": ["input_ids", "attention_mask"],
                                                 "outputs": ["text_features"]}
    np.savez(os.path.join(out, "params.npz"), **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
    cfg.save_pretrained(out)
    copy_processor_files(processor_dir, out, size if interpolate else None)
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return out
