"""PyTorch's bicubic resize as plain matrices, for ``interpolate_pos_encoding``.

``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` is separable: resizing an
(H, W) grid to (h, w) equals ``Mh @ grid @ Mw.T`` with the matrices below (cubic convolution with
A = -0.75, source index ``(i + 0.5) * in/out - 0.5``, taps clamped at the border, no antialias).
``jax.image.resize`` and ``tf.image.resize`` use other kernels, so every backend applies these
matrices instead; computing them here keeps the rule in one place.
"""
from __future__ import annotations

import functools

import numpy as np

_A = -0.75


def _cubic(t: np.ndarray) -> np.ndarray:
    """The four tap weights for fractional offsets ``t`` in [0, 1), shape (..., 4)."""
    def near(x):   # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of PyTorch's 1-D bicubic resize (align_corners=False)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    x0 = np.floor(src)
    weights = _cubic(src - x0)                                  # (out, 4)
    taps = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    m.setflags(write=False)
    return m


def resize_grid(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a (H, W, C) numpy grid with PyTorch's bicubic kernel (used by checkpoint converters)."""
    h, w = grid.shape[:2]
    out = np.einsum("ih,hwc,jw->ijc", bicubic_matrix(h, out_h), grid.astype(np.float64), bicubic_matrix(w, out_w))
    return out.astype(grid.dtype)
