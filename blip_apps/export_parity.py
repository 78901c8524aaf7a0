"""``blip export-parity``: an exported artifact against the library, stage by stage and generated ids.

The library model is the checkpoint loaded in the backend that wrote the format (ONNX: torch,
SavedModel: tf, StableHLO: jax), on the parity harness's random inputs
(``converters.inputs.make_inputs``). Float stages pass within the tolerance table
(``blip_core.numerics``); generated ids must be identical. ONNX bundles are checked greedy and
with 3 beams (BLIP-2's rows: ``export_parity_blip2``); SavedModel and StableHLO generators with the options
fixed at export. An artifact exported at another image size gets random pixels of that size and is compared
with the library's ``interpolate_pos_encoding=True`` outputs.
"""
from __future__ import annotations

import os

import numpy as np

from blip_core import to_numpy
from blip_core.numerics import effective_tolerance, max_abs_diff

from .export import FORMATS, read_meta


def _array_row(stage, got, want, dtype):
    want = np.asarray(to_numpy(want), np.float32)
    got = np.asarray(got, np.float32)
    atol, rtol = effective_tolerance(want, "default", dtype)
    ok = got.shape == want.shape and bool(np.allclose(got, want, atol=atol, rtol=rtol))
    diff = max_abs_diff(got, want) if got.shape == want.shape else float("inf")
    return {"stage": stage, "kind": "array", "max_abs_diff": diff, "atol": atol, "rtol": rtol, "ok": ok}


def _ids_row(stage, got, want):
    got, want = np.asarray(got).astype(np.int64), np.asarray(to_numpy(want)).astype(np.int64)
    ok = got.shape == want.shape and bool((got == want).all())
    return {"stage": stage, "kind": "ids", "ok": ok, "shape": list(got.shape)}


def _new_tokens(config, prompt_length=1):
    return max(1, min(8, config.text_config.max_position_embeddings + 1 - prompt_length))


def _onnx(artifact, model, arch, inp, lib):
    from blip_runtime import OnnxBlip
    if arch == "Blip2ForConditionalGeneration":
        from .export_parity_blip2 import onnx_blip2_rows
        return onnx_blip2_rows(OnnxBlip(artifact), model, inp, _array_row, _ids_row)
    runner = OnnxBlip(artifact)
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    rows = []
    if arch != "BlipModel":
        last, pooled = runner.vision(px)
        ref = model.vision_model(px, **lib)
        rows += [_array_row("vision.last_hidden_state", last, ref.last_hidden_state, "float32"),
                 _array_row("vision.pooler_output", pooled, ref.pooler_output, "float32")]
    if arch == "BlipForConditionalGeneration":
        cross = runner.run("cross_kv", encoder_hidden_states=last)
        positions = np.where(mask == 0, 1, np.cumsum(mask, 1) - 1)
        logits, _ = runner.step_function(masked=False)(ids, positions, mask, None, 0, (cross, None))
        want = model.text_decoder(ids, mask, encoder_hidden_states=ref.last_hidden_state, position_ids=positions)
        rows.append(_array_row("decoder_step.logits", logits, want.logits[:, -1], "float32"))
        n = _new_tokens(model.config)
        for beams in (1, 3):
            rows.append(_ids_row(f"generate.num_beams={beams}", runner.generate(px, max_new_tokens=n, num_beams=beams),
                                 model.generate(pixel_values=px, max_new_tokens=n, num_beams=beams, **lib)))
    elif arch == "BlipForQuestionAnswering":
        st = model.stages(ids, px, mask, **lib)
        rows.append(_array_row("question_encoder", runner.question_embeds(ids, px, mask), st["text"], "float32"))
        n = _new_tokens(model.config)
        for beams in (1, 3):
            rows.append(_ids_row(f"generate.num_beams={beams}",
                                 runner.generate(ids, px, mask, max_new_tokens=n, num_beams=beams),
                                 model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n,
                                                num_beams=beams, **lib)))
    elif arch == "BlipForImageTextRetrieval":
        for head, stage in ((True, "itm_score"), (False, "itc_cosine")):
            rows.append(_array_row(stage, runner.itm(ids, px, mask, use_itm_head=head),
                                   model(input_ids=ids, pixel_values=px, attention_mask=mask,
                                         use_itm_head=head, **lib).itm_score, "float32"))
    else:
        rows += [_array_row("image_features", runner.get_image_features(px), model.get_image_features(px, **lib),
                            "float32"),
                 _array_row("text_features", runner.get_text_features(ids, mask), model.get_text_features(ids, mask),
                            "float32")]
    return rows


