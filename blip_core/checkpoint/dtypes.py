"""Dtype names shared by the safetensors reader/writer and the restricted torch unpickler.

numpy has no bfloat16 or float8; ``ml_dtypes`` (installed with jax) provides them. It is imported
only when such a tensor is met, so the spec layer keeps working without it for float32/16 data.
"""
from __future__ import annotations

import numpy as np

from .errors import CheckpointError

# safetensors dtype tag -> dtype name (numpy's, or ml_dtypes' for the extended floats).
SAFETENSORS_TO_NAME = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
NAME_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_NAME.items()}

# The Rust safetensors writer orders tensors by this enum, largest first, then by name; we use
# the same order so our files are byte-identical to safetensors' own (and naturally aligned).
SAFETENSORS_RANK = {tag: i for i, tag in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"])}

_ML_DTYPES_NAMES = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}
FLOAT_NAMES = {"float16", "float32", "float64"} | _ML_DTYPES_NAMES


def numpy_dtype(name: str, context: str = "") -> np.dtype:
    """The numpy dtype for a dtype name; extended floats come from ml_dtypes (lazily)."""
    if name in _ML_DTYPES_NAMES:
        try:
            import ml_dtypes  # optional: ships with jax
        except ImportError as exc:
            where = f"{context}: " if context else ""
            raise CheckpointError(
                f"{where}{name} data needs the 'ml_dtypes' package (installed with jax; "
                f"`pip install ml_dtypes`) because numpy has no {name} type") from exc
        return np.dtype(getattr(ml_dtypes, name))
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise CheckpointError(f"{context}: unknown dtype {name!r}") from exc


def as_dtype(dtype) -> np.dtype:
    """Accept a dtype name ("bfloat16", "float16", ...) or anything numpy takes."""
    if isinstance(dtype, str):
        return numpy_dtype(dtype, "cast")
    return np.dtype(dtype)


def is_floating(dtype: np.dtype) -> bool:
    """True for numpy floats and ml_dtypes' bfloat16/float8 (whose numpy kind is 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name in _ML_DTYPES_NAMES
