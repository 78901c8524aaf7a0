"""Batch throughput: captions per second at batch 8 and 32 (BLIP base, greedy, 20 new tokens forced).

Every impl (our torch, tf, jax and transformers' PyTorch / TF) loads one checkpoint of random
weights and is timed interleaved, as in ``caption.py``; the extra column is captions/s. A batch-32
call takes tens of seconds on 2 cores, so this workload times at most 3 calls per impl. Run alone
with ``python benchmarks/throughput.py``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from .caption import NEW_TOKENS, caption_flops, caption_weight_bytes, config   # noqa: E402

BATCHES = (8, 32)


def run(ctx) -> None:
    cfg = config(ctx.quick)
    models, skipped, load_s = ctx.build("BlipForConditionalGeneration", cfg)
    rng = np.random.default_rng(2)
    size = cfg.vision_config.image_size
    max_reps, ctx.max_reps = ctx.max_reps, min(ctx.max_reps, 3)
    try:
        for batch in BATCHES[:1] if ctx.quick else BATCHES:
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1)
            calls = {impl: (lambda m=m, x=ctx.native(impl, pixels): m.generate(pixel_values=x, **kwargs))
                     for impl, m in models.items()}
            ctx.run_case("throughput", f"greedy, batch {batch}, {NEW_TOKENS} tokens", calls, skipped,
                         caption_flops(cfg, batch, 1, NEW_TOKENS),
                         {"batch": batch, "num_beams": 1, "new_tokens": NEW_TOKENS, "image_size": size},
                         mode="greedy", check="ids", load_s=load_s, unit=("captions", batch),
                         weight_bytes=caption_weight_bytes(cfg, NEW_TOKENS, ctx.itemsize))
    finally:
        ctx.max_reps = max_reps
    del models


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "throughput"] + sys.argv[1:]))
