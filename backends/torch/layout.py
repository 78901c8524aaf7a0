"""Inference-time weight layouts for the PyTorch backend: oneDNN decoding weights and int8 weights.

Decoding a token multiplies a few rows (batch x beams) by every decoder weight, so its speed is that
of reading the weights. On this project's x86 CPUs PyTorch's default float32 GEMM (MKL) reads them
well below the memory bandwidth: one row at ~10 GB/s where oneDNN's inner product on the same,
unchanged weights reads ~19 GB/s (quiet 2-core Zen 4, two threads, 40 distinct 9 MB matrices),
and 2-8 rows (beam search, small batches) 3-5x slower per byte than one row, where oneDNN with the
weights reordered once into its blocked layout for that row count reads them 3-5x faster. In
bfloat16 the packed weights read about twice as fast as torch's default (unpacked) oneDNN call.

The plan per weight dtype and row count (``plan``): at one row (greedy or sampled batch 1, the
commonest call) every dtype multiplies through an embedding-bag sum over a transposed copy of each
weight and its bias (``_Transposed``), in blocks of at most ``MAX_WIDTH`` output columns: fbgemm's
kernel streams it ~1.3-1.5x faster than oneDNN reads float32 weights as they are (one core, CPU time,
loaded machine: a BLIP-base decoding step 1.2x faster; narrow blocks another 1.13x), and bfloat16 weights
1.3-1.5x faster than oneDNN's packed copy (a BLIP-base bfloat16 step 1.18x faster), at the cost of a second
copy of the decoder's weights (~490 MB for BLIP base in float32). float32 at 2 rows calls oneDNN on the
weights as they are (no copy: the packed copy reads no faster there), at ``PACK_MIN_ROWS`` (3) to
``PACK_MAX_ROWS`` (24) rows (beam search, batches) on a copy packed for the row count (the transposed copy
would read the weights once per row), above that on the weights as they are again. bfloat16 at 2+ rows uses
the packed copy. On Intel CPUs float32 at 1 to ``MKL_ROWS`` (3) rows runs through ``F.linear`` instead, with no
copy: MKL reads a few rows there as fast as the copies do, or faster (see ``MKL_ROWS``).

Switches: ``BLIP_TORCH_DECODE_LAYOUT`` (read at import; ``ENABLED`` / ``COPIES`` at run time):
unset or ``auto`` = the plan above; ``unpacked`` = no transposed copies, and none at all for float32
(float32: oneDNN on the weights as they are at every row count, the default before the one-row copy;
bfloat16: the packed copy; ``COPIES = False``); ``1`` = packed
copies for every dtype and row count (``ENABLED = True``); ``0`` = ``F.linear`` everywhere (``ENABLED =
False``). ``BLIP_TORCH_MKL_ROWS=N`` (read at import; ``MKL_ROWS`` at run time): float32 at 1 to N rows takes
MKL under the default plan whatever the CPU (0: never). The attention of a decoding step over the cached image
keys/values (``_base.one_query_attention``, also embedding-bag sums) needs no switch: no copy, same numbers to
float32 rounding.

Products of more than ``PACK_MAX_ROWS`` rows in a module that asks for it (the vision towers, ``prepare_wide``) run
on a copy of each weight packed once for oneDNN (``WIDE_ROWS``, ``WIDE_MAX_BYTES``): the same numbers, without the
reorder oneDNN makes of a plain weight on every call.

``Linear`` is ``nn.Linear`` (same parameters, same state-dict keys) that can run from such a
layout. Layers that read the same input and that their module names in ``fused_projections`` (a
self-attention's query, key and value) share one transposed copy at one row and run as one call
(``project``, ``_Fused``): the same bits, two fewer calls per layer. ``prepare_decoding(module, rows)``
gives every ``Linear`` under ``module`` (except those marked ``runs_once``, e.g. the cross-attention
keys/values of the image) the layout for ``rows`` rows; the text decoders (BLIP's, BLIP-2's OPT and T5)
call it on their first decoding step. Copies are made only where they fit in ``COPY_FRACTION`` of the
available memory, and those above ``DEFER_BYTES`` only from a model's second call with as many rows. A
layout belongs to one weight tensor (and bias) at one version: training, ``load_state_dict`` or any
in-place change makes it stale and the layer silently returns to ``F.linear``; with gradients enabled,
the plain path always runs. A packed or transposed copy is kept for the next call with as many rows
(about the decoder's weight bytes; a call with another row count replaces it); ``release_layouts(model)``
frees it. The unpacked plan keeps no copy.

``Int8Linear`` and ``quantize_int8`` (int8 weights) live in ``quantize.py``. An ``Int8Linear`` is a ``Linear``
whose only layout is the one-row transposed copy, in int8 (``_Transposed(..., int8=True)``: fbgemm's 8-bit
row-wise embedding-bag table, a scale and an offset per row); at other row counts it runs fbgemm's int8 product.
"""
from __future__ import annotations

