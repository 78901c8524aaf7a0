"""PyTorch plumbing shared by every BLIP and BLIP-2 class: loading, saving, seeded init, dtypes, inputs.

``PreTrainedModel`` is an ``nn.Module`` whose parameter names are the Hugging Face state-dict keys
(the weight table's torch column is the identity). A subclass sets ``architecture`` (the class
name the weight table knows), builds its modules in ``__init__(config, seed=0, dtype=None)`` after
``super().__init__(config)``, and ends with ``self.post_init(seed, dtype)``::

    class BlipVisionModel(PreTrainedModel):
        architecture = "BlipVisionModel"
        def __init__(self, config, seed=0, dtype=None):
            super().__init__(config)
            ...                                     # submodules named like transformers'
            self.post_init(seed, dtype)

    model = BlipVisionModel.from_pretrained("dir", dtype="bfloat16")
    model.save_pretrained("out")                    # config.json + model.safetensors

Random init copies ``blip_core.weights.random_weights`` (transformers' distributions, drawn once in
numpy for every backend, so a seed gives the same model in torch, tf and jax). Loading goes through
``blip_core.pretrained`` (strict: one error lists every bad key); tied rows (LM-head decoder)
share storage with their target through ``tie_weights``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blip_core.pretrained import config_for, hf_loading_kwargs, load_items, open_pretrained, write_pretrained
from blip_core.weights import iter_random_weights, weight_table

from .loading import load_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"``, a torch dtype or None -> a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    return DTYPES[name]


# -- activations (Hugging Face ACT2FN spellings) ----------------------------------------------
def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x):
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT_FNS = {
    "gelu": F.gelu,                                            # exact (erf) GELU
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    if name not in ACT_FNS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACT_FNS)}")
    return ACT_FNS[name]


# -- inputs --------------------------------------------------------------------------------------
def as_tensor(x, name: str, *, kind: str, device=None, ndim=None) -> Optional[torch.Tensor]:
    """Turn a numpy array / list / tensor into a tensor, checking its kind ("int" or "float") and rank.

    Raises ``ValueError`` with the argument's name on a wrong dtype or rank, before any compute.
    """
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biufc" and arr.dtype.name != "bfloat16":
            raise ValueError(f"{name} must be a numeric array, got {type(x).__name__} of dtype {arr.dtype}")
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if kind == "int":
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
        x = x.long()
    elif kind == "mask":
        if x.is_complex():
            raise ValueError(f"{name} must be 0/1 values, got dtype {x.dtype}")
    elif kind == "float":
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if ndim is not None and x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    return x


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes ships with jax
            raise RuntimeError("saving bfloat16 weights needs the 'ml_dtypes' package") from exc
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# -- base class ----------------------------------------------------------------------------------
class PreTrainedModel(nn.Module):
    """Base of every public class (see the module docstring)."""

    architecture: ClassVar[str] = ""

    def __init__(self, config=None):
        # `config` may be None when a tower class that already set `self.config` is mixed in first.
        super().__init__()
        if config is not None:
            if self.architecture:   # invariants of this class alone (jax and tf check them via the weight table)
                config.validate_for(self.architecture)
            self.config = config

    # -- init ------------------------------------------------------------------------------------
    def post_init(self, seed: Optional[int] = 0, dtype=None) -> None:
        """Seeded init (skipped for ``seed=None``, used by ``from_pretrained``), ties, dtype."""
        if seed is not None and not _SKIP_INIT[0]:
            self._init_random(seed)
        self.tie_weights()
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            self.to(dtype)

    def _init_random(self, seed: int) -> None:
        """Copy the spec layer's seeded draw into every parameter; tied rows follow in ``tie_weights``."""
        params = self.state_dict(keep_vars=True)
        table = self.weight_table()
        if set(params) != set(table):   # a parameter the table does not know would keep torch's init
            raise AssertionError(f"{type(self).__name__} parameters differ from its weight table: "
                                 f"{sorted(set(params) ^ set(table))[:5]}")
        with torch.no_grad():
            for name, value in iter_random_weights(self.architecture, self.config, seed):
                params[name].copy_(torch.from_numpy(value))

    def tie_weights(self) -> None:
        """Make tied parameters the same tensors (overridden where a class has ties)."""

    @classmethod
    def _float32_modules(cls, dtype: torch.dtype) -> tuple:
        """Top-level parts kept float32 in a model of ``dtype`` (BLIP-2's float16 rule); none here."""
        return ()

    def _set_dtype(self, dtype: torch.dtype) -> None:
        """Cast to ``dtype``, the parts of ``_float32_modules`` to float32, each tensor once (no round trip)."""
        keep = self._float32_modules(dtype)
        if not keep:
            self.to(dtype)
            return
        with torch.no_grad():
            for name, part in list(self.named_children()) + list(self.named_parameters(recurse=False)):
                dt = torch.float32 if name in keep else dtype
                if isinstance(part, nn.Parameter):
                    part.data = part.data.to(dt)
                else:
                    part.to(dt)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- files -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype=None, allow_pickle_bin: bool = False, device=None, strict: bool = True,
                        seed: int = 0, **hf_kwargs):
        """Load a Hugging Face directory; ``dtype`` defaults to float32 (as transformers).

        A checkpoint of another class of the family loads when it holds every weight this class
        needs (unused ones are dropped and named); ``strict=False`` draws missing ones from ``seed``.
        transformers' ``torch_dtype`` / ``device_map`` / ``low_cpu_mem_usage`` are understood.
        Weights stream from the memory-mapped files straight into parameters of the final dtype on
        the final device (``backends.torch.loading``): peak memory is the model plus about one tensor.
        ``quantize="int8"`` (torch only) runs every linear layer on int8 weights (``quantize.py``).
        """
        quantize = hf_kwargs.pop("quantize", None)
        dtype, device = hf_loading_kwargs(dtype, device, **hf_kwargs)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        torch_dtype = resolve_dtype(dtype) or torch.float32
        config, table, refs = open_pretrained(str(path), cls.architecture, allow_pickle_bin=allow_pickle_bin,
                                              strict=strict, seed=seed)
        with _skip_init():
            model = cls(config, seed=None)
        keep = cls._float32_modules(torch_dtype)    # read as float32 straight from the file, never via float16
        state = load_params(load_items(table, refs, "torch"), torch_dtype, device,
                            (lambda name: torch.float32 if name.split(".", 1)[0] in keep else torch_dtype) if keep else None)
        for name, spec in table.items():
            if spec.tied_to is not None:
                state[name] = state[spec.tied_to]
        with torch.no_grad():
            model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.to(device=device)
        model._set_dtype(torch_dtype)      # buffers; the loaded parameters already have their dtypes (no copy)
        model.eval()
        if quantize is not None:
            from .quantize import apply_quantization
            apply_quantization(model, quantize)
        return model

    def save_pretrained(self, path: str, max_shard_size="5GB") -> None:
        """Write ``config.json`` and safetensors weights that transformers loads (tied keys omitted)."""
        params = {k: _to_numpy(v) for k, v in self.state_dict().items()}
        write_pretrained(str(path), self.config, self.architecture, "torch", params, max_shard_size=max_shard_size)

    def weight_table(self) -> dict:
        return weight_table(self.architecture, self.config)

    @classmethod
    def config_from(cls, path_or_config):
        return config_for(cls.architecture, path_or_config)


