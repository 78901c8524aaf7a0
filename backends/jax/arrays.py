"""numpy / nested lists -> JAX arrays for the processors' ``return_tensors="jax"``."""
import jax.numpy as jnp


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become JAX's default int32."""
    return jnp.array(value, dtype=jnp.int32 if empty else None)