from threading import get_ident

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from blip_core.checkpoint.mapped import memory_available
from blip_core.settings import OFF, env_word

from ._base import INT8_BAGS, activation, bag_sums, bags, int8_bag_sums, int8_rows


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


# Default (``ENABLED = None``, BLIP_TORCH_DECODE_LAYOUT unset or ``auto``): ``plan`` below.
# BLIP_TORCH_DECODE_LAYOUT=1 (``layout.ENABLED = True``) packs every dtype (one more copy of the
# decoder's weights); =0 (False) leaves every layer on ``F.linear`` (MKL in float32). An earlier default kept
# float32 on MKL, measured on this shared machine at load 14-23, where oneDNN's small parallel kernels
# stalled for whole scheduler slices; on a quiet machine oneDNN reads float32 weights ~1.8x faster than MKL
# at one row, and on one core (CPU time, loaded machine) 1.3-1.6x faster per decoding step at 2-3 rows.
_SETTING = env_word("BLIP_TORCH_DECODE_LAYOUT")
ENABLED = None if _SETTING in ("", "auto", "unpacked") else _SETTING not in OFF
# BLIP_TORCH_DECODE_LAYOUT=unpacked (``layout.COPIES = False``): no transposed copy at one row, and float32 decodes
# from its weights as they are at every row count (no copy).
COPIES = _SETTING != "unpacked"
PLAIN, UNPACKED, PACKED, TRANSPOSED, WIDE = "plain", "unpacked", "packed", "transposed", "wide"
# Output columns per block of a transposed copy at most (see ``_blocks``).
MAX_WIDTH = 256
# float32 decodes from a copy packed for its row count at PACK_MIN_ROWS to PACK_MAX_ROWS rows. BLIP base, random
# weights, 20 tokens forced, two models (one per plan) alternating in one process, this project's 2-core VM on a slow
# day, medians: beam 3 batch 1 (3 rows) 1.617 -> 1.502 s a `generate`, greedy batch 8 6.81 -> 6.54 s, beam 3 batch 8
# (24 rows) 9.78 -> 9.41 s; greedy batch 2 2.09 -> 2.04 s, within the noise, and greedy batch 32 25.38 -> 25.80 s
# (5 rounds in two runs; fastest 25.10 against 25.31): outside the range the layers run from the weights as they are
# (no copy). Ids equal.
PACK_MIN_ROWS, PACK_MAX_ROWS = 3, 24
# Products of more than PACK_MAX_ROWS rows (a vision tower's: 577 rows per BLIP-base image at 384 px) run on a copy
# of the weight packed once into oneDNN's blocked layout, where the module asked for one (``prepare_wide``): called
# on a plain weight, oneDNN reorders it on every call. Measured on this project's AMD EPYC host (two threads,
# BLIP-base vision shapes, best of 15, 3 interleaved rounds): one layer's four products at 577 rows 47.8 -> 38.1 ms,
# at 4616 rows (8 images) 342 -> 325 ms; bfloat16 fc1 at 577 rows 7.4 -> 6.2 ms. The copy is packed with
# WIDE_ROWS as oneDNN's row-count hint and serves every row count; its products are the unpacked ones bit for bit
# (25 to 4616 rows, with and without the GELU epilogue: tests/test_torch_linear_onednn.py).
WIDE_ROWS = 577
# A whole BLIP-base float32 model, 6% of a batch-1 vision call, was measured in one process on the same host (two
# models, one without the copies, alternating 5 rounds, medians): 0.657 -> 0.616 s at batch 1 (ids and states
# equal), 4.764 -> 4.700 s at batch 8 (the per-call reorder weighs less against 8 images' products). For that,
# the copy doubles the tower's weight memory (344 MB for BLIP base): a tower whose weights exceed WIDE_MAX_BYTES
# (BLIP-2's ViT-g, 4 GB in float32) gets none.
WIDE_MAX_BYTES = 1 << 30


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``) from ``/proc/cpuinfo``, or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _mkl_rows() -> int:
    """``MKL_ROWS``: ``BLIP_TORCH_MKL_ROWS`` where set (a row count, 0 = never), else 3 on Intel CPUs, 0 elsewhere."""
    setting = env_word("BLIP_TORCH_MKL_ROWS")
    if not setting:
        return 3 if _cpu_vendor() == "GenuineIntel" else 0
    if not setting.isdigit():
        raise ValueError(f"BLIP_TORCH_MKL_ROWS must be a row count (0: never), got {setting!r}")
    return int(setting)


