"""Captioning ``generate``: ``BlipForConditionalGeneration`` (BLIP base), 20 new tokens forced, greedy and beam 3.

``min_new_tokens = max_new_tokens = 20`` so every impl decodes exactly 20 tokens whatever the
random weights predict; batch 1 and 8. The FLOP count is that of an ideal incremental decoder: the
image once, cross-attention keys/values once per image, then one token per step per row with the
LM head on the last position only (work an impl repeats beyond that shows up as a lower floor
fraction). Decoding one token reads every decoder weight once, so a second floor, weight bytes over
the measured memory bandwidth, bounds small batches. The floor every case records
(``compute_bandwidth_floor_s``, from ``caption_floor_terms``): the image side at the framework's matmul
rate plus the decoding steps, each the larger of its FLOPs at that rate and its weight bytes at the
bandwidth (the bytes at batch 1); time over it for greedy batch 1 is an issue-19 target (<= 1.3).
Run alone with ``python benchmarks/caption.py``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from . import common   # noqa: E402
from .vision import INIT, TINY   # noqa: E402

NEW_TOKENS = 20
# blip-image-captioning-base's text decoder (the class default of 8 heads is not what the hub uses).
BASE_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=512, bos_token_id=30522, sep_token_id=102, pad_token_id=0)
TINY_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=40, bos_token_id=96, sep_token_id=97, pad_token_id=0)


def config(quick: bool, **kw):
    from blip_core.configs import BlipConfig
    if quick:
        return BlipConfig(vision_config=dict(TINY), text_config=dict(TINY_TEXT), projection_dim=16,
                          image_text_hidden_size=24, **kw)
    return BlipConfig(vision_config=dict(INIT), text_config=dict(BASE_TEXT), **kw)


def caption_flops(cfg, batch: int, beams: int, new_tokens: int, prompt: int = 1) -> dict:
    vc, tc = cfg.vision_config, cfg.text_config
    m = (vc.image_size // vc.patch_size) ** 2 + 1
    d, i, v, e, layers = tc.hidden_size, tc.intermediate_size, tc.vocab_size, vc.hidden_size, tc.num_hidden_layers
    rows = batch * beams
    layer = lambda t, s: common.bert_layer_flops(t, s, d, i, m, e, cross_kv=False)   # noqa: E731
    return {"vision": common.vit_flops(vc, batch),
            "cross_kv": float(batch * layers * 4 * m * e * d),
            "decoder": common.decode_flops(layer, layers, rows, batch, prompt, new_tokens),
            "lm_head": float((batch + rows * (new_tokens - 1)) * (2 * d * d + 2 * d * v))}


def caption_weight_bytes(cfg, new_tokens: int, itemsize: int) -> float:
    """Vision and cross-attention key/value weights once, the rest of the decoder and the LM head per step."""
    vc, tc = cfg.vision_config, cfg.text_config
    d, i, e = tc.hidden_size, tc.intermediate_size, vc.hidden_size
    layers = tc.num_hidden_layers
    once = common.vit_params(vc) + layers * 2 * e * d
    per_step = layers * (6 * d * d + 2 * d * i) + d * d + d * tc.vocab_size
    return common.decode_weight_bytes(once, per_step, new_tokens, itemsize)


def caption_floor_terms(cfg, batch: int, beams: int, new_tokens: int, itemsize: int = 4) -> dict:
    """The terms of ``common.compute_bandwidth_floor_s`` for a ``generate`` call: the image side (vision
    tower, cross-attention keys/values) once, then ``new_tokens`` steps that each read the decoder's and LM
    head's weights (all but the cross-attention keys/values) and do their FLOPs."""
    f = caption_flops(cfg, batch, beams, new_tokens)
    tc = cfg.text_config
    d, i = tc.hidden_size, tc.intermediate_size
    per_step = itemsize * (tc.num_hidden_layers * (6 * d * d + 2 * d * i) + d * d + d * tc.vocab_size)
    return {"once_flops": f["vision"] + f["cross_kv"], "step_flops": f["decoder"] + f["lm_head"],
            "step_bytes": float(new_tokens * per_step), "bytes_per_step": float(per_step)}


