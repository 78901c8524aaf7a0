"""numpy / nested lists -> TensorFlow tensors for the processors' ``return_tensors="tf"``.

Registered with the spec layer when the package is imported.
"""
import tensorflow as tf

from blip_core.registry import register_tensor_type


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become TensorFlow's default int32."""
    return tf.constant(value, dtype=tf.int32 if empty else None)


register_tensor_type("tf", processor_tensor)
