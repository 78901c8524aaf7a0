"""Inference-time weight layouts for the PyTorch backend: oneDNN decoding weights and int8 weights.

Decoding a token multiplies a few rows (batch x beams) by every decoder weight, so its speed is that
of reading the weights. On this project's x86 CPUs PyTorch's default float32 GEMM (MKL) reads them
well below the memory bandwidth for 2-8 rows (beam search, small batches: 3-5x slower per byte
than one row); oneDNN's inner product, given weights reordered once into its blocked layout for
that row count, reads them 3-5x faster there, and in bfloat16 the packed weights read about twice
as fast as torch's default (unpacked) oneDNN call. At one float32 row MKL stays: oneDNN is only
~25% faster there on an idle core, and with two threads on an oversubscribed machine its small
parallel kernels stall for whole scheduler slices (measured 30 ms for a 9 MB matrix).

``Linear`` is ``nn.Linear`` (same parameters, same state-dict keys) that can run from such a
layout. ``prepare_decoding(module, rows)`` gives every ``Linear`` under ``module`` (except those
marked ``runs_once``, e.g. the cross-attention keys/values of the image) the layout for ``rows``
rows; the text decoder calls it on its first decoding step. A layout belongs to one weight tensor
at one version: training, ``load_state_dict`` or any in-place change makes it stale and the layer
silently returns to ``F.linear``; with gradients enabled, the plain path always runs. The packed
copy is kept for the next call (about the decoder's weight bytes); ``release_layouts(model)``
frees it.

``Int8Linear`` and ``quantize_int8`` (int8 weights) live in ``quantize.py``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_ops():
    """oneDNN's inner product and weight reorder, or None where this torch build lacks them."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return None
        return ops._linear_pointwise, ops._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_ops()
# float32: off by default: on this project's shared 2-core machine (load 14-23) every packed variant
# ran slower than MKL with two threads, although one thread's CPU time showed the gains above.
# bfloat16: on by default: its unpacked path is oneDNN too (no MKL to fall back on), and the packed
# weights decode 1.3-1.4x faster per token on one thread (BLIP base, batch 1, load 6-7) and were
# faster in every two-thread round too (load 8).
# BLIP_TORCH_DECODE_LAYOUT=1 (or ``layout.ENABLED = True``) turns it on for both, =0 (False) off for both.
_SETTING = os.environ.get("BLIP_TORCH_DECODE_LAYOUT", "").strip().lower()
ENABLED = None if _SETTING in ("", "auto") else _SETTING not in ("0", "false", "no", "off")
DEFAULT_DTYPES = (torch.bfloat16,)   # what ``ENABLED = None`` (the default) packs


class _Layout:
    """A weight prepared for ``rows`` input rows, valid while its source tensor is unchanged."""

    __slots__ = ("source", "version", "ptr", "rows", "dtype", "weight")

    def __init__(self, source: torch.Tensor, rows: int, weight: torch.Tensor):
        self.source, self.version, self.ptr = source, source._version, source.data_ptr()
        self.rows, self.dtype, self.weight = rows, source.dtype, weight

    def fresh(self, lin: nn.Linear) -> bool:
        # identity, in-place version and storage (``.data =`` / ``.to()`` swap the storage, not the version)
        w = lin.weight
        return w is self.source and w._version == self.version and w.data_ptr() == self.ptr and w.dtype == self.dtype


class Linear(nn.Linear):
    """``nn.Linear`` that runs from a decoding layout when one is prepared and fits the input."""

    runs_once = False     # set on layers called once per input (cross-attention keys/values)
    _layout = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self._layout
        if (lay is not None and not torch.is_grad_enabled() and x.dtype == lay.dtype and x.shape[-1] > 0
                and x.numel() // x.shape[-1] == lay.rows and lay.fresh(self)):
            return _ONEDNN[0](x, lay.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def layout_supported(module: nn.Module) -> bool:
    """oneDNN is present and the module's weights are float32 / bfloat16 on the CPU."""
    if _ONEDNN is None:
        return False
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)


def prepare_decoding(module: nn.Module, rows: int) -> None:
    """Give every ``Linear`` under ``module`` a layout for ``rows`` rows (reusing a fresh one).

    A no-op when switched off (``ENABLED`` False, or None and a float32 model), with gradients enabled, in training
    mode, where oneDNN is unavailable, and for float32 at one row (see ``Linear``); otherwise each weight is
    reordered into a copy once.
    """
    if ENABLED is False or torch.is_grad_enabled() or module.training or rows < 1 or not layout_supported(module):
        return
    dtype = next(module.parameters()).dtype
    if ENABLED is None and dtype not in DEFAULT_DTYPES:
        return
    if rows == 1 and dtype == torch.float32:
        return   # MKL's one-row float32 path is within ~25% of oneDNN's and far steadier on a busy machine
    for lin in module.modules():
        if not isinstance(lin, Linear) or lin.runs_once:
            continue
        lay = lin._layout
        if lay is not None and lay.rows == rows and lay.fresh(lin):
            continue
        lin._layout = _Layout(lin.weight, rows, _ONEDNN[1](lin.weight.detach(), rows))


def release_layouts(module: nn.Module) -> None:
    """Drop every prepared layout under ``module`` (frees the packed copies)."""
    for lin in module.modules():
        if isinstance(lin, Linear):
            lin._layout = None