def caption_floor_s(cfg, batch: int, beams: int, new_tokens: int, rate: float, bandwidth: float,
                    itemsize: int = 4) -> dict:
    """The least time a ``generate`` can take on a machine (``common.compute_bandwidth_floor_s`` of
    ``caption_floor_terms``): at batch 1, the image side at the matmul rate plus the decoder's and LM
    head's weights read once per step at the memory bandwidth. Each part is in the dict."""
    terms = caption_floor_terms(cfg, batch, beams, new_tokens, itemsize)
    f = caption_flops(cfg, batch, beams, new_tokens)
    fl = common.compute_bandwidth_floor_s(terms, rate, bandwidth)
    return dict(fl, vision_s=f["vision"] / rate, cross_kv_s=f["cross_kv"] / rate, decoder_s=fl["steps_s"],
                decoder_bytes_per_step=terms["bytes_per_step"])


def _log_floor(ctx, record, cfg) -> None:
    """Greedy batch 1: every impl's time against the image-compute + weight-streaming floor of its framework
    (the harness records it in every result as ``compute_bandwidth_floor_s``; the run's best rates at the end)."""
    bw = (ctx.bandwidth or {}).get("best_bytes_per_s")
    ref = record["results"].get("hf-torch", {}).get("median_s")
    for impl, r in record["results"].items():
        rate = ctx.rate(r["framework"]) if r.get("status") == "ok" else None
        if not rate or not bw:
            continue
        fl = caption_floor_s(cfg, 1, 1, NEW_TOKENS, rate, bw, ctx.itemsize)
        verdict = ""
        if ref and impl in common.OURS:
            reach = "below this floor (unreachable)" if ref / 2 < fl["total_s"] else "above this floor (reachable)"
            verdict = f"; 2x transformers = {ref / 2:.3f} s is {reach}"
        ctx.log(f"  {impl}: floor {fl['total_s']:.3f} s (vision {fl['vision_s']:.3f} + cross k/v {fl['cross_kv_s']:.3f}"
                f" at {rate / 1e9:.0f} GFLOP/s, {NEW_TOKENS} x {fl['decoder_bytes_per_step'] / 1e6:.0f} MB of "
                f"weights at {bw / 1e9:.1f} GB/s {fl['decoder_s']:.3f}); measured {r['median_s']:.3f} s = "
                f"{r['median_s'] / fl['total_s']:.2f}x floor{verdict}")


def run(ctx) -> None:
    cfg = config(ctx.quick)
    models, skipped, load_s = ctx.build("BlipForConditionalGeneration", cfg)
    rng = np.random.default_rng(1)
    size = cfg.vision_config.image_size
    for batch in (1,) if ctx.quick else (1, 8):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        for beams in (1, 3):
            mode = "greedy" if beams == 1 else f"beam{beams}"
            kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams)
            calls = {}
            for impl, model in models.items():
                x = ctx.native(impl, pixels)
                calls[impl] = lambda m=model, x=x: m.generate(pixel_values=x, **kwargs)
            record = ctx.run_case("caption", f"{mode}, batch {batch}, {NEW_TOKENS} tokens", calls, skipped,
                         caption_flops(cfg, batch, beams, NEW_TOKENS),
                         {"batch": batch, "num_beams": beams, "new_tokens": NEW_TOKENS, "image_size": size,
                          "config": cfg.to_dict()},
                         mode=mode, check="ids", load_s=load_s, unit=("tokens", batch * NEW_TOKENS),
                         weight_bytes=caption_weight_bytes(cfg, NEW_TOKENS, ctx.itemsize),
                         floor_terms=caption_floor_terms(cfg, batch, beams, NEW_TOKENS, ctx.itemsize))
            if batch == 1 and beams == 1:
                _log_floor(ctx, record, cfg)
    del models


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "caption"] + sys.argv[1:]))
