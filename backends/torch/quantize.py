"""int8 inference for the PyTorch backend: every ``nn.Linear`` of a model on int8 weights.

``quantize_int8(model)`` (or ``from_pretrained(path, quantize="int8")``) turns each linear layer
(vision tower, text encoder/decoder, LM head; the patch convolution and the embeddings stay
float32) into an ``Int8Linear``: weights rounded to int8 with one symmetric scale per output
channel, and each call quantises its input to uint8 with one scale per call (dynamic
quantisation, ``reduce_range`` as fbgemm wants) and runs fbgemm's int8 GEMM
(``torch.ops.quantized.linear_dynamic``), whose VNNI kernels measured 3-4x
faster than float32 at every row count we decode with and for the 577-row vision tower.

On CPUs with AMX tiles (Intel Xeon since Sapphire Rapids) products of ``ONEDNN_ROWS`` rows or more
(the vision tower, batched decoding) run through oneDNN's int8 GEMM instead, which uses them (the
same ``linear_dynamic`` on weights packed by the ``onednn`` engine; inputs rounded to 8 bits, not
fbgemm's 7). Each layer makes each packed copy on its first product of that size.

Why fbgemm's dynamic kernel and not a weight-only int8 matmul (int8 weights, float activations):
measured on one core, ``torch._weight_int8pack_mm`` runs at 2 GFLOP/s with float32 inputs
(70 with bfloat16, below float32's 80 at 577 rows) and a hand-written per-row int8 matmul on
``torch._int_mm`` reaches 1.4x float32; fbgemm's reaches 3.5x. Its cost is precision: the
activation's scale is per call, not per row, so outputs differ from float32 by about 1-3% of
their range; the captions' agreement with float32 is measured in ``benchmarks/lowprec.py`` and
held by ``tests/test_torch_int8.py``.

One row (greedy or sampled decoding at batch 1) is the exception: there the decoder's layers are
weight-only. ``prepare_decoding`` gives each one the one-row layout of ``layout.py`` in int8: the
transposed weight's column blocks with each row (one input feature's weights to up to 256 outputs,
and the bias row) rounded to 256 levels between its own min and max (fbgemm's 8-bit row-wise
embedding-bag tables), summed with the float32 input as the bags' weights. The input is not
rounded, and each row's range is narrower than an output channel's, so the one-row products are
about 3x closer to float32 than the dynamic kernel's (0.7% against 1.7-2.7% of the outputs' range,
BLIP-base shapes, random weights); they also read faster: 50-65 us against 74-90 us a product
(2304 x 768, 3072 x 768 and 768 x 3072; two threads, 40 distinct matrices of each), a BLIP-base
decoding step 14.3 -> 12.5 ms. A self-attention's query, key and value share one such table
(``layout._Fused``). Each row carries 8 bytes of scale and offset (3% of a 256-wide row).

The image's cross-attention keys and values, computed once per input, are stored the same way beside their float32
copy (``_base.ImageKV``): a key row is one feature of one head over every image position, a value row one position
of one head, each rounded between its own min and max; a decoding step's query and probabilities are not rounded
(``_base.one_query_attention``). A BLIP-base step reads 11 MB of them instead of 42 MB: 17.3 -> 15.6 ms a token
(Intel Xeon host, two threads, interleaved medians), and greedy captions of the bundled captioner equal float32's
on 200 of 200 held-out images (199 with float32 keys/values). Prompts of several tokens, and every model not in
int8, attend to the float32 keys/values.

The float32 parameters stay (same state-dict keys, ``save_pretrained`` writes them; memory is not
reduced); the int8 copy follows them: an in-place change to a weight re-quantises on the next
call. A quantised model is for inference: gradients do not flow through the int8 GEMM.
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .layout import Linear, _Layout, _layouts_apply, release_layouts


def int8_supported() -> bool:
    """fbgemm-style int8 GEMM in this torch build (x86 ``fbgemm`` / ``x86`` engine)."""
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)) and hasattr(
        torch.ops.quantized, "linear_dynamic")


def _amx_int8() -> bool:
    """The CPU has AMX tiles (Intel Xeon since Sapphire Rapids), which oneDNN's int8 GEMM uses and fbgemm's does not."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False


def _onednn_rows() -> int:
    """``ONEDNN_ROWS``: 24 where the CPU has AMX and this build has the oneDNN engine, else 0 (never)."""
    return 24 if _amx_int8() and "onednn" in torch.backends.quantized.supported_engines else 0


