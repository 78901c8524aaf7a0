"""How many images an inference pass runs at once: the rule every backend follows for large batches.

Images are independent through a vision tower, so running a batch a few images at a time gives the same
numbers (bit for bit on the CPU, measured in torch, TF and JAX) while each product's output stays near
``CHUNK_BYTES`` instead of growing with the batch. Measured on this project's 2-core VM, BLIP base at
384 px, 32 images, no gradients, one pass against chunks of 8 (interleaved in one process): torch 15.4-16.6 s
-> 10.6-12.2 s (chunks of 4: 12.2-13.3 s), JAX 14.3 s -> 12.3-12.5 s, TF 12.6-13.5 s -> 11.1-11.2 s. In torch
the one pass's fresh 170-230 MB outputs were new pages every call (2.4 million page faults, 1.0 million
chunked); the products also run faster at a few thousand rows than at 18,000. The JAX and TF figures are
separate calls per chunk; inside one compiled JAX program (``lax.map`` over chunks) no gain was measured,
so today only the PyTorch tower follows this rule.
"""
from __future__ import annotations

CHUNK_BYTES = 64 << 20     # largest product output of one chunk (BLIP base at 384 px: 8 images)


def images_per_chunk(batch: int, tokens: int, widest: int, itemsize: int, budget: int = None) -> int:
    """Images per chunk for ``batch`` images of ``tokens`` tokens whose widest product output is ``widest``
    values of ``itemsize`` bytes: as few chunks as keep each (images * tokens, widest) output within
    ``budget`` (default ``CHUNK_BYTES``; at least one image per chunk), of equal sizes (32 images at 9 per
    chunk run as 4 x 8, not 9 + 9 + 9 + 5). ``batch`` itself when one chunk holds them all."""
    if batch < 1:
        return max(batch, 0)
    budget = CHUNK_BYTES if budget is None else budget
    cap = max(1, budget // max(1, tokens * widest * itemsize))
    chunks = -(-batch // cap)
    return -(-batch // chunks)
