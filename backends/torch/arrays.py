"""numpy / nested lists -> torch tensors for the processors' ``return_tensors="pt"``.

Registered with the spec layer when the package is imported.
"""
import numpy as np
import torch

from blip_core.registry import register_tensor_type


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists keep torch's default int64; an empty batch is int64."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        value = np.array(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.tensor(value, dtype=torch.int64 if empty else None)


def move(value: torch.Tensor, *args, device=None, dtype=None, **kwargs) -> torch.Tensor:
    """transformers' ``BatchFeature.to``: every tensor to ``device``; only floating ones to ``dtype``."""
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        else:
            device = arg
    if torch.is_floating_point(value):
        return value.to(device=device, dtype=dtype, **kwargs)
    return value.to(device=device, **kwargs)


register_tensor_type("pt", processor_tensor, move)
