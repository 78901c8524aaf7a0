"""Image-text matching throughput: ``BlipForImageTextRetrieval(use_itm_head=True)``, BLIP base, pairs per second.

Scores every pair of 2 images x 2 captions (4 pairs of 35 tokens) in one call: the public API takes
pairs, so each pair runs the vision tower and the cross-attending text encoder. Run alone with
``python benchmarks/itm.py``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from . import common   # noqa: E402
from .caption import config   # noqa: E402 - the retrieval checkpoints share the captioner's shapes

IMAGES, TEXTS, TEXT_LEN = 2, 2, 35


def itm_flops(cfg, pairs: int, text_len: int) -> dict:
    vc, tc = cfg.vision_config, cfg.text_config
    m = (vc.image_size // vc.patch_size) ** 2 + 1
    layer = common.bert_layer_flops(text_len, text_len, tc.hidden_size, tc.intermediate_size, m, vc.hidden_size)
    return {"vision": common.vit_flops(vc, pairs), "text": float(pairs * tc.num_hidden_layers * layer),
            "itm_head": float(pairs * 2 * tc.hidden_size * 2)}


def run(ctx) -> None:
    cfg = config(ctx.quick)
    models, skipped, load_s = ctx.build("BlipForImageTextRetrieval", cfg)
    rng = np.random.default_rng(2)
    size, tc = cfg.vision_config.image_size, cfg.text_config
    text_len = 8 if ctx.quick else TEXT_LEN
    images = rng.standard_normal((IMAGES, 3, size, size)).astype(np.float32)
    texts = rng.integers(5, min(tc.vocab_size - 2, 30000), size=(TEXTS, text_len)).astype(np.int64)
    texts[:, 0], texts[:, -1] = min(101, tc.vocab_size - 1), tc.sep_token_id   # [CLS] ... [SEP]
    # Every image with every text: rows (image 0, text 0), (image 0, text 1), (image 1, text 0), ...
    pixels = np.repeat(images, TEXTS, axis=0)
    ids = np.tile(texts, (IMAGES, 1))
    mask = np.ones_like(ids)
    pairs = IMAGES * TEXTS
    calls = {}
    for impl, model in models.items():
        x, i, a = ctx.native(impl, pixels), ctx.native(impl, ids), ctx.native(impl, mask)
        calls[impl] = lambda m=model, x=x, i=i, a=a: m(input_ids=i, pixel_values=x, attention_mask=a,
                                                      use_itm_head=True).itm_score
    ctx.run_case("itm", f"{IMAGES} images x {TEXTS} texts = {pairs} pairs, {text_len} tokens", calls, skipped,
                 itm_flops(cfg, pairs, text_len),
                 {"images": IMAGES, "texts": TEXTS, "pairs": pairs, "text_len": text_len, "image_size": size,
                  "config": cfg.to_dict()},
                 mode="forward", load_s=load_s, unit=("pairs", pairs))
    del models


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "itm"] + sys.argv[1:]))
