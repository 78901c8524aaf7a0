"""Checkpoint tensors -> torch parameters, one tensor at a time (see ``blip_core.checkpoint.mapped``).

* A tensor stored in the dtype asked for, loaded to the CPU, becomes a view of the memory-mapped
  file, as transformers' loader (through ``safetensors``) does: no copy, no new memory, pages
  read from the page cache as the model first touches them. The mapping is private
  (copy-on-write), so writing to a parameter (training) copies that page and never reaches the
  file. The price, the same as transformers': the model keeps the file mapped for its life, and
  a program that rewrites the file *in place* under a live model changes its weights (a truncated
  file is a ``SIGBUS`` on the next read). Our ``save_pretrained`` writes a new file and renames
  it over the old one, so saving into the directory a model was loaded from is safe.
* Any other tensor is allocated once, in its final dtype and on its final device, and filled by
  ``Tensor.copy_``; its mapped pages are then dropped from this process, so the peak is the model
  plus about one tensor. Onto a GPU in another dtype, the tensor goes there as stored and is cast
  there: a ``copy_`` from the host that also casts does the cast on the host first (loading the
  2.7B bfloat16 checkpoint as float32 onto an H200 took 40 s of host CPU time for 4 s of load) and
  then moves the wider values.
* Arrays read for this load alone (h5 datasets, msgpack leaves, ``.bin`` tensors) are taken over
  when their dtype matches.
"""
from __future__ import annotations

import torch

from blip_core.checkpoint import in_order


def as_torch(ref) -> torch.Tensor:
    """A ref's data as a torch tensor sharing its memory (bfloat16 without ml_dtypes)."""
    t = torch.from_numpy(ref.raw())
    return t.view(torch.bfloat16) if ref.dtype_name == "bfloat16" else t


def load_params(items: list, dtype: torch.dtype, device=None, dtype_of=None) -> dict:
    """``{name: tensor of dtype on device}`` from ``blip_core.pretrained.load_items`` rows (torch layout);
    ``dtype_of(name)``, where given, each tensor's dtype instead (float16 BLIP-2's float32 parts)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    target = {name: dtype if dtype_of is None else dtype_of(name) for name, _, _ in items}

    def new_itemsize(item):     # host bytes per element: the tensors cast on the CPU (a device's memory is not the host's)
        name, ref, _ = item
        return target[name].itemsize if device.type == "cpu" and getattr(torch, ref.dtype_name, None) != target[name] else 0
    out = {}
    for name, ref, _ in in_order(items, ref=lambda item: item[1], new_itemsize=new_itemsize):
        dt = target[name]
        src = as_torch(ref)
        if src.dtype == dt and device.type == "cpu" and src.is_contiguous() and ref.raw().flags.writeable:
            out[name] = src                  # the file mapping itself, or an array read for us alone
            continue
        dst = torch.empty(src.shape, dtype=dt, device=device)
        if device.type != "cpu" and src.dtype != dt:
            src = src.to(device)             # as stored, then cast on the device (docstring)
        dst.copy_(src)
        out[name] = dst
        del src
        ref.release()
    return out
