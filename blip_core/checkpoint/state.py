"""State dicts against weight tables: strict checking, tie filling and stripping, casting.

A weight table (``blip_core.weights.spec``) is the single source of truth: a state dict either
matches it exactly (modulo tied rows, which may be absent) or loading fails with one error that
lists every problem, as big_vision's ``merge_params`` does. Nothing is reshaped to fit.
"""
from __future__ import annotations

import numpy as np

from .dtypes import FLOAT_NAMES, as_dtype, is_floating
from .errors import StateDictMismatchError


def tie_root(name: str, table: dict) -> str:
    """The owning row a tied row ultimately shares storage with (follows chains of ties)."""
    seen = [name]
    while table[name].tied_to is not None:
        target = table[name].tied_to
        if target not in table:
            raise ValueError(f"weight table: {name!r} is tied to {target!r}, which is not in the table")
        if target in seen:
            raise ValueError(f"weight table: tie cycle {' -> '.join(seen + [target])}")
        seen.append(target)
        name = target
    return name


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _report(source, table_size: int, missing, unexpected, mismatched, wrong_dtype=()) -> str:
    lines = [f"state dict{f' from {source}' if source else ''} does not match the weight table "
             f"({table_size} rows):"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s):")
        lines += [f"    {k}" for k in missing]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s):")
        lines += [f"    {k}" for k in unexpected]
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es):")
        for k, want, got in mismatched:
            hint = "  (transposed? check the layout transform)" if (
                len(want) > 1 and tuple(reversed(want)) == got) else ""
            lines.append(f"    {k}: expected {_fmt_shape(want)}, found {_fmt_shape(got)}{hint}")
    if wrong_dtype:
        lines.append(f"  {len(wrong_dtype)} non-floating weight(s) (every row is a float parameter; "
                     "integer or bool data is refused, not cast):")
        lines += [f"    {k}: {d}" for k, d in wrong_dtype]
    return "\n".join(lines)


def non_floating(state: dict) -> list:
    """``(name, dtype name)`` of every tensor in ``state`` that is not floating point."""
    out = []
    for name, value in state.items():
        if isinstance(getattr(value, "dtype_name", None), str):    # a TensorRef: no ml_dtypes import needed
            if value.dtype_name not in FLOAT_NAMES:
                out.append((name, value.dtype_name))
            continue
        dtype = getattr(value, "dtype", None)
        dtype = np.asarray(value).dtype if dtype is None else np.dtype(dtype)
        if not is_floating(dtype):
            out.append((name, dtype.name))
    return out


def check_state_dict(state: dict, table: dict, fill_ties: bool = True, source: str | None = None) -> dict:
    """Strictly match ``state`` (name -> array) to ``table``; return it completed, in table order.

    Raises one ``StateDictMismatchError`` listing every missing key, unexpected key and shape
    mismatch. Rows with ``tied_to`` may be absent (safetensors files from transformers omit
    them). In the result every tied row holds its owner's array (the same object): with
    ``fill_ties=True`` absent tied rows are added, with ``False`` they stay absent. A tied row that
    is present must have its owner's shape; its own values are discarded in favour of the
    owner's, as transformers re-ties such weights after loading.
    """
    missing, mismatched = [], []
    for name, spec in table.items():
        owner = tie_root(name, table)
        want = tuple(table[owner].shape)
        if name in state:
            got = tuple(np.shape(state[name]))
            if got != want:
                mismatched.append((name, want, got))
        elif spec.tied_to is None:
            missing.append(name)
    unexpected = [k for k in state if k not in table]
    wrong_dtype = non_floating({k: v for k, v in state.items() if k in table})
    if missing or unexpected or mismatched or wrong_dtype:
        raise StateDictMismatchError(_report(source, len(table), missing, unexpected, mismatched, wrong_dtype),
                                     missing, unexpected, mismatched, wrong_dtype)
    out = {}
    for name, spec in table.items():
        if spec.tied_to is None:
            out[name] = state[name]
        elif fill_ties or name in state:
            out[name] = state[tie_root(name, table)]
    return out


def strip_tied(state: dict, table: dict) -> dict:
    """``state`` without the rows the table marks as tied (what transformers writes to safetensors).

    Names unknown to the table are kept; ``check_state_dict`` is the place to reject them.
    """
    return {k: v for k, v in state.items() if k not in table or table[k].tied_to is None}


def cast_state_dict(state: dict, dtype) -> dict:
    """Cast floating tensors to ``dtype`` ("float32", "float16", "bfloat16" or a numpy dtype).

    Integer and bool tensors (position ids, buffers) are left alone; arrays already of ``dtype``
    are returned as they are. Rounding is round-to-nearest-even, as torch's ``.to(dtype)``.
    """
    target = as_dtype(dtype)
    if not is_floating(target):
        raise ValueError(f"cast_state_dict casts to a floating dtype, got {target}")
    out = {}
    for name, value in state.items():
        arr = np.asarray(value)
        out[name] = arr.astype(target) if is_floating(arr.dtype) and arr.dtype != target else arr
    return out
