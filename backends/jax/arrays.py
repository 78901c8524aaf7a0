"""numpy / nested lists -> JAX arrays for the processors' ``return_tensors="jax"``.

Registered with the spec layer when the package is imported.
"""
import jax
import jax.numpy as jnp

from blip_core.registry import register_tensor_type


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists become JAX's default int32."""
    return jnp.array(value, dtype=jnp.int32 if empty else None)


def move(value, *args, device=None, dtype=None):
    """``BatchFeature.to`` for JAX: a ``jax.Device`` or platform name ("cpu", "gpu") places the array
    there; a dtype casts floating arrays only (ids and masks keep their type)."""
    for arg in args:
        if isinstance(arg, jax.Device) or (isinstance(arg, str) and arg in ("cpu", "gpu", "cuda", "tpu")):
            device = arg
        else:
            dtype = arg
    if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(dtype)
    if device is not None:
        value = jax.device_put(value, jax.devices(device)[0] if isinstance(device, str) else device)
    return value


register_tensor_type("jax", processor_tensor, move)
