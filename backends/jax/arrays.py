"""numpy / nested lists -> JAX arrays for the processors' ``return_tensors="jax"``.

Registered with the spec layer when the package is imported.
"""
import jax.numpy as jnp

from blip_core.registry import register_tensor_type


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become JAX's default int32."""
    return jnp.array(value, dtype=jnp.int32 if empty else None)


register_tensor_type("jax", processor_tensor)
