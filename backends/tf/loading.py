"""Checkpoint tensors -> TensorFlow tensors on the target device, one tensor at a time.

``LazyValues`` is the mapping ``BlipTFModel.__init__`` reads its initial values from: each value
is made when the model asks for it (the model turns it into its variable at once) and dropped
after, so no dict of the whole checkpoint is built first. A value goes to the device as stored,
then the layout change (the weight table's axis permutation) and the cast run there; the
tensor's mapped pages are dropped before the next one (see ``blip_core.checkpoint.mapped``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from blip_core.checkpoint import in_order


def as_tf(arr: np.ndarray) -> tf.Tensor:
    """A numpy array (bfloat16 through ml_dtypes included) as a tf tensor (a copy)."""
    if arr.dtype.name == "bfloat16":
        return tf.bitcast(tf.constant(arr.view(np.uint16)), tf.bfloat16)
    return tf.constant(arr)


class LazyValues:
    """``{tf path: tensor of dtype}``, each made on first access, in the order of ``items``."""

    def __init__(self, items: list, dtype: tf.DType, device=None):
        self._items = {path: (ref, perm) for path, ref, perm in items}
        self._order = in_order(items, ref=lambda item: item[1])
        self._dtype, self._device = dtype, device

    def __contains__(self, path) -> bool:
        return path in self._items

    def __getitem__(self, path) -> tf.Tensor:
        next(self._order, None)          # keeps the readahead going in table order
        ref, perm = self._items.pop(path)
        with tf.device(self._device) if self._device not in (None, "auto") else contextlib.nullcontext():
            x = as_tf(ref.view())
            ref.release()
            if perm is not None:
                x = tf.transpose(x, perm)
            return tf.cast(x, self._dtype)

