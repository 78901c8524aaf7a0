"""Checkpoint tensors -> TensorFlow tensors on the target device, one tensor at a time.

``LazyValues`` is the mapping ``BlipTFModel.__init__`` reads its initial values from: each value
is made when the model asks for it (the model turns it into its variable at once) and dropped
after, so no dict of the whole checkpoint is built first. A value goes to the device as stored,
then the layout change (the weight table's axis permutation) and the cast run there; the
tensor's mapped pages are dropped before the next one (see ``blip_core.checkpoint.mapped``).

On the CPU a value is instead laid out and cast on the host in one pass, from the mapped file into a
fresh 64-byte-aligned buffer (``blip_core.checkpoint.host_layout``), which TensorFlow takes without a
copy through DLPack (the variable then keeps that buffer: no copy there either). Only aligned buffers
are handed over: an unaligned one aborts the process at the first Eigen kernel that reads it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from blip_core.checkpoint import in_order
from blip_core.checkpoint.dtypes import is_floating
from blip_core.checkpoint.host_layout import is_aligned, relayout
from blip_core.pretrained import device_kind


def as_tf(arr: np.ndarray) -> tf.Tensor:
    """A numpy array (bfloat16 through ml_dtypes included) as a tf tensor (a copy)."""
    if arr.dtype.name == "bfloat16":
        return tf.bitcast(tf.constant(arr.view(np.uint16)), tf.bfloat16)
    return tf.constant(arr)


def from_host(arr: np.ndarray) -> tf.Tensor:
    """A numpy array as a CPU tf tensor: its own memory when 64-byte aligned and C-contiguous (DLPack), else a copy.

    The caller must not write to ``arr`` afterwards (the tensor and any variable made from it share it).
    """
    if arr.size == 0 or not is_aligned(arr):
        return as_tf(arr)
    if arr.dtype.name == "bfloat16":     # numpy's DLPack export knows no bfloat16: its bits, seen again as bfloat16
        return tf.bitcast(tf.experimental.dlpack.from_dlpack(arr.view(np.uint16).__dlpack__()), tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(arr.__dlpack__())


def tf_device(device):
    """A ``device=`` as every backend takes it (``"cpu"``, ``"gpu"``, ``"cuda:1"``, or TF's ``"/GPU:0"``) as TF's
    name; None / "auto" (TF's default placement) as they are."""
    if device in (None, "auto"):
        return device
    kind, index = device_kind(device)
    return f"/{kind.upper()}:{index}"


def on_host(device) -> bool:
    """Whether ops under ``device`` (None / "auto": TF's default placement) run on the CPU."""
    if device in (None, "auto"):
        return not tf.config.list_logical_devices("GPU")
    return "CPU" in str(device).upper()


class LazyValues:
    """``{tf path: tensor of dtype}``, each made on first access, in the order of ``items``."""

    def __init__(self, items: list, dtype: tf.DType, device=None):
        self._items = {path: (ref, perm) for path, ref, perm in items}
        self._dtype, self._device = dtype, device
        self._host = on_host(device)
        # on the host every tensor gets a buffer of its own (see ``in_order``)
        self._order = in_order(items, ref=lambda item: item[1],
                               new_itemsize=lambda item: dtype.size if self._host else 0)

    def __contains__(self, path) -> bool:
        return path in self._items

    def __getitem__(self, path) -> tf.Tensor:
        next(self._order, None)          # keeps the readahead going in table order
        ref, perm = self._items.pop(path)
        if self._host and is_floating(ref.dtype) and self._dtype.is_floating:
            arr = relayout(ref.view(), perm, self._dtype.as_numpy_dtype)     # one pass, into memory of its own
            ref.release()
            return from_host(arr)
        with tf.device(self._device) if self._device not in (None, "auto") else contextlib.nullcontext():
            x = as_tf(ref.view())
            ref.release()
            if perm is not None:
                x = tf.transpose(x, perm)
            return tf.cast(x, self._dtype)

