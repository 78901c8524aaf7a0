"""Export BLIP models from the torch backend as ONNX graphs that run without this library's backends.

A model is cut into the pieces a runtime drives itself (``blip_runtime.onnx_runner`` does it with
numpy, ``tokenizers`` and onnxruntime only, using the library's decoding rules):

* ``vision.onnx``: ``pixel_values`` (B, 3, H, W) -> ``last_hidden_state`` (B, N, D), ``pooler_output`` (B, D).
* ``decoder_cross_kv.onnx`` (captioning, VQA): the cross-attention keys and values of every decoder
  layer, computed once per image (or question): ``encoder_hidden_states`` (B, S, E) ->
  ``cross_key_{i}``, ``cross_value_{i}`` (B, heads, S, head_dim).
* ``decoder_step.onnx``: one cached decoder call: ``input_ids``, ``position_ids`` (N, s),
  ``attention_mask`` (N, past + s) over the whole sequence so far, [``encoder_attention_mask`` (N, S),
  VQA only], ``past_key_{i}``, ``past_value_{i}`` (N, heads, past, head_dim; ``past`` = 0 on the
  prompt call), ``cross_key_{i}``, ``cross_value_{i}`` -> ``logits`` (N, V) of the last position and
  ``present_key_{i}``, ``present_value_{i}`` (N, heads, past + s, head_dim).
* ``question_encoder.onnx`` (VQA): ``input_ids``, ``attention_mask``, ``image_embeds`` -> ``question_embeds``.
* ``itm.onnx`` (retrieval): ``input_ids``, ``attention_mask``, ``image_embeds`` -> ``itm_score`` (B, 2).
* ``text_embeds.onnx`` / ``image_embeds.onnx`` (retrieval ITC): normalised ``text_proj(text[:, 0])``
  from ``input_ids``, ``attention_mask``; normalised ``vision_proj(image[:, 0])`` from ``image_embeds``.
* ``text_features.onnx`` / ``image_features.onnx`` (``BlipModel``): ``get_text_features`` from
  ``input_ids``, ``attention_mask``; ``get_image_features`` from ``pixel_values``.
* ``Blip2ForConditionalGeneration`` (OPT or T5): the graphs of ``onnx_export_blip2``.

Batch and sequence axes are dynamic; the image size is the config's, or ``image_size`` given at export
(the position table resized once at export by the library's ``interpolate_pos_encoding``, so
``vision.onnx`` takes that size only; the bundle's preprocessor config resizes to it). The graphs are traced with
the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript`` and handles the
zero-length ``past`` axis of the prompt call, which the dynamo exporter specialises away. The
graph modules call the backend's own layers, so the maths is the library's.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.artifact_files import copy_processor_files, export_image_size
from blip_core.numerics import NORM_EPS

OPSET = 17
FORMAT = "blip-onnx"
TASKS = {"BlipForConditionalGeneration": "caption", "BlipForQuestionAnswering": "vqa",
         "BlipForImageTextRetrieval": "itm", "BlipModel": "embed",
         "Blip2ForConditionalGeneration": "caption"}     # BLIP-2: onnx_export_blip2.py


def _embeddings_at(embeddings, size: int):
    """The vision embeddings taking ``size`` x ``size`` pixels: a copy holding the position table the
    library's ``interpolate_pos_encoding`` computes for that size (computed once, here)."""
    n = (size // embeddings.patch_size) ** 2
    if n + 1 == embeddings.position_embedding.shape[1]:
        return embeddings
    out = copy.copy(embeddings)
    out._parameters = dict(embeddings._parameters)     # the copy's own table; the model keeps its own
    with torch.no_grad():
        out.position_embedding = nn.Parameter(embeddings.interpolate_pos_encoding(n, size, size).clone())
    return out


class VisionGraph(nn.Module):
    def __init__(self, vision, image_size: int | None = None):
        super().__init__()
        self.vision = vision
        self.embeddings = _embeddings_at(vision.embeddings, image_size or vision.config.image_size)

    def forward(self, pixel_values):
        v = self.vision
        last = v.post_layernorm(v.encoder(self.embeddings(pixel_values)).last_hidden_state)
        return last, v.post_layernorm(last[:, 0])


class TextEncoderGraph(nn.Module):
    """Bidirectional text tower (optionally cross-attending ``image_embeds``) and a head on its states."""

    def __init__(self, bert, head=None, cross: bool = True):
        super().__init__()
        self.bert, self.head, self.cross = bert, head, cross

    def encode(self, input_ids, attention_mask, image_embeds=None):
        bert = self.bert
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        x = bert.embeddings(input_ids, positions)
        mask = bert._self_mask(attention_mask, n, None, False, x.dtype)
        for i, layer in enumerate(bert.encoder.layer):
            x = layer(x, mask, image_embeds, None, None, i)[0]
        return x

    def forward(self, input_ids, attention_mask, image_embeds=None):
        x = self.encode(input_ids, attention_mask, image_embeds if self.cross else None)
        return x if self.head is None else self.head(x)


class CrossKVGraph(nn.Module):
    """Every decoder layer's cross-attention keys/values of the encoder states, (B, heads, S, head_dim)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, encoder_hidden_states):
        out = []
        for layer in self.lm.bert.encoder.layer:
            att = layer.crossattention.self
            out += [att.split(att.key(encoder_hidden_states)), att.split(att.value(encoder_hidden_states))]
        return tuple(out)


class DecoderStepGraph(nn.Module):
    """One cached step of ``BlipTextLMHeadModel`` (the maths of its ``decode_step``) with explicit caches."""

    def __init__(self, lm, cross_mask: bool):
        super().__init__()
        self.lm, self.cross_mask = lm, cross_mask

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        bert = self.lm.bert
        n_layers = len(bert.encoder.layer)
        enc_mask = None
        if self.cross_mask:     # applied, as the library does (transformers 4.57 drops it)
            m, rest = rest[0], rest[1:]
        past, cross = rest[: 2 * n_layers], rest[2 * n_layers:]
        x = bert.embeddings(input_ids, position_ids)
        if self.cross_mask:
            enc_mask = (1.0 - m[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        mask = bert._self_mask(attention_mask, input_ids.shape[1], None, True, x.dtype)
        present = []
        for i, layer in enumerate(bert.encoder.layer):
            h, _, kv = layer.attention(x, mask, x, (past[2 * i], past[2 * i + 1]), append=True)
            h, _, _ = layer.crossattention(h, enc_mask, None, (cross[2 * i], cross[2 * i + 1]))
            x = layer.output(layer.intermediate(h), h)
            present += list(kv)
        return (self.lm.cls.predictions(x[:, -1]),) + tuple(present)


class _Normalized(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, h):
        return F.normalize(self.proj(h[:, 0]), dim=-1, eps=NORM_EPS)


class _First(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h[:, 0])


class ImageEmbedsGraph(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.head = _Normalized(proj)

    def forward(self, image_embeds):
        return self.head(image_embeds)


class ImageFeaturesGraph(nn.Module):
    def __init__(self, model, image_size: int | None = None):
        super().__init__()
        self.vision, self.proj = VisionGraph(model.vision_model, image_size), model.visual_projection

    def forward(self, pixel_values):
        return self.proj(self.vision(pixel_values)[1])


# -- writing -----------------------------------------------------------------------------------------
def _export(module, args, path, inputs, outputs, axes, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tracer notes about shape arithmetic
        torch.onnx.export(module.eval(), tuple(args), path, input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def _text_dummy(tc, b=2, n=5):
    ids = torch.randint(0, tc.vocab_size, (b, n))
    return ids, torch.ones(b, n, dtype=torch.long)


def _kv_names(prefix, n):
    return [f"{prefix}_{kind}_{i}" for i in range(n) for kind in ("key", "value")]


def _export_decoder(lm, out, opset, enc_width, cross_mask):
    """``decoder_cross_kv.onnx`` and ``decoder_step.onnx`` of a ``BlipTextLMHeadModel``."""
    tc = lm.config
    n_layers = len(lm.bert.encoder.layer)
    heads, hd = tc.num_attention_heads, tc.hidden_size // tc.num_attention_heads
    b, s_enc, past, s = 2, 6, 3, 2
    dtype = lm.cls.predictions.decoder.weight.dtype
    enc = torch.randn(b, s_enc, enc_width, dtype=dtype)
    cross_names = _kv_names("cross", n_layers)
    _export(CrossKVGraph(lm), [enc], os.path.join(out, "decoder_cross_kv.onnx"), ["encoder_hidden_states"],
            cross_names, {"encoder_hidden_states": {0: "batch", 1: "encoder_length"},
                          **{k: {0: "batch", 2: "encoder_length"} for k in cross_names}}, opset)
    with torch.no_grad():
        cross = list(CrossKVGraph(lm)(enc))
    ids, _ = _text_dummy(tc, b, s)
    positions = torch.arange(past, past + s)[None].expand(b, s)
    mask = torch.ones(b, past + s, dtype=torch.long)
    args, names = [ids, positions, mask], ["input_ids", "position_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "length"}, "position_ids": {0: "batch", 1: "length"},
            "attention_mask": {0: "batch", 1: "total_length"}}
    if cross_mask:
        args.append(torch.ones(b, s_enc, dtype=torch.long))
        names.append("encoder_attention_mask")
        axes["encoder_attention_mask"] = {0: "batch", 1: "encoder_length"}
    past_names, present_names = _kv_names("past", n_layers), _kv_names("present", n_layers)
    args += [torch.randn(b, heads, past, hd, dtype=dtype) for _ in past_names] + cross
    names += past_names + cross_names
    axes.update({k: {0: "batch", 2: "past_length"} for k in past_names})
    axes.update({k: {0: "batch", 2: "encoder_length"} for k in cross_names})
    axes.update({k: {0: "batch", 2: "total_length"} for k in present_names})
    axes["logits"] = {0: "batch"}
    _export(DecoderStepGraph(lm, cross_mask), args, os.path.join(out, "decoder_step.onnx"), names,
            ["logits"] + present_names, axes, opset)
    return {"decoder_layers": n_layers, "decoder_heads": heads, "decoder_head_dim": hd,
            "decoder_cross_mask": bool(cross_mask)}


def export_onnx(model, out_dir, processor_dir=None, opset: int = OPSET, image_size: int | None = None) -> str:
    """Write ``model`` (a torch ``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``,
    ``BlipForImageTextRetrieval``, ``BlipModel`` or ``Blip2ForConditionalGeneration``, float32; float16
    writes float16 graphs, which onnxruntime's CPU provider runs slower than float32:
    ``benchmarks/onnx_lowprec.py``) as ONNX graphs plus ``manifest.json``, its ``config.json`` and the
    processor files found in ``processor_dir``; returns ``out_dir``. ``image_size``: the square pixel size
    the vision graphs take (default: the config's; BLIP-2 bundles take the config's only)."""
    arch = getattr(model, "architecture", type(model).__name__)
    if arch not in TASKS:
        raise ValueError(f"ONNX export supports {', '.join(TASKS)}; got {arch}")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or dtypes - {torch.float32, torch.float16}:
        raise ValueError(f"ONNX export writes float32 (or float16) graphs, got parameters in "
                         f"{', '.join(sorted(str(d) for d in dtypes))}: onnxruntime's CPU provider has no "
                         f"bfloat16 kernels for MatMul, Add, Softmax, LayerNorm (NOT_IMPLEMENTED)")
    dtype = dtypes.pop()
    # the graphs are inference graphs (dropout off); the caller's model keeps its own modes afterwards, module by
    # module (a model exported between training steps goes on training)
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _write(model.eval(), arch, dtype, out_dir, processor_dir, opset, image_size)
    finally:
        for m, training in modes:
            m.training = training


def _write(model, arch: str, dtype, out_dir, processor_dir, opset: int, image_size) -> str:
    """``export_onnx``'s files, for a checked model in eval mode."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    size = export_image_size(vc, image_size)
    if arch == "Blip2ForConditionalGeneration" and size != vc.image_size:
        raise ValueError(f"BLIP-2 ONNX bundles take the config's image size ({vc.image_size}); "
                         f"another size ({size}) is not exported yet")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    pixels = torch.randn(2, 3, size, size)
    img_axes = {"pixel_values": {0: "batch"}}
    seq_axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    image_axes = {"image_embeds": {0: "batch", 1: "image_length"}}
    manifest = {"format": FORMAT, "version": 1, "architecture": arch, "task": TASKS[arch], "opset": opset,
                "image_size": size, "dtype": str(dtype).replace("torch.", ""), "graphs": {}}
    ids, mask = _text_dummy(tc)
    with torch.no_grad():
        if arch == "Blip2ForConditionalGeneration":
            from .onnx_export_blip2 import export_blip2_onnx
            manifest.update(export_blip2_onnx(model, out, opset))
        elif arch != "BlipModel":
            _export(VisionGraph(model.vision_model, size), [pixels], os.path.join(out, "vision.onnx"), ["pixel_values"],
                    ["last_hidden_state", "pooler_output"],
                    {**img_axes, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}, opset)
            manifest["graphs"]["vision"] = "vision.onnx"
            image = VisionGraph(model.vision_model, size)(pixels)[0]
        if arch == "BlipForConditionalGeneration":
            manifest.update(_export_decoder(model.text_decoder, out, opset, vc.hidden_size, cross_mask=False))
            manifest["graphs"].update(cross_kv="decoder_cross_kv.onnx", decoder_step="decoder_step.onnx")
        elif arch == "BlipForQuestionAnswering":
            _export(TextEncoderGraph(model.text_encoder), [ids, mask, image],
                    os.path.join(out, "question_encoder.onnx"), ["input_ids", "attention_mask", "image_embeds"],
                    ["question_embeds"], {**seq_axes, **image_axes, "question_embeds": {0: "batch", 1: "length"}},
                    opset)
            manifest.update(_export_decoder(model.text_decoder, out, opset, tc.hidden_size, cross_mask=True))
            manifest["graphs"].update(question_encoder="question_encoder.onnx", cross_kv="decoder_cross_kv.onnx",
                                      decoder_step="decoder_step.onnx")
        elif arch == "BlipForImageTextRetrieval":
            _export(TextEncoderGraph(model.text_encoder, _First(model.itm_head)), [ids, mask, image],
                    os.path.join(out, "itm.onnx"), ["input_ids", "attention_mask", "image_embeds"], ["itm_score"],
                    {**seq_axes, **image_axes, "itm_score": {0: "batch"}}, opset)
            _export(TextEncoderGraph(model.text_encoder, _Normalized(model.text_proj), cross=False), [ids, mask],
                    os.path.join(out, "text_embeds.onnx"), ["input_ids", "attention_mask"], ["text_embeds"],
                    {**seq_axes, "text_embeds": {0: "batch"}}, opset)
            _export(ImageEmbedsGraph(model.vision_proj), [image], os.path.join(out, "image_embeds.onnx"),
                    ["image_embeds"], ["image_feat"], {**image_axes, "image_feat": {0: "batch"}}, opset)
            manifest["graphs"].update(itm="itm.onnx", text_embeds="text_embeds.onnx", image_embeds="image_embeds.onnx")
        elif arch == "BlipModel":   # get_text_features / get_image_features
            text = TextEncoderGraph(model.text_model, nn.Sequential(model.text_model.pooler, model.text_projection),
                                    cross=False)
            _export(text, [ids, mask], os.path.join(out, "text_features.onnx"), ["input_ids", "attention_mask"],
                    ["text_features"], {**seq_axes, "text_features": {0: "batch"}}, opset)
            _export(ImageFeaturesGraph(model, size), [pixels], os.path.join(out, "image_features.onnx"),
                    ["pixel_values"], ["image_features"], {**img_axes, "image_features": {0: "batch"}}, opset)
            manifest["graphs"].update(text_features="text_features.onnx", image_features="image_features.onnx")
            manifest["logit_scale"] = float(model.logit_scale.detach())
    cfg.save_pretrained(out)
    copy_processor_files(processor_dir, out, size if size != vc.image_size else None)
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return out