def _savedmodel(artifact, model, arch, inp, meta, lib):
    import tensorflow as tf
    loaded = tf.saved_model.load(artifact)
    px = tf.constant(inp["pixel_values"], tf.float32)
    ids = tf.constant(np.asarray(inp["input_ids"], np.int64))
    mask = tf.constant(np.asarray(inp["attention_mask"], np.int64))
    options = {k: v for k, v in meta["generation"].items() if k != "prompt_length"}
    dtype = meta["dtype"]
    serve = loaded.signatures.get("serving_default")
    if arch == "BlipForConditionalGeneration":
        return [_ids_row("serving_default.sequences", serve(pixel_values=px)["sequences"].numpy(),
                         model.generate(pixel_values=inp["pixel_values"], **options, **lib))]
    if arch == "Blip2ForConditionalGeneration":
        if ids.shape[1] != meta["generation"]["prompt_length"]:
            raise ValueError(f"this BLIP-2 SavedModel takes prompts of {meta['generation']['prompt_length']} tokens; "
                             f"the parity inputs have {ids.shape[1]}: export with --prompt-length {ids.shape[1]}")
        got = serve(pixel_values=px, input_ids=ids, attention_mask=mask)["sequences"].numpy()
        return [_ids_row("serving_default.sequences", got,
                         model.generate(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"],
                                        attention_mask=inp["attention_mask"], **options, **lib))]
    if arch == "BlipForQuestionAnswering":
        got = serve(pixel_values=px, input_ids=ids, attention_mask=mask)["sequences"].numpy()
        return [_ids_row("serving_default.sequences", got,
                         model.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                                        attention_mask=inp["attention_mask"], **options, **lib))]
    args = dict(pixel_values=px, input_ids=ids, attention_mask=mask)
    if arch == "BlipForImageTextRetrieval":
        kw = dict(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], attention_mask=inp["attention_mask"],
                  **lib)
        return [_array_row("itm.itm_score", loaded.signatures["itm"](**args)["itm_score"].numpy(),
                           model(**kw).itm_score, dtype),
                _array_row("itc.cosine", loaded.signatures["itc"](**args)["cosine"].numpy(),
                           model(**kw, use_itm_head=False).itm_score, dtype)]
    out = model(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], attention_mask=inp["attention_mask"],
                **lib)
    got = loaded.signatures["logits"](**args)
    return [_array_row(f"logits.{k}", got[k].numpy(), out[k], dtype)
            for k in ("logits_per_image", "image_embeds", "text_embeds")]


def _stablehlo(artifact, model, arch, inp, meta, lib):
    from blip_runtime.stablehlo_runner import StableHLOBlip
    runner = StableHLOBlip(artifact)
    px, ids, mask, dtype = inp["pixel_values"], inp["input_ids"], inp["attention_mask"], meta["dtype"]
    options = {k: v for k, v in meta["generation"].items() if k != "prompt_length"}
    if arch == "BlipForConditionalGeneration":
        return [_ids_row("caption.sequences", runner.generate(px), model.generate(pixel_values=px, **options, **lib))]
    if arch == "BlipForQuestionAnswering":
        return [_ids_row("answer.sequences", runner.generate(ids, px, mask),
                         model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, **options, **lib))]
    if arch == "BlipForImageTextRetrieval":
        return [_array_row(stage, runner.itm(ids, px, mask, use_itm_head=head),
                           model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=head,
                                 **lib).itm_score, dtype)
                for head, stage in ((True, "itm.itm_score"), (False, "image_embeds @ text_embeds.T"))]
    if arch == "Blip2ForConditionalGeneration":
        ids, mask = inp["input_ids"], inp["attention_mask"]
        if ids.shape[1] != meta["generation"]["prompt_length"]:
            raise ValueError(f"this BLIP-2 program takes prompts of {meta['generation']['prompt_length']} tokens; "
                             f"the parity inputs have {ids.shape[1]}: export with --prompt-length {ids.shape[1]}")
        return [_ids_row("caption.sequences", runner.generate(px, ids, mask),
                         model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **options, **lib))]
    return [_array_row("image_features", runner.get_image_features(px), model.get_image_features(px, **lib), dtype),
            _array_row("text_features", runner.get_text_features(ids, mask), model.get_text_features(ids, mask),
                       dtype)]


def compare(artifact: str, model_dir: str, seed: int = 0) -> list:
    """One row per stage: ``{"stage", "kind", "ok", ...}`` (arrays: ``max_abs_diff``, ``atol``, ``rtol``)."""
    import blip_apps
    from converters.inputs import make_inputs
    if not os.path.isdir(artifact):
        raise ValueError(f"{artifact}: not an artifact directory")
    meta = read_meta(artifact)
    fmt, arch = meta["format"], meta["architecture"]
    if fmt not in FORMATS:
        raise ValueError(f"{artifact}: unknown format {fmt!r}")
    model = blip_apps.load(model_dir, backend=FORMATS[fmt], dtype=meta["dtype"])
    if type(model).__name__ != arch:
        raise ValueError(f"{artifact} holds a {arch}, {model_dir} a {type(model).__name__}")
    inp = make_inputs(arch, model.config, seed)
    lib = {}
    size = meta.get("image_size", model.config.vision_config.image_size)
    if size != model.config.vision_config.image_size:     # pixels of the artifact's size, interpolated positions
        shape = inp["pixel_values"].shape[:2] + (size, size)
        inp["pixel_values"] = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        lib = {"interpolate_pos_encoding": True}
    if fmt == "onnx":
        return _onnx(artifact, model, arch, inp, lib)
    if fmt == "savedmodel":
        return _savedmodel(artifact, model, arch, inp, meta, lib)
    return _stablehlo(artifact, model, arch, inp, meta, lib)