_SKIP_INIT = [False]


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
             "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


def _no_init(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def _skip_init():
    """Build modules without the (discarded) random init and without torch's default init.

    Modules are built on the meta device, and ``torch.nn.init``'s fills are no-ops meanwhile: on
    meta tensors they would only cost time (a first ``normal_`` on meta imports torch._dynamo:
    seconds and a hundred MB of a load).
    """
    _SKIP_INIT[0] = True
    saved = {name: getattr(nn.init, name) for name in _INIT_FNS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _no_init)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
        _SKIP_INIT[0] = False


# -- attention -------------------------------------------------------------------------------------
def attention(q, k, v, mask=None, *, scale: float, output_attentions: bool = False, dropout: float = 0.0):
    """Scaled dot-product attention on (B, H, L, hd) tensors with an optional additive mask.

    Uses ``F.scaled_dot_product_attention`` (same numbers to float rounding) unless the
    probabilities are requested. Returns ``(context (B, H, L, hd), probs or None)``.
    """
    if not output_attentions:
        if mask is not None:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale), None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    dropped = F.dropout(probs, p=dropout) if dropout > 0.0 else probs
    return torch.matmul(dropped, v), probs


@functools.lru_cache(maxsize=64)
def bags(count: int, size: int, device, repeats: int = 1) -> tuple:
    """Indices and offsets of ``count * repeats`` embedding bags of ``size`` rows each over a table of ``count``
    blocks of ``size`` rows: bag ``c * repeats + r`` sums block ``c`` (``repeats`` bags in a row read the same block,
    while it is in cache). The sums of ``one_query_attention`` and of the one-row decoding layout
    (``layout._Transposed``, ``repeats`` 1: indices 0..count*size-1)."""
    if repeats == 1:
        return torch.arange(count * size, device=device), torch.arange(count, device=device) * size
    blocks = torch.arange(count, device=device).repeat_interleave(repeats)
    index = (blocks[:, None] * size + torch.arange(size, device=device)).reshape(-1)
    return index, torch.arange(count * repeats, device=device) * size


