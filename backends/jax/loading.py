"""Checkpoint tensors -> jax arrays on the target device, one tensor at a time.

Each tensor goes to the device as stored (a bfloat16 file moves half the bytes of a float32
model), and the layout change (the weight table's axis permutation) and the cast run there as one
compiled program; the host copy and the mapped pages are dropped before the next tensor, so the
peak is the model plus about one tensor (see ``blip_core.checkpoint.mapped``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blip_core.checkpoint import in_order


@functools.partial(jax.jit, static_argnames=("perm", "dtype"))
def _relayout(x, perm, dtype):
    return jnp.transpose(x, perm).astype(dtype)


def place(arr: np.ndarray, perm, dtype, device=None):
    """One host array -> a jax array of ``dtype`` in the backend layout, on ``device`` (copied, never aliased)."""
    x = jax.device_put(arr, device)      # a copy: jnp.asarray could alias the file mapping on CPU
    if perm is None and x.dtype == dtype:
        return x
    return _relayout(x, perm=perm or tuple(range(arr.ndim)), dtype=np.dtype(dtype))   # runs where x is


def load_params(items: list, dtype, device=None, leaf_dtype=None) -> dict:
    """``{jax path: array}`` from ``blip_core.pretrained.load_items`` rows; ``device`` a ``jax.Device`` or None;
    ``leaf_dtype(path)``, where given, the dtype of each leaf instead of ``dtype`` (float16 BLIP-2's float32 parts)."""
    out = {}
    for path, ref, perm in in_order(items, ref=lambda item: item[1]):
        out[path] = place(ref.view(), perm, dtype if leaf_dtype is None else leaf_dtype(path), device)
        out[path].block_until_ready()    # the host data must be read before its pages are dropped
        ref.release()
    return out


def resolve_device(device):
    """``None`` / ``"auto"``: jax's default device; ``"cpu"``, ``"gpu"``, ``"cuda:1"``, ``"tpu:0"``: that device."""
    if device in (None, "auto"):
        return None
    if isinstance(device, jax.Device):
        return device
    kind, _, index = str(device).partition(":")
    kind = {"cuda": "gpu", "rocm": "gpu"}.get(kind, kind)
    try:
        devices = jax.devices(kind)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r}: jax has no {kind} devices ({exc})") from None
    i = int(index) if index else 0
    if not 0 <= i < len(devices):
        raise ValueError(f"device={device!r}: jax has {len(devices)} {kind} device(s)")
    return devices[i]
