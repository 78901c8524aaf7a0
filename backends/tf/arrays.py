"""numpy / nested lists -> TensorFlow tensors for the processors' ``return_tensors="tf"``."""
import tensorflow as tf


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become TensorFlow's default int32."""
    return tf.constant(value, dtype=tf.int32 if empty else None)