def repeated_rows(x: torch.Tensor) -> int:
    """``g`` where ``x``'s rows come in runs of ``g`` equal rows (beam search gives each input's states to each of its
    beams: ``repeat_interleave``), else 1. A row-wise product of such rows needs computing once per run. One
    comparison of neighbouring rows (~0.3 ms for three BLIP-base images), once per call that caches them."""
    n = x.shape[0]
    if n < 2:
        return 1
    same = (x[1:] == x[:-1]).reshape(n - 1, -1).all(1).tolist()
    g = same.index(False) + 1 if False in same else n
    return g if g > 1 and n % g == 0 and same == [(j + 1) % g != 0 for j in range(n - 1)] else 1


def bag_sums(table: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)`` (``weights`` flat, one per
    index), called without the functional's argument checks: ~1 us less per call, for the ~100 calls of a
    decoding step whose arguments are built right (``bags``)."""
    return torch.embedding_bag(table, index, offsets, False, 0, False, weights)[0]


def _int8_bag_ops():
    """fbgemm's 8-bit row-wise embedding-bag prepack and weighted sum, or (None, None) where this build lacks them."""
    try:
        ops = torch.ops.quantized
        return ops.embedding_bag_byte_prepack, ops.embedding_bag_byte_rowwise_offsets
    except (AttributeError, RuntimeError):
        return None, None


_INT8_PREPACK, _INT8_SUMS = _int8_bag_ops()
INT8_BAGS = _INT8_PREPACK is not None     # this build has fbgemm's 8-bit row-wise tables


def int8_rows(table: torch.Tensor) -> torch.Tensor:
    """fbgemm's 8-bit row-wise table of a float32 (rows, width) table: each row rounded to 256 levels between its own
    min and max, its scale and min stored beside it as float32 (8 more bytes a row)."""
    return _INT8_PREPACK(table)


def int8_bag_sums(table: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor):
    """``bag_sums`` over an ``int8_rows`` table: float32 weights and float32 sums of the rows as stored."""
    return _INT8_SUMS(table, index, offsets, False, 0, False, weights, None, False)


