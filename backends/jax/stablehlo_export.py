"""Export JAX BLIP programs as serialized StableHLO (``jax.export``): reloadable without Flax or this library.

An artifact directory holds one ``<name>.stablehlo`` per program (``jax.export.Exported.serialize()``
bytes), the weights as ``params.npz`` (the parameter tree's leaves ``p0 ... pN`` in the order the
programs take them), the model's ``config.json`` and processor files, and ``manifest.json``
naming the programs and their inputs. Every program takes ``(leaves, *inputs)``::

    exp = jax.export.deserialize(open("caption.stablehlo", "rb").read())
    leaves = [params[f"p{i}"] for i in range(len(params.files))]
    sequences, length = exp.call(leaves, pixel_values)        # ids = sequences[:, :length]

Programs (batch and text length symbolic; the image size is the config's):

* ``BlipForConditionalGeneration``: ``caption(leaves, pixel_values) -> (sequences (B*R, T) int32,
  length)``: the vision tower, the cross keys/values and the whole decoding loop of the library's
  ``generate`` in one program; generation options are fixed at export.
* ``Blip2ForConditionalGeneration`` (OPT or T5): ``caption(leaves, pixel_values, input_ids,
  attention_mask) -> (sequences, length)``, the prompt length fixed at export (``prompt_length``,
  placeholders included), ids as the library's ``generate`` returns them.
* ``BlipModel``: ``image_features(leaves, pixel_values)`` and ``text_features(leaves, input_ids,
  attention_mask)`` (``get_image_features`` / ``get_text_features``).

``blip_runtime.stablehlo_runner.StableHLOBlip`` runs an artifact with jax and numpy only.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from blip_core import decoding
from blip_core.generation import resolve_blip_generation

FORMAT = "blip-stablehlo"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "preprocessor_config.json")


def _write(exported, out, name):
    with open(os.path.join(out, f"{name}.stablehlo"), "wb") as fh:
        fh.write(exported.serialize())


def export_stablehlo(model, out_dir, processor_dir=None, **generate_kwargs) -> str:
    """Write a JAX ``BlipForConditionalGeneration`` (options as ``generate``'s, fixed at export) or
    ``BlipModel`` as StableHLO programs; returns ``out_dir``."""
    arch = type(model).__name__
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    b, n = jax.export.symbolic_shape("batch, length")
    pixels = jax.ShapeDtypeStruct((b, 3, vc.image_size, vc.image_size), model.dtype)
    manifest = {"format": FORMAT, "version": 1, "architecture": arch, "dtype": str(np.dtype(model.dtype)),
                "programs": {}}

    def params_of(flat):
        return jax.tree_util.tree_unflatten(treedef, flat)

    if arch == "BlipForConditionalGeneration":
        settings = resolve_blip_generation(tc, 1, **generate_kwargs)
        if settings.do_sample and settings.seed is None:
            raise ValueError("pass seed=... to export a sampling captioner (the seed is baked into the program)")
        plan, numbers = decoding.make_plan(settings, tc.vocab_size)

        def caption(flat, pv):
            rows = pv.shape[0]
            prompt = jnp.full((rows, 1), tc.bos_token_id, jnp.int32)
            seqs, length, _, _, _ = model._generate_program(
                params_of(flat), pv, prompt, jnp.ones((rows, 1), jnp.int32), None, None,
                jax.random.key(settings.seed or 0), {k: jnp.asarray(v) for k, v in numbers.items()}, plan=plan,
                interpolate=False)
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
                interpolate=False)
            return seqs, length

        text = jax.ShapeDtypeStruct((b, prompt_length), jnp.int32)
        _write(jax.export.export(jax.jit(caption))(leaf_specs, pixels, text, text), out, "caption")
        manifest["programs"]["caption"] = {"inputs": ["pixel_values", "input_ids", "attention_mask"],
                                           "outputs": ["sequences", "length"]}
        manifest["generation"] = dict(generate_kwargs, prompt_length=prompt_length)
    elif arch == "BlipModel":
        if generate_kwargs:
            raise ValueError(f"generation options do not apply to {arch}")
        ids = jax.ShapeDtypeStruct((b, n), jnp.int32)

        def image_features(flat, pv):
            return model._features(params_of(flat), pv, None, None, None, False, "image")

        def text_features(flat, input_ids, attention_mask):
            return model._features(params_of(flat), None, input_ids, attention_mask, None, False, "text")

        _write(jax.export.export(jax.jit(image_features))(leaf_specs, pixels), out, "image_features")
        _write(jax.export.export(jax.jit(text_features))(leaf_specs, ids, ids), out, "text_features")
        manifest["programs"]["image_features"] = {"inputs": ["pixel_values"], "outputs": ["image_features"]}
        manifest["programs"]["text_features"] = {"inputs": ["input_ids", "attention_mask"],
                                                 "outputs": ["text_features"]}
    else:
        raise ValueError(f"StableHLO export supports BlipForConditionalGeneration, Blip2ForConditionalGeneration "
                         f"and BlipModel; got {arch}")
    np.savez(os.path.join(out, "params.npz"), **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
    cfg.save_pretrained(out)
    if processor_dir is not None:
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(processor_dir, name)):
                shutil.copyfile(os.path.join(processor_dir, name), os.path.join(out, name))
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return out
