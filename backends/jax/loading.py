"""Checkpoint tensors -> jax arrays on the target device, one tensor at a time.

On the CPU, each tensor is laid out (the weight table's axis permutation) and cast on the host in
one pass, from the mapped file into a fresh 64-byte-aligned buffer (``blip_core.checkpoint.host_layout``),
which ``jax.device_put`` then takes as the array's memory without copying it: one pass over the data,
no compiled program per tensor shape, and nothing held but the model. On an accelerator, each
tensor goes to the device as stored (a bfloat16 file moves half the bytes of a float32 model) and
the layout change and the cast run there as one compiled program. Either way the mapped pages are
dropped before the next tensor, so the peak is the model plus about one tensor (see
``blip_core.checkpoint.mapped``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blip_core.checkpoint import in_order
from blip_core.checkpoint.dtypes import is_floating
from blip_core.checkpoint.host_layout import relayout
from blip_core.pretrained import device_kind


@functools.partial(jax.jit, static_argnames=("perm", "dtype"))
def _relayout(x, perm, dtype):
    return jnp.transpose(x, perm).astype(dtype)


def on_cpu(device) -> bool:
    """Whether ``device`` (None: jax's default device) is a CPU."""
    return (device or jax.devices()[0]).platform == "cpu"


def place(arr: np.ndarray, perm, dtype, device=None):
    """One host array -> a jax array of ``dtype`` in the backend layout, on ``device``; never aliases ``arr``
    (which may be a file mapping)."""
    dtype = np.dtype(dtype)
    if on_cpu(device) and is_floating(arr.dtype) and is_floating(dtype):
        # laid out and cast into a buffer of its own, which device_put aliases (64-byte aligned) on the CPU
        return jax.device_put(relayout(arr, perm, dtype), device)
    x = jax.device_put(arr, device)      # a copy onto the device, as stored
    if perm is None and x.dtype == dtype:
        return x
    return _relayout(x, perm=perm or tuple(range(arr.ndim)), dtype=dtype)   # runs where x is


def load_params(items: list, dtype, device=None, leaf_dtype=None) -> dict:
    """``{jax path: array}`` from ``blip_core.pretrained.load_items`` rows; ``device`` a ``jax.Device`` or None;
    ``leaf_dtype(path)``, where given, the dtype of each leaf instead of ``dtype`` (float16 BLIP-2's float32 parts)."""
    leaf = (lambda path: dtype) if leaf_dtype is None else leaf_dtype
    host = on_cpu(device)     # on the CPU every tensor gets a host buffer of its own (see ``in_order``)
    out = {}
    for path, ref, perm in in_order(items, ref=lambda item: item[1],
                                    new_itemsize=lambda item: np.dtype(leaf(item[0])).itemsize if host else 0):
        out[path] = place(ref.view(), perm, leaf(path), device)
        out[path].block_until_ready()    # the host data must be read before its pages are dropped
        ref.release()
    return out


def resolve_device(device):
    """``None`` / ``"auto"``: jax's default device; ``"cpu"``, ``"gpu"``, ``"cuda:1"``, ``"tpu:0"``: that device."""
    if device in (None, "auto"):
        return None
    if isinstance(device, jax.Device):
        return device
    kind, i = device_kind(device)
    try:
        devices = jax.devices(kind)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r}: jax has no {kind} devices ({exc})") from None
    if not 0 <= i < len(devices):
        raise ValueError(f"device={device!r}: jax has {len(devices)} {kind} device(s)")
    return devices[i]
