"""Export a torch ``Blip2ForConditionalGeneration`` (OPT or T5) as ONNX graphs a runtime drives itself.

The cut (``blip_runtime.onnx_blip2.OnnxBlip2`` runs it with numpy, ``tokenizers`` and onnxruntime):

* ``vision_qformer.onnx``: ``pixel_values`` (B, 3, H, W) -> ``vision_last_hidden_state`` (B, N, Dv),
  ``qformer_last_hidden_state`` (B, Q, Dq) and ``language_model_inputs`` (B, Q, E): the projected
  image queries, the stage the language model reads.
* The language model reads its input embeddings through one rule in every graph that embeds text:
  ``input_ids`` (N, s) are embedded with the model's own table, except where ``embeds_mask`` (N, s)
  is 1, where the row of ``inputs_embeds`` (N, s, E) is taken instead. The runner places the
  image queries there (``blip_core.blip2.query_layout``: the placeholder slots, or Q slots in front
  for configs without ``image_token_index``); decode steps pass an all-zero ``embeds_mask``. So the
  embedding table is stored once, inside the graph that also holds the tied ``lm_head``.
* OPT, ``decoder_step.onnx``: ``input_ids``, ``inputs_embeds``, ``embeds_mask`` (N, s),
  ``position_ids`` (N, s), ``attention_mask`` (N, past + s) over the whole sequence so far (the
  image prefix included), ``past_key_{i}``, ``past_value_{i}`` (N, heads, past, head_dim; ``past`` = 0
  on the prompt call) -> ``logits`` (N, V) of the last position and ``present_key_{i}``,
  ``present_value_{i}`` (N, heads, past + s, head_dim). Positions are an input: the runner derives
  them from the mask with the library's rule (``blip_core.decoding.prefill_positions``).
* T5, ``encoder.onnx``: ``input_ids``, ``inputs_embeds``, ``embeds_mask``, ``attention_mask`` (B, L) ->
  ``encoder_hidden_states`` (B, L, E) and every decoder layer's cross-attention ``cross_key_{i}``,
  ``cross_value_{i}`` (B, heads, L, d_kv), computed once per image.
* T5, ``decoder_step.onnx``: ``input_ids`` (N, s), ``attention_mask`` (N, past + s),
  ``encoder_attention_mask`` (N, L), ``past_key_{i}``, ``past_value_{i}`` (self-attention),
  ``cross_key_{i}``, ``cross_value_{i}`` -> ``logits`` (N, V), ``present_key_{i}``, ``present_value_{i}``.
  The relative position bias is computed inside from the past length. T5's shared embedding is
  stored in both T5 graphs (the encoder and the decoder each embed).

Batch and sequence axes are dynamic; the image size is the config's. Graphs are float32 and
traced with the TorchScript-based exporter (``dynamo=False``, see ``onnx_export``); they call the
backend's own layers, so the maths is the library's.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .onnx_export import _export, _kv_names
from .opt import causal_bias


class VisionQFormerGraph(nn.Module):
    """pixels -> vision states, Q-Former query states, projected queries (the model's own path)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        lm_inputs, vision, qformer = self.model._language_inputs(pixel_values)
        return vision.last_hidden_state, qformer.last_hidden_state, lm_inputs


def _fused_embeds(table: nn.Embedding, input_ids, inputs_embeds, embeds_mask):
    """The model's token embeddings, replaced by ``inputs_embeds`` where ``embeds_mask`` is set."""
    return torch.where(embeds_mask[..., None] != 0, inputs_embeds.to(table.weight.dtype), table(input_ids))


class OPTStepGraph(nn.Module):
    """One cached call of ``OPTForCausalLM`` (prompt or token) with explicit caches."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, inputs_embeds, embeds_mask, position_ids, attention_mask, *past):
        dec = self.lm.model.decoder
        x = _fused_embeds(dec.embed_tokens, input_ids, inputs_embeds, embeds_mask)
        if dec.project_in is not None:
            x = dec.project_in(x)
        h = x + dec.embed_positions(position_ids).to(x.dtype)
        bias = causal_bias(attention_mask, input_ids.shape[1], h.dtype)
        present = []
        for i, layer in enumerate(dec.layers):
            h, kv, _ = layer(h, bias, (past[2 * i], past[2 * i + 1]))
            present += list(kv)
        h = h[:, -1]
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return (self.lm.lm_head(h),) + tuple(present)


class T5EncoderGraph(nn.Module):
    """T5 encoder over the fused embeddings, plus every decoder layer's cross keys/values."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, inputs_embeds, embeds_mask, attention_mask):
        lm = self.lm
        x = _fused_embeds(lm.shared, input_ids, inputs_embeds, embeds_mask)
        enc = lm.encode(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        cross = []
        for block in lm.decoder.block:
            cross += list(block.layer[1].EncDecAttention.project_kv(enc))
        return (enc,) + tuple(cross)


class T5StepGraph(nn.Module):
    """One cached call of the T5 decoder stack (``T5Stack.forward`` itself) with explicit caches."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, encoder_attention_mask, *rest):
        lm, stack = self.lm, self.lm.decoder
        n_layers = len(stack.block)
        past, cross = rest[: 2 * n_layers], rest[2 * n_layers:]
        cache = tuple((past[2 * i], past[2 * i + 1], cross[2 * i], cross[2 * i + 1]) for i in range(n_layers))
        out, _ = stack(input_ids=input_ids, attention_mask=attention_mask,
                       encoder_attention_mask=encoder_attention_mask, past_key_values=cache, use_cache=True)
        present = [t for kv in out.past_key_values for t in kv[:2]]
        return (lm.decode_logits(out.last_hidden_state[:, -1]),) + tuple(present)


def _cache_axes(past_names, present_names, cross_names=()):
    axes = {k: {0: "batch", 2: "past_length"} for k in past_names}
    axes.update({k: {0: "batch", 2: "total_length"} for k in present_names})
    axes.update({k: {0: "batch", 2: "encoder_length"} for k in cross_names})
    return axes


def export_blip2_onnx(model, out: str, opset: int) -> dict:
    """Write the graphs of a float32 torch ``Blip2ForConditionalGeneration`` into ``out``; returns the
    manifest entries (``graphs`` and the cache geometry the runner needs)."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    b, n, past, s = 2, 5, 3, 2
    pixels = torch.randn(b, 3, vc.image_size, vc.image_size)
    vq = VisionQFormerGraph(model)
    _export(vq, [pixels], os.path.join(out, "vision_qformer.onnx"), ["pixel_values"],
            ["vision_last_hidden_state", "qformer_last_hidden_state", "language_model_inputs"],
            {"pixel_values": {0: "batch"}, "vision_last_hidden_state": {0: "batch"},
             "qformer_last_hidden_state": {0: "batch"}, "language_model_inputs": {0: "batch"}}, opset)
    lm = model.language_model
    width = lm.get_input_embeddings().weight.shape[1]
    ids = torch.randint(0, tc.vocab_size, (b, n))
    embeds, embeds_mask = torch.randn(b, n, width), (torch.arange(n) < 2).long()[None].expand(b, n)
    text_axes = {k: {0: "batch", 1: "length"} for k in ("input_ids", "inputs_embeds", "embeds_mask")}
    manifest = {"graphs": {"vision_qformer": "vision_qformer.onnx", "decoder_step": "decoder_step.onnx"},
                "embed_dim": int(width)}
    if model.is_decoder_only:
        layers, heads = len(lm.model.decoder.layers), tc.num_attention_heads
        hd = tc.hidden_size // heads
        past_names, present_names = _kv_names("past", layers), _kv_names("present", layers)
        step_ids, step_embeds, step_mask = ids[:, :s], embeds[:, :s], embeds_mask[:, :s]
        positions = torch.arange(past, past + s)[None].expand(b, s)
        mask = torch.ones(b, past + s, dtype=torch.long)
        args = [step_ids, step_embeds, step_mask, positions, mask] + [torch.randn(b, heads, past, hd)
                                                                      for _ in past_names]
        names = ["input_ids", "inputs_embeds", "embeds_mask", "position_ids", "attention_mask"] + past_names
        axes = dict(text_axes, position_ids={0: "batch", 1: "length"}, attention_mask={0: "batch", 1: "total_length"},
                    logits={0: "batch"}, **_cache_axes(past_names, present_names))
        _export(OPTStepGraph(lm), args, os.path.join(out, "decoder_step.onnx"), names, ["logits"] + present_names,
                axes, opset)
        manifest.update(language_model="opt")
    else:
        layers, heads, hd = len(lm.decoder.block), tc.num_heads, tc.d_kv
        cross_names = _kv_names("cross", layers)
        enc_mask = torch.ones(b, n, dtype=torch.long)
        enc_mask[1, -2:] = 0
        _export(T5EncoderGraph(lm), [ids, embeds, embeds_mask, enc_mask], os.path.join(out, "encoder.onnx"),
                ["input_ids", "inputs_embeds", "embeds_mask", "attention_mask"],
                ["encoder_hidden_states"] + cross_names,
                dict(text_axes, attention_mask={0: "batch", 1: "length"},
                     encoder_hidden_states={0: "batch", 1: "length"},
                     **{k: {0: "batch", 2: "length"} for k in cross_names}), opset)
        with torch.no_grad():
            cross = list(T5EncoderGraph(lm)(ids, embeds, embeds_mask, enc_mask)[1:])
        past_names, present_names = _kv_names("past", layers), _kv_names("present", layers)
        args = [ids[:, :s], torch.ones(b, past + s, dtype=torch.long), enc_mask]
        args += [torch.randn(b, heads, past, hd) for _ in past_names] + cross
        names = ["input_ids", "attention_mask", "encoder_attention_mask"] + past_names + cross_names
        axes = dict(input_ids={0: "batch", 1: "length"}, attention_mask={0: "batch", 1: "total_length"},
                    encoder_attention_mask={0: "batch", 1: "encoder_length"}, logits={0: "batch"},
                    **_cache_axes(past_names, present_names, cross_names))
        _export(T5StepGraph(lm), args, os.path.join(out, "decoder_step.onnx"), names, ["logits"] + present_names,
                axes, opset)
        manifest.update(language_model="t5")
        manifest["graphs"]["encoder"] = "encoder.onnx"
    manifest.update(decoder_layers=layers, decoder_heads=heads, decoder_head_dim=hd)
    return manifest
