"""Vision encoder forward: ``BlipVisionModel`` with the BLIP base config (ViT-B/16, 384x384), batch 1 and 8.

Times ``model(pixel_values=...).last_hidden_state`` for every impl on the same random weights and
checks every output against transformers' PyTorch. Run alone with ``python benchmarks/vision.py``
(same options as ``run_all.py``).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from . import common   # noqa: E402

# The vision configs' default initializer_range (1e-10, as in transformers) draws weights near zero,
# giving near-zero activations: unlike a real checkpoint, and a risk of slow denormal arithmetic.
INIT = dict(initializer_range=0.02)
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
            **INIT)


def config(quick: bool):
    from blip_core.configs import BlipVisionConfig
    # The dataclass defaults are BLIP base's vision tower (768 wide, 12 layers, 384 px, patch 16).
    return BlipVisionConfig(**TINY) if quick else BlipVisionConfig(**INIT)


def run(ctx) -> None:
    cfg = config(ctx.quick)
    models, skipped, load_s = ctx.build("BlipVisionModel", cfg)
    rng = np.random.default_rng(0)
    for batch in (1,) if ctx.quick else (1, 8):
        pixels = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        calls = {}
        for impl, model in models.items():
            x = ctx.native(impl, pixels)
            calls[impl] = lambda m=model, x=x: m(pixel_values=x).last_hidden_state
        ctx.run_case("vision", f"batch {batch}, {cfg.image_size}x{cfg.image_size}", calls, skipped,
                     {"vision": common.vit_flops(cfg, batch)},
                     {"batch": batch, "image_size": cfg.image_size, "config": cfg.to_dict()}, mode="forward",
                     load_s=load_s, unit=("images", batch))
    del models


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "vision"] + sys.argv[1:]))
