"""Checkpoint tensors -> torch parameters, one tensor at a time (see ``blip_core.checkpoint.mapped``).

Each parameter is allocated once, in its final dtype and on its final device, and filled from
the memory-mapped checkpoint by ``Tensor.copy_`` (which casts and moves to the device in the same
pass); the tensor's mapped pages are then dropped, so the peak is the model plus about one tensor.

Parameters own their memory. transformers' loader (through ``safetensors``) keeps parameters
whose dtype matches the file as views of a private file mapping; that saves one memory copy per
byte but ties the model to the file for its whole life: a file rewritten in place under it (as a
non-atomic ``save_pretrained`` to the same directory does) changes the weights, and a truncated
one is a ``SIGBUS`` on the next read. A copy from the page cache costs little next to that.
Arrays already read for this load alone (h5 datasets, msgpack leaves, ``.bin`` tensors) are
taken over without a copy when their dtype matches.
"""
from __future__ import annotations

import numpy as np
import torch

from blip_core.checkpoint import MappedRef, in_order


def as_torch(arr: np.ndarray) -> torch.Tensor:
    """A numpy array (bfloat16 through ml_dtypes included) as a torch tensor sharing its memory."""
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def load_params(items: list, dtype: torch.dtype, device=None) -> dict:
    """``{name: tensor of dtype on device}`` from ``blip_core.pretrained.load_items`` rows (torch layout)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = {}
    for name, ref, _ in in_order(items, ref=lambda item: item[1]):
        arr = ref.view()
        src = as_torch(arr)
        if (src.dtype == dtype and device.type == "cpu" and arr.flags.writeable and arr.flags.c_contiguous
                and not isinstance(ref, MappedRef)):
            out[name] = src                  # read for this load alone: take it over
            continue
        dst = torch.empty(src.shape, dtype=dtype, device=device)
        dst.copy_(src)
        out[name] = dst
        del src, arr
        ref.release()
    return out

