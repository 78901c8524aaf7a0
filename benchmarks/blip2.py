"""BLIP-2: vision + Q-Former forward, and ``generate`` with a small OPT language model.

- ``blip2-qformer``: ``Blip2VisionModelWithProjection`` with the BLIP-2 sizes (ViT-g/14 at 224, 39
  layers, 1408 wide; 12-layer Q-Former, 32 queries), batch 1: the image side of every BLIP-2 model.
- ``blip2-generate``: ``Blip2ForConditionalGeneration`` with OPT-125m's shapes, a ViT-B/16 (224)
  vision tower so that decoding is not drowned by ViT-g (its cost is the case above), the hub's
  placeholder scheme (32 ``image_token_index`` ids + bos + 8 prompt tokens), 20 new tokens forced,
  greedy, batch 1 (beam search is covered by the caption workload; this keeps the default run short).

transformers has no TF BLIP-2, so the only reference is its PyTorch. Run alone with
``python benchmarks/blip2.py``.
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

NEW_TOKENS, PROMPT_TOKENS = 20, 8
OPT_125M = dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                num_attention_heads=12, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2, pad_token_id=1)
VIT_B_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                 patch_size=16)
TINY_QFORMER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                    cross_attention_frequency=2, max_position_embeddings=40)
TINY_OPT = dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                max_position_embeddings=64)


def qformer_config(quick: bool):
    from blip_core.configs import Blip2Config
    if quick:
        return Blip2Config(vision_config=dict(TINY), qformer_config=dict(TINY_QFORMER), text_config=dict(TINY_OPT),
                           num_query_tokens=4)
    return Blip2Config(vision_config=dict(INIT), text_config=dict(OPT_125M))   # ViT-g, Q-Former, 32 queries


def generate_config(quick: bool):
    from blip_core.configs import Blip2Config
    if quick:
        return Blip2Config(vision_config=dict(TINY), qformer_config=dict(TINY_QFORMER), text_config=dict(TINY_OPT),
                           num_query_tokens=4, image_token_index=98)
    return Blip2Config(vision_config=dict(VIT_B_224, layer_norm_eps=1e-6, **INIT), text_config=dict(OPT_125M),
                       image_token_index=50265)


def _image_side(cfg, batch: int) -> dict:
    vc, qc = cfg.vision_config, cfg.qformer_config
    m = (vc.image_size // vc.patch_size) ** 2 + 1
    return {"vision": common.vit_flops(vc, batch),
            "qformer": common.qformer_flops(qc, cfg.num_query_tokens, m, vc.hidden_size, batch)}


def generate_flops(cfg, batch: int, beams: int, prompt: int, new_tokens: int) -> dict:
    tc, q, dq = cfg.text_config, cfg.num_query_tokens, cfg.qformer_config.hidden_size
    rows = batch * beams
    flops = _image_side(cfg, batch)
    flops["language_projection"] = float(batch * 2 * q * dq * tc.hidden_size)
    flops["lm"] = common.decode_flops(common.opt_layer_flops(tc), tc.num_hidden_layers, rows, batch, prompt, new_tokens)
    flops["lm_head"] = float((batch + rows * (new_tokens - 1)) * 2 * tc.word_embed_proj_dim * tc.vocab_size)
    return flops


def generate_weight_bytes(cfg, new_tokens: int, itemsize: int) -> float:
    """Image side once, every OPT layer and the (tied) LM head once per step."""
    vc, qc, tc = cfg.vision_config, cfg.qformer_config, cfg.text_config
    d, h = qc.hidden_size, tc.hidden_size
    cross = sum(1 for i in range(qc.num_hidden_layers) if i % qc.cross_attention_frequency == 0)
    qformer = qc.num_hidden_layers * (4 * d * d + 2 * d * qc.intermediate_size) + cross * (2 * d * d + 2 * vc.hidden_size * d)
    once = common.vit_params(vc) + qformer + d * h
    per_step = tc.num_hidden_layers * (4 * h * h + 2 * h * tc.ffn_dim) + tc.word_embed_proj_dim * tc.vocab_size
    return common.decode_weight_bytes(once, per_step, new_tokens, itemsize)


def run(ctx) -> None:
    rng = np.random.default_rng(3)
    # -- vision + Q-Former ------------------------------------------------------------------------
    cfg = qformer_config(ctx.quick)
    models, skipped, load_s = ctx.build("Blip2VisionModelWithProjection", cfg)
    size = cfg.vision_config.image_size
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    calls = {impl: (lambda m=model, x=ctx.native(impl, pixels): m(pixel_values=x).image_embeds)
             for impl, model in models.items()}
    flops = _image_side(cfg, 1)
    flops["vision_projection"] = float(2 * cfg.num_query_tokens * cfg.qformer_config.hidden_size *
                                       cfg.image_text_hidden_size)
    ctx.run_case("blip2-qformer", f"batch 1, {size}x{size}, {cfg.num_query_tokens} queries", calls, skipped, flops,
                 {"batch": 1, "image_size": size, "config": cfg.to_dict()}, mode="forward", load_s=load_s,
                 unit=("images", 1))
    del models, calls
    # -- generate with OPT ------------------------------------------------------------------------
    cfg = generate_config(ctx.quick)
    models, skipped, load_s = ctx.build("Blip2ForConditionalGeneration", cfg)
    size, tc = cfg.vision_config.image_size, cfg.text_config
    prompt_tokens = 3 if ctx.quick else PROMPT_TOKENS
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    text = rng.integers(4, min(tc.vocab_size - 8, 50000), size=(1, prompt_tokens))
    ids = np.concatenate([np.full((1, cfg.num_query_tokens), cfg.image_token_index), np.array([[tc.bos_token_id]]),
                          text], axis=1).astype(np.int64)
    mask = np.ones_like(ids)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    calls = {}
    for impl, model in models.items():
        x, i, a = ctx.native(impl, pixels), ctx.native(impl, ids), ctx.native(impl, mask)
        calls[impl] = lambda m=model, x=x, i=i, a=a: m.generate(pixel_values=x, input_ids=i, attention_mask=a, **kwargs)
    ctx.run_case("blip2-generate", f"greedy, batch 1, OPT {tc.hidden_size}x{tc.num_hidden_layers}, {NEW_TOKENS} tokens",
                 calls, skipped, generate_flops(cfg, 1, 1, ids.shape[1], NEW_TOKENS),
                 {"batch": 1, "num_beams": 1, "prompt_length": int(ids.shape[1]), "new_tokens": NEW_TOKENS,
                  "image_size": size, "config": cfg.to_dict()},
                 mode="greedy", check="ids", load_s=load_s, unit=("tokens", NEW_TOKENS),
                 weight_bytes=generate_weight_bytes(cfg, NEW_TOKENS, ctx.itemsize))
    del models


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "blip2"] + sys.argv[1:]))
