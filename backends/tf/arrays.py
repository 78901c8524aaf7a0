"""numpy / nested lists -> TensorFlow tensors for the processors' ``return_tensors="tf"``.

Registered with the spec layer when the package is imported.
"""
import tensorflow as tf

from blip_core.registry import register_tensor_type


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become TensorFlow's default int32."""
    return tf.constant(value, dtype=tf.int32 if empty else None)


def move(value, *args, device=None, dtype=None):
    """``BatchFeature.to`` for TensorFlow: a device name ("/GPU:0") places a copy there; a dtype
    casts floating tensors only (ids and masks keep their type)."""
    for arg in args:
        if isinstance(arg, tf.dtypes.DType) or arg in ("float16", "bfloat16", "float32", "float64"):
            dtype = arg
        else:
            device = arg
    if dtype is not None and value.dtype.is_floating:
        value = tf.cast(value, dtype)
    if device not in (None, "cpu"):
        with tf.device(device):
            value = tf.identity(value)
    return value


register_tensor_type("tf", processor_tensor, move)