class ImageKV(tuple):
    """A decoder layer's cached image keys/values ``(k, v)`` (``BlipTextSelfAttention.cross_kv``), and for an int8
    model (``quantize.Int8Linear`` projections) their 8-bit row-wise tables, ``rows8``: the keys' rows (one feature
    of one head over every image position) and the values' rows (one position of one head), the tables
    ``one_query_attention`` reads in place of ``k`` and ``v``. Unpacks as ``k, v``."""

    rows8 = None

    def __new__(cls, k, v, rows8=None):
        pair = super().__new__(cls, (k, v))
        pair.rows8 = rows8
        return pair


def image_rows8(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """``ImageKV.rows8`` of float32 keys ``k`` (N, H, S, hd; a transposed view of contiguous keys) and values ``v``
    (N, H, S, hd, contiguous): the two tables ``one_query_attention`` sums, each row rounded on its own."""
    n, h, s, hd = v.shape
    return int8_rows(k.transpose(-1, -2).reshape(n * h * hd, s)), int8_rows(v.reshape(n * h * s, hd))


def one_query_attention(q, k, v, mask=None, *, scale: float, rows8=None):
    """``attention`` of one query row per head over cached keys/values, as two embedding-bag sums.

    ``q`` (B, H, 1, hd); ``k`` (N, H, S, hd) a transposed view of contiguous (N, H, hd, S) keys; ``v``
    (N, H, S, hd) contiguous, where N divides B: runs of ``B // N`` query rows share one row of keys/values (beam
    search's beams of one image read its one copy); ``mask`` additive, broadcastable to (B, H, 1, S). The scores
    are each head's key rows weighted by its query, the context its value rows weighted by the probabilities;
    fbgemm's kernel streams both at memory speed (on one core about 2x faster than ``scaled_dot_product_attention``
    at one query over 577 image keys). float32: the same numbers to float32 rounding; bfloat16: float32 sums
    rounded to bfloat16 once per product (scores, context), as a bfloat16 matmul rounds, and the softmax's
    probabilities in bfloat16. ``rows8``: ``image_rows8(k, v)`` (float32): both sums read these 8-bit tables
    instead (a quarter of the bytes; each key and value row rounded between its own min and max, the query and the
    probabilities not rounded). Returns the context (B, H, 1, hd).
    """
    b, h, _, hd = q.shape
    n, s = k.shape[0], k.shape[2]
    g = b // n
    kt = k.transpose(-1, -2)
    q = q * scale
    if g > 1:   # bags ordered (input, head, row): a head's keys read by its rows one after another
        q = q.view(n, g, h, hd).transpose(1, 2)
    if rows8 is None:
        sums, keys, values = bag_sums, kt.reshape(n * h * hd, s), v.reshape(n * h * s, hd)
    else:
        sums, (keys, values) = int8_bag_sums, rows8
    idx, off = bags(n * h, hd, q.device, g)
    scores = sums(keys, idx, off, q.reshape(-1))
    if mask is not None:
        mask = mask.to(scores.dtype)
        if g > 1:
            mask = torch.broadcast_to(mask, (b, h, 1, s)).reshape(n, g, h, s).transpose(1, 2)
        scores = (scores.view(n, h, g, s) + mask).view(n * h * g, s)
    probs = torch.softmax(scores, dim=-1)
    idx, off = bags(n * h, s, q.device, g)
    ctx = sums(values, idx, off, probs.reshape(-1))
    if g > 1:
        return ctx.view(n, h, g, hd).transpose(1, 2).reshape(b, h, 1, hd)
    return ctx.view(b, h, 1, hd)


def fits_one_query_attention(q, k, v) -> bool:
    """``one_query_attention`` serves these tensors: one float32 or bfloat16 CPU query row per head, no gradients,
    keys stored transposed and values contiguous (``TextCache``'s image keys/values), one key/value row per run of
    query rows."""
    return (q.shape[2] == 1 and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and q.device.type == "cpu" and k.shape[0] > 0 and q.shape[0] % k.shape[0] == 0
            and not torch.is_grad_enabled() and k.transpose(-1, -2).is_contiguous() and v.is_contiguous())
