"""numpy / nested lists -> torch tensors for the processors' ``return_tensors="pt"``."""
import numpy as np
import torch


def processor_tensor(value, empty: bool):
    """As transformers' processors: integer lists keep torch's default int64; an empty batch is int64."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        value = np.array(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.tensor(value, dtype=torch.int64 if empty else None)