# Products of ONEDNN_ROWS rows or more (the vision tower's 577 an image, batched decoding) run through oneDNN's int8
# GEMM instead of fbgemm's. Measured on an Intel Xeon host (AMX) of this project's 2-core VM, the same int8 weights
# packed by each engine (BLIP-base shapes, two threads, best of 25): 577 rows 1.7-2.6x faster through oneDNN, 96
# rows 1.4-2.0x, 24-48 rows 0.9-1.7x (768 x 768 about even), 16 rows 0.65-0.95x, 2-8 rows 0.4-0.7x. Without AMX
# both use the same VNNI instructions: fbgemm stays.
ONEDNN_ROWS = _onednn_rows()


_ENGINE_LOCK = threading.Lock()


def _pack(weight: torch.Tensor, bias, engine: str = "fbgemm"):
    """Per-output-channel symmetric int8 weights, prepacked for ``engine``'s dynamic product (``fbgemm`` or
    ``onednn``: ``linear_dynamic`` runs the kernel of the engine that packed the weights)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():   # torch >= 2.10 marks quantised tensor creation deprecated; still the API
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        with _ENGINE_LOCK:    # the engine is process-wide: two threads packing at once must not swap each other's
            before = torch.backends.quantized.engine
            torch.backends.quantized.engine = engine
            try:
                return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
            finally:
                torch.backends.quantized.engine = before


class Int8Linear(Linear):
    """``nn.Linear`` (same parameters) computing with int8 weights: dynamically quantised inputs through fbgemm's
    GEMM, and one-row decoding products weight-only (float32 inputs) from the layout ``prepare_decoding`` gives it
    (``layout._Transposed`` in int8)."""

    int8 = True

    _packed = None      # fbgemm's packed copy (products of fewer than ``ONEDNN_ROWS`` rows), made on first use
    _wide = None        # oneDNN's (``ONEDNN_ROWS`` rows and more), made on first use
    _key = None         # a ``layout._Layout`` of the weights both copies were made from (its ``fresh`` is the rule)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias      # the same Parameters: ties stay tied
        new.runs_once = getattr(lin, "runs_once", False)
        return new

    def packed(self, rows: int):
        """``(copy, reduce_range)`` for a product of ``rows`` rows: oneDNN's from ``ONEDNN_ROWS`` rows (inputs in
        8 bits), else fbgemm's (inputs in 7 bits, as its kernel wants); both made again after a weight changes
        (``layout._Layout.fresh``: the same tensors, unchanged, the rule every layout follows)."""
        if self._key is None or not self._key.fresh(self):
            self._packed = self._wide = None
            self._key = _Layout(self, rows, None, "int8")
        if ONEDNN_ROWS and rows >= ONEDNN_ROWS:
            if self._wide is None:
                self._wide = _pack(self.weight, self.bias, "onednn")
            return self._wide, False
        if self._packed is None:
            self._packed = _pack(self.weight, self.bias)
        return self._packed, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"an int8 model takes float32 activations, got {x.dtype}; quantise a float32 model")
        if x.shape[-1] == 0 or x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        lay = self._layout
        if lay is not None and rows == 1 and _layouts_apply() and lay.fresh(self):
            return lay.weight(x)      # ``fresh`` has checked the weights: the packed copies are not read here
        return torch.ops.quantized.linear_dynamic(x, *self.packed(rows))

    def _onednn(self, x, act=None):
        return None      # no float32 product, no oneDNN epilogue: ``linear_act`` calls ``forward``, then ``act``


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` under ``model`` with an ``Int8Linear`` in place; returns ``model``.

    The model must be float32 on the CPU; it is put in eval mode and its parameters stop requiring
    gradients. Calling it twice is harmless.
    """
    if not int8_supported():
        raise NotImplementedError("int8 needs torch's fbgemm/x86 quantised engine, absent from this build; "
                                  "use dtype='bfloat16' instead")
    p = next(model.parameters(), None)
    if p is not None and (p.dtype != torch.float32 or p.device.type != "cpu"):
        raise ValueError(f"quantize_int8 takes a float32 CPU model, got {p.dtype} on {p.device}")
    release_layouts(model)     # decoding copies of the float32 weights (and shared ones holding the old layers)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, Int8Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    model.eval()
    model.requires_grad_(False)
    return model


QUANTIZERS = {"int8": quantize_int8}


def apply_quantization(model: nn.Module, quantize) -> nn.Module:
    """``from_pretrained``'s ``quantize=`` option: None, or ``"int8"``."""
    if quantize is None:
        return model
    if quantize not in QUANTIZERS:
        raise ValueError(f"unknown quantize={quantize!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[quantize](model)