# float32 products of 1 to MKL_ROWS rows run through torch's own GEMM (``F.linear``, MKL) under the default plan,
# with no decoding copy. MKL picks its kernels by CPU vendor: on AMD CPUs its float32 GEMM runs at about half of
# oneDNN's rate (see above), on Intel CPUs it reads a few rows as fast as anything here. Measured on an Intel Xeon
# host of this project's 2-core VM (AVX-512, AMX; BLIP base's 73 decoder products + LM head, interleaved medians):
# 1 row 19.6 ms (MKL) against 20.8 (the embedding-bag copy) and 24.9 (oneDNN); 2 rows 21.4 against 30.0 (oneDNN,
# the plan's choice there) and 24.0 (packed); 3 rows 23.0 against 24.5 (packed); 4 rows 35.7 against 24.6 (packed).
# Whole captions (random weights, 20 tokens forced, MKL_ROWS 0 and 3 alternating in one process): greedy batch 1
# 1.105 -> 1.087 s, greedy batch 2 1.833 -> 1.594 s, beam 3 batch 1 1.321 -> 1.226 s, ids equal; and the decoding
# copy (~490 MB in float32 for BLIP base) is not made. 0 (AMD and unknown CPUs) keeps the plan below.
MKL_ROWS = _mkl_rows()


def plan(dtype: torch.dtype, rows: int, int8: bool = False) -> str:
    """How the decoding layers multiply ``rows`` rows of ``dtype``: ``F.linear`` (``PLAIN``), oneDNN on the
    weights as they are (``UNPACKED``, no copy), oneDNN on a copy packed for the call's row count (``PACKED``)
    or, at one row, an embedding-bag sum over a transposed copy (``TRANSPOSED``). ``int8``: the layers are
    ``Int8Linear`` (float32 parameters, int8 products), whose only layout is the one-row copy."""
    if ENABLED is False:
        return PLAIN
    if ENABLED is True:
        return PACKED
    if dtype == torch.float32 and not int8 and COPIES and rows <= MKL_ROWS:
        return PLAIN
    if rows == 1 and COPIES:
        return TRANSPOSED
    if dtype == torch.float32 and (not PACK_MIN_ROWS <= rows <= PACK_MAX_ROWS or not COPIES):
        return UNPACKED
    return PACKED


def _blocks(out_features: int, threads: int) -> tuple:
    """``(k, width)``: the column blocks of a transposed copy, a multiple of ``threads`` with ``width = ceil(out /
    k)`` at most ``MAX_WIDTH`` columns (the last block padded with zero columns to ``width``). fbgemm's kernel
    keeps a bag's running sums in registers only for narrow rows: wider ones are summed a slice at a time,
    each slice a strided pass over the table. Measured on this project's Zen 4 VM (two threads, 300 MB of
    each shape, interleaved medians): BLIP base's FFN input (3072 x 768) streams at 17-19 GB/s in blocks of
    1536 or 768 columns and 24-30 GB/s in blocks of 192-512; the LM head (30524 x 768) at 19-21 GB/s in
    blocks of 954-15262 and 25-26 GB/s in 318-477. The sums do not depend on the blocks (see ``_Transposed``)."""
    threads = max(1, threads)
    k = threads * -(-out_features // (MAX_WIDTH * threads))
    return k, -(-out_features // k)


class _Transposed:
    """One-row product ``x @ W.T + b`` as an embedding-bag sum over a transposed copy of ``W`` (and ``b``).

    ``W`` (out, in) is stored as ``k`` column blocks of ``width`` columns (``_blocks``; the last padded with
    zero columns), each transposed, with the bias's block as one more row, stacked into a
    (k * (in + 1), width) table: row ``j * (in + 1) + i`` holds input feature ``i``'s weights to block ``j``'s
    outputs, row ``j * (in + 1) + in`` their biases. One ``F.embedding_bag`` call with ``k`` bags (bag ``j``:
    block ``j``'s rows, weighted by ``x`` and 1 for the bias) returns the (k, width) products, i.e. the output
    in order (then the padding). fbgemm's kernel streams each table row once into float32 accumulators
    that stay in registers: on this project's Zen 4 cores it reads float32 weights ~1.3-1.5x and bfloat16
    weights 1.3-1.5x faster than oneDNN's inner product on one row, and the bags run on the threads. Each
    output is the same ordered sum whatever ``k`` (bit for bit); the bias, added last in the accumulator,
    gives float32 the bits of ``y + b`` and bfloat16 one rounding, as oneDNN's product does. ``int8``: the
    table is stored as fbgemm's 8-bit row-wise table (each row rounded between its own min and max, its scale
    and offset beside it) and summed by its kernel, float32 inputs and sums (``quantize.Int8Linear``).
    """

    __slots__ = ("table", "index", "offsets", "k", "n_in", "out", "per_bag", "padded", "inputs", "int8")

    def __init__(self, w: torch.Tensor, bias, threads: int, int8: bool = False):
        out, n_in = w.shape
        k, width = _blocks(out, threads)
        rows = n_in + (bias is not None)
        self.table = w.new_empty((k * rows, width))
        for j in range(k):    # one 2-D transposing copy per block (torch's blocked transpose; ~0.4 s for BLIP base)
            block, lo = self.table[j * rows:(j + 1) * rows], j * width
            cols = max(0, min(width, out - lo))
            block[:n_in, :cols].copy_(w[lo:lo + cols].t())
            if bias is not None:
                block[n_in, :cols].copy_(bias[lo:lo + cols])
            block[:, cols:].zero_()
        if int8:      # weight-only int8 (``Int8Linear``): each table row quantised with its own scale and offset
            self.table = int8_rows(self.table)
        self.index, self.offsets = bags(k, rows, w.device)
        self.k, self.n_in, self.out, self.per_bag, self.int8 = k, n_in, out, rows, int8
        self.padded = k * width != out
        self.inputs = {}     # thread -> the bags' weights buffer (see ``_weights``)

    def _weights(self) -> tuple:
        """This thread's (k, per_bag) buffer of the bags' weights, ones in the bias column, and the view of it that
        takes each call's ``x`` (one broadcasting copy: building the weights with ``expand`` and ``torch.cat``
        cost ~9 us more per call, ~0.9 ms of a BLIP-base step). One per thread, so that threads sharing a
        model do not write each other's inputs."""
        if len(self.inputs) >= 64:      # threads come and go: keep the buffers of recent ones only
            self.inputs.clear()
        buf = torch.ones((self.k, self.per_bag), dtype=torch.float32 if self.int8 else self.table.dtype,
                         device=self.table.device)
        pair = self.inputs[get_ident()] = (buf.view(-1), buf[:, :self.n_in])
        return pair

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, inputs = self.inputs.get(get_ident()) or self._weights()
        inputs.copy_(x.reshape(-1))          # x once per bag (then 1 for the bias)
        if self.int8:
            y = int8_bag_sums(self.table, self.index, self.offsets, weights)
        else:
            y = bag_sums(self.table, self.index, self.offsets, weights)
        if self.padded:       # the last block's zero columns (the slice costs ~3.5 us a call: only where needed)
            y = y.view(-1)[:self.out]
        return y.view(*x.shape[:-1], -1)


class _Layout:
    """A weight (and bias) prepared for ``rows`` input rows (a packed or transposed copy, or the weight itself
    for the unpacked plan), valid while its source tensors are unchanged."""

    __slots__ = ("source", "bias", "state", "rows", "dtype", "weight", "how")

    def __init__(self, lin: nn.Linear, rows: int, weight, how: str):
        self.source, self.bias, self.state = lin.weight, lin.bias, (_state(lin.weight), _state(lin.bias))
        self.rows, self.dtype, self.weight, self.how = rows, lin.weight.dtype, weight, how

    def fresh(self, lin: nn.Linear) -> bool:
        # the same weight and bias tensors, unchanged (the bias too: a transposed copy holds it). This runs on
        # every decoding product: each is read once, from the parameter dict (``lin.weight`` goes through
        # ``Module.__getattr__``, ~0.5 us); a weight that is no longer a parameter (a parametrization) is stale.
        p = lin._parameters
        w, b = p.get("weight"), p.get("bias")
        return w is self.source and b is self.bias and (_state(w), _state(b)) == self.state


def _state(t):
    """In-place version, storage and dtype (``.data =`` / ``.to()`` swap the storage, not the version)."""
    return None if t is None else (t._version, t.data_ptr(), t.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that runs from a decoding layout when one is prepared and fits the input."""

    runs_once = False     # set on layers called once per input (cross-attention keys/values)
    int8 = False          # ``quantize.Int8Linear``: of the layouts only the one-row transposed copy, in int8
    _layout = None
    _wide_layout = None   # ``prepare_wide``'s packed copy, for products of more than PACK_MAX_ROWS rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._onednn(x)
        return F.linear(x, self.weight, self.bias) if y is None else y

    def _onednn(self, x: torch.Tensor, act: str = None):
        """The product (then ``act``, one of ``EPILOGUES``, where given) from a prepared layout or through
        oneDNN, or None where this call takes ``F.linear`` (gradients, traces, the switch, other devices /
        dtypes / strides). oneDNN applies ``act`` in the product's epilogue; the one-row transposed layout (an
        embedding-bag sum, no epilogue) applies it after."""
        if not _layouts_apply():
            return None
        post, algorithm = EPILOGUES[act] if act is not None else ("none", "")
        lay = self._layout
        if (lay is not None and x.dtype == lay.dtype and x.shape[-1] > 0
                and x.numel() // x.shape[-1] == lay.rows and lay.fresh(self)):
            if lay.how == TRANSPOSED:
                y = lay.weight(x)
                return y if act is None else activation(act)(y)
            return _ONEDNN[0](x, lay.weight, self.bias, post, [], algorithm)
        w = self.weight
        if x.dtype == w.dtype and x.dtype in _ONEDNN_DTYPES and x.device.type == "cpu" and w.device.type == "cpu" \
                and x.is_contiguous() and w.is_contiguous() and x.dim() >= 2 and x.numel() > 0:
            rows = x.numel() // x.shape[-1]
            wide = self._wide_layout
            if wide is not None and rows > PACK_MAX_ROWS and wide.fresh(self):
                return _onednn_rows(x, wide.weight, self.bias, post, algorithm)     # ``prepare_wide``'s copy
            if plan(x.dtype, rows) == PLAIN:
                return None     # a few float32 rows on an Intel CPU: MKL's product (``MKL_ROWS``)
            return _onednn_rows(x, w, self.bias, post, algorithm)     # oneDNN on the weight as it is (no copy)
        return None


# Activations oneDNN computes in the product's epilogue, as (post-op, algorithm): the exact (erf) GELU, the
# tanh GELU and ReLU, each the same function as torch's to float32 rounding (tests/test_torch_linear_onednn.py).
# The epilogue saves the activation's pass over the product (a fresh buffer the size of the FFN's hidden
# states): ~1.5 ms of each BLIP-base vision MLP at 384 px.
EPILOGUES = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def linear_act(lin: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """``activation(act)(lin(x))``, with the activation in oneDNN's epilogue where ``lin`` is a ``Linear`` whose
    call runs through oneDNN and ``act`` is in ``EPILOGUES``; any other layer (``Int8Linear``, ``nn.Linear``) or
    call is the plain composition."""
    if isinstance(lin, Linear) and act in EPILOGUES and not _hooked(lin):
        y = lin._onednn(x, act)
        if y is not None:
            return y
    return activation(act)(lin(x))


def _hooked(lin: nn.Module) -> bool:
    """Forward hooks would see ``lin``'s call: the layer's own or any registered for every module."""
    return bool(lin._forward_hooks or lin._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN's inner product runs a row count that is not a multiple of 8 at a lower rate: 577 rows (a ViT-B/16
# image at 384 px) reach 290-360 GFLOP/s where the same rows padded to 584 reach 390-420 (float32, the four
# BLIP-base vision shapes, two threads, interleaved medians; 4616 rows, already a multiple of 8, gain
# nothing). Inputs of at least PAD_MIN_ROWS rows are padded with zero rows to a multiple of PAD_ROWS (a copy of
# the input, ~1% of the product's time) and the output is a view of the product's first rows. Each output row
# depends only on its input row, so the padding changes no number beyond the kernel's float32 rounding.
PAD_ROWS, PAD_MIN_ROWS = 8, 128


def _onednn_rows(x: torch.Tensor, w: torch.Tensor, bias, post: str = "none", algorithm: str = "") -> torch.Tensor:
    n_in = x.shape[-1]
    rows = x.numel() // n_in
    pad = -rows % PAD_ROWS
    if rows < PAD_MIN_ROWS or pad == 0:
        return _ONEDNN[0](x, w, bias, post, [], algorithm)
    padded = _padded_base(x, rows + pad)
    if padded is None:
        padded = x.new_empty((rows + pad, n_in))
        padded[:rows].copy_(x.view(rows, n_in))
        padded[rows:].zero_()
    y = _ONEDNN[0](padded, w, bias, post, [], algorithm)
    return y[:rows].view(x.shape[:-1] + (w.shape[0],))


def _padded_base(x: torch.Tensor, padded_rows: int):
    """The padded product ``x`` is the first rows of, seen as (padded_rows, in), or None.

    A padded call returns a view of its output's first rows, and the next layer (a vision MLP's second
    product, after the activation in the first one's epilogue) would copy those rows into a new padded
    buffer (~1-1.8 ms per BLIP-base layer at 384 px, 7 MB). Where ``x`` is exactly such a view (contiguous,
    starting at its base's first element, the base contiguous with ``padded_rows`` rows of the same width),
    the base itself is the padded input: its extra rows hold the previous product's outputs for the zero
    rows, and each output row depends on its input row only, so they change no kept row."""
    base = x._base
    if (base is None or base.shape != (padded_rows, x.shape[-1]) or base.data_ptr() != x.data_ptr()
            or base.dtype != x.dtype or not base.is_contiguous()):
        return None
    return base


def _layouts_apply() -> bool:
    """A call may run from oneDNN or a prepared layout: no gradients, not switched off, oneDNN present, not traced."""
    return not torch.is_grad_enabled() and ENABLED is not False and _ONEDNN is not None and not _traced()


def _traced() -> bool:
    """Inside an ONNX / TorchScript trace or a ``torch.compile`` graph: only ``F.linear`` is understood there."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def layout_supported(module: nn.Module) -> bool:
    """oneDNN is present and the module's weights are float32 / bfloat16 on the CPU."""
    if _ONEDNN is None:
        return False
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)


def prepare_decoding(module: nn.Module, rows: int) -> None:
    """Give every ``Linear`` under ``module`` the layout ``plan`` picks for ``rows`` rows (reusing a fresh one).

    A no-op with gradients enabled, in training mode and where oneDNN is unavailable; where the plan is
    ``PLAIN`` it drops the layouts an earlier call left; ``UNPACKED`` points the layers at their own
    weights; ``PACKED`` reorders each weight into a copy once. Under ``TRANSPOSED``, the layers a module names
    in ``fused_projections`` (layers that read the same input, e.g. a self-attention's query, key and value)
    share one transposed copy (``_Fused``; the module calls them through ``project``).
    """
    if torch.is_grad_enabled() or module.training or rows < 1 or not layout_supported(module):
        return
    how = plan(next(module.parameters()).dtype, rows, int8=any(getattr(m, "int8", False) for m in module.modules()))
    if how == PLAIN:   # switched off since an earlier call: its layouts must not serve this one
        release_layouts(module)
        return
    threads = torch.get_num_threads()
    if how in (TRANSPOSED, PACKED):
        new, available = _new_copy_bytes(module, rows, how), memory_available()
        if available is not None and new > COPY_FRACTION * available:
            how = UNPACKED      # no copy that would not fit beside the model: oneDNN on the weights as they are
        elif new > DEFER_BYTES and (rows, how) not in module.__dict__.setdefault("_decoding_calls", set()):
            module.__dict__["_decoding_calls"].add((rows, how))
            how = UNPACKED      # a large copy waits for this module's second call with as many rows (``DEFER_BYTES``)
    fused = set()
    for mod in module.modules():
        lins = _fusable(mod) if how == TRANSPOSED else None
        if lins is None:
            mod.__dict__.pop("_fused", None)
            continue
        old = mod.__dict__.get("_fused")
        if old is None or not old.fresh(lins) or old.product.k != _blocks(old.product.out, threads)[0]:
            mod.__dict__["_fused"] = None      # a stale copy goes before its replacement is made
            mod.__dict__["_fused"] = _Fused(lins, threads)
        for lin in lins:
            lin._layout = None                 # the shared copy serves them
            fused.add(lin)
    for lin in module.modules():
        if not _takes_layout(lin, how) or lin in fused:
            if isinstance(lin, Linear):
                lin._layout = None     # no copy of its own under this plan (an int8 layer: fbgemm's product)
            continue
        lay, w = lin._layout, lin.weight.detach()
        if lay is not None and lay.rows == rows and lay.how == how and lay.fresh(lin) and (
                how != TRANSPOSED or lay.weight.k == _blocks(w.shape[0], threads)[0]):
            continue
        lin._layout = None   # a stale copy goes before its replacement is made
        if how == TRANSPOSED:
            weight = _Transposed(w, None if lin.bias is None else lin.bias.detach(), threads, int8=lin.int8)
        else:
            weight = w if how == UNPACKED else _ONEDNN[1](w, rows)
        lin._layout = _Layout(lin, rows, weight, how)


def prepare_wide(module: nn.Module) -> None:
    """Give every ``Linear`` under ``module`` a copy of its weight packed in oneDNN's layout (``WIDE_ROWS``), which its
    products of more than ``PACK_MAX_ROWS`` rows run on: the same numbers, without oneDNN's reorder of a plain weight
    on every call. The vision towers call it on each inference call; fresh copies are kept. A no-op with gradients
    enabled, in training mode, where oneDNN is unavailable, under ``BLIP_TORCH_DECODE_LAYOUT=0`` and ``unpacked`` (no
    copies), and for int8 layers (oneDNN's int8 products: ``quantize.py``). No copy where the module's copies would
    exceed ``WIDE_MAX_BYTES`` or ``COPY_FRACTION`` of the available memory; ``release_layouts`` drops them. Two threads
    preparing one module at once may both pack a layer: the later copy is kept, and either gives the same numbers."""
    if (torch.is_grad_enabled() or module.training or ENABLED is False or not COPIES or _traced()
            or not layout_supported(module)):
        return
    lins = [lin for lin in module.modules() if isinstance(lin, Linear) and not lin.int8
            and lin.weight.dtype in _ONEDNN_DTYPES and lin.weight.device.type == "cpu" and lin.weight.is_contiguous()]
    stale = [lin for lin in lins if lin._wide_layout is None or not lin._wide_layout.fresh(lin)]
    if not stale:
        return
    new, available = sum(lin.weight.nbytes for lin in lins), memory_available()
    if new > WIDE_MAX_BYTES or (available is not None and new > COPY_FRACTION * available):
        return              # oneDNN on the weights as they are
    for lin in stale:
        lin._wide_layout = None       # a stale copy goes before its replacement is made
        lin._wide_layout = _Layout(lin, WIDE_ROWS, _ONEDNN[1](lin.weight.detach(), WIDE_ROWS), WIDE)


# The copies a layout makes (transposed or packed: about the decoding layers' weight bytes; BLIP base's text
# decoder ~490 MB in float32, a BLIP-2 OPT-2.7b language model ~10 GB) are made only while they fill at most this
# fraction of the memory the kernel reports available (``MemAvailable``); otherwise the layers run from the
# weights as they are (``UNPACKED``: no copy, oneDNN's product, slower at one row).
COPY_FRACTION = 0.5
# Copies of more than this many bytes are made from a module's second decoding call with the same row count on,
# the first running from the weights as they are: they build at ~1.3 GB/s, which one call of a few dozen tokens
# does not win back. BLIP-2 OPT-2.7b in bfloat16 (5.4 GB of copies; this project's 2-core VM, 20 tokens): the first
# generate 8.4 s without copies, 13.5 s building them; later calls 8.0-8.2 s without, 5.6-5.7 s with them.
# BLIP base's decoder (0.5 GB) is below it: its copies are made on the first call.
DEFER_BYTES = 1 << 30


def _takes_layout(lin: nn.Module, how: str) -> bool:
    """``lin`` is a ``Linear`` that ``prepare_decoding`` lays out under ``how``: not one called once per input, and an
    ``Int8Linear`` only under ``TRANSPOSED`` where this build has fbgemm's row-wise kernel."""
    return (isinstance(lin, Linear) and not lin.runs_once
            and (not lin.int8 or (how == TRANSPOSED and INT8_BAGS)))


def _new_copy_bytes(module: nn.Module, rows: int, how: str) -> int:
    """The bytes of the copies ``prepare_decoding`` would make under ``how`` (layers without a valid one)."""
    shared = set()       # layers a fresh shared copy already serves
    for mod in module.modules():
        fused = mod.__dict__.get("_fused")
        if how == TRANSPOSED and fused is not None and fused.fresh(fused.lins):
            shared.update(fused.lins)
    new = 0
    for lin in module.modules():
        if _takes_layout(lin, how) and lin not in shared:
            lay = lin._layout
            if lay is None or lay.rows != rows or lay.how != how or not lay.fresh(lin):
                size = lin.weight.nbytes + (0 if lin.bias is None else lin.bias.nbytes)
                new += size // lin.weight.element_size() if lin.int8 else size    # int8: a byte a weight
    return new


def _fusable(mod: nn.Module):
    """The ``Linear`` layers ``mod`` names in ``fused_projections``, where they can share a transposed copy (same
    input width, dtype and device, all with a bias or none), else None."""
    names = getattr(mod, "fused_projections", ())
    lins = [getattr(mod, name, None) for name in names]
    if len(lins) < 2 or not all(_takes_layout(lin, TRANSPOSED) and lin.int8 == lins[0].int8 for lin in lins):
        return None
    first = lins[0].weight
    if any(lin.in_features != lins[0].in_features or lin.weight.dtype != first.dtype
           or lin.weight.device != first.device or (lin.bias is None) != (lins[0].bias is None) for lin in lins):
        return None
    return lins


class _Fused:
    """The one-row products of layers that read the same input (``fused_projections``) as one embedding-bag
    call over their weights stacked along the outputs: one table (the bytes of the copies it replaces), one call
    instead of one per layer (BLIP base: a decoding step ~0.7 ms faster, two calls fewer per layer). Each output
    is the same ordered sum as its own layer's ``_Transposed`` (bit for bit)."""

    __slots__ = ("lins", "states", "product", "sizes", "dtype")

    def __init__(self, lins: list, threads: int):
        weights = [lin.weight.detach() for lin in lins]
        bias = None if lins[0].bias is None else torch.cat([lin.bias.detach() for lin in lins])
        self.product = _Transposed(torch.cat(weights), bias, threads, int8=lins[0].int8)
        self.lins, self.states = tuple(lins), [_Layout(lin, 1, None, TRANSPOSED) for lin in lins]
        self.sizes, self.dtype = [w.shape[0] for w in weights], weights[0].dtype

    def fresh(self, lins) -> bool:
        """Made for these layers, whose weights and biases are unchanged since."""
        return tuple(lins) == self.lins and self._unchanged()

    def _unchanged(self) -> bool:
        return all(lay.fresh(lin) for lay, lin in zip(self.states, self.lins))

    def fits(self, x: torch.Tensor) -> bool:
        """This call may take the shared copy: one row of its dtype, a call layouts apply to (``_layouts_apply``),
        weights unchanged, no hooks that would miss their layer's call."""
        return (x.dtype == self.dtype and x.shape[-1] > 0 and x.numel() == x.shape[-1] and _layouts_apply()
                and self._unchanged() and not any(_hooked(lin) for lin in self.lins))

    def __call__(self, x: torch.Tensor) -> tuple:
        return self.product(x).split(self.sizes, -1)


def project(module: nn.Module, x: torch.Tensor, lins: tuple) -> tuple:
    """``tuple(lin(x) for lin in lins)``: one embedding-bag call where ``prepare_decoding`` fused ``lins`` (the
    module's ``fused_projections``) and ``x`` is one row; otherwise each layer's own call."""
    fused = module.__dict__.get("_fused")
    if fused is not None and fused.lins == lins and fused.fits(x):
        return fused(x)
    return tuple(lin(x) for lin in lins)


def release_layouts(module: nn.Module) -> None:
    """Drop every prepared layout under ``module`` (frees the packed and transposed copies)."""
    for mod in module.modules():
        mod.__dict__.pop("_fused", None)
        mod.__dict__.pop("_decoding_calls", None)
        if isinstance(mod, Linear):
            mod._layout = mod._wide_layout = None
