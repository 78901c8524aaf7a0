"""The eager PyTorch decoding engine: drives any model's step function with the shared rulebook.

The search rules (processors, greedy/sampling/beam steps, stopping, padding) are
``blip_core.decoding``'s; this module supplies their array vocabulary (``TorchOps``) and the
Python loop. A model brings::

    step(ids, positions, key_mask, cache, index, context) -> (logits of the last position (N, V), cache)

``ids`` (N, s) is the whole prompt on the first call (``index`` 0, ``cache`` None) and then one
token at buffer slot ``index``; ``positions`` (N, s) are ``cumsum(mask) - 1`` with padded slots at
1 (transformers' rule); ``key_mask`` (N, T) marks the real tokens over the whole
``prompt + max_new_tokens`` buffer (a model attends to ``key_mask[:, :index + s]``); ``context``
is the model's per-input state (image keys/values, encoder states), repeated per beam or sample
by the engine. Caches may grow (torch's own layout); beam search reorders their rows with
``reorder_cache(cache, rows)``.

Sampling draws with ``torch.multinomial`` from ``generator``, or a fresh generator seeded with
``settings.seed``, or torch's global generator, so seeded results equal transformers' own.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from blip_core import decoding
from blip_core.generation import GenerationSettings
from blip_core.outputs import GenerateOutput

_DTYPES = {"int32": torch.long, "float32": torch.float32, "bool": torch.bool}


class TorchOps:
    """``blip_core.decoding``'s array vocabulary in eager torch (logical int32 is torch's int64)."""

    def __init__(self, device, generator: Optional[torch.Generator]):
        self.device, self.generator = device, generator

    def _t(self, x, dtype=None):
        if isinstance(x, torch.Tensor):
            return x if dtype is None else x.to(dtype)
        return torch.as_tensor(x, dtype=dtype, device=self.device)

    def scalar(self, v):
        return v

    def rows(self, x):
        return x.shape[0]

    def asarray(self, a):
        a = np.asarray(a)
        return torch.as_tensor(a.astype(np.int64) if a.dtype.kind in "iu" else a, device=self.device)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=_DTYPES[dtype], device=self.device)

    def ones(self, shape, dtype):
        return torch.ones(shape, dtype=_DTYPES[dtype], device=self.device)

    def full(self, shape, value, dtype):
        return torch.full(shape, value, dtype=_DTYPES[dtype], device=self.device)

    def arange(self, n):
        return torch.arange(n, device=self.device)

    def cast(self, x, dtype):
        return self._t(x).to(_DTYPES[dtype])

    def broadcast(self, x, shape):
        return self._t(x).expand(shape) if isinstance(x, torch.Tensor) else torch.full(shape, x, device=self.device)

    def where(self, c, a, b):
        return torch.where(self._t(c), a, b)

    def maximum(self, a, b):
        return max(a, b) if not isinstance(a, torch.Tensor) else torch.clamp(a, min=b)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, xs, axis):
        return torch.cat(xs, dim=axis)

    def take(self, x, rows):
        return x.index_select(0, rows.long())

    def take_along(self, x, idx, axis):
        return torch.take_along_dim(x, idx.long(), dim=axis)

    def at(self, table, i):
        return table[i]

    def top_k(self, x, k):
        return torch.topk(x, k)

    def argmax(self, x):
        return torch.argmax(x, dim=-1)

    def argsort(self, x):
        return torch.sort(x, dim=-1, descending=False, stable=True)[1]

    def unsort(self, values, order):
        return values.scatter(1, order, values)

    def log_softmax(self, x):
        return F.log_softmax(x, dim=-1)

    def softmax(self, x):
        return F.softmax(x, dim=-1)

    def cumsum(self, x, axis):
        return x.cumsum(axis)

    def sum(self, x, axis):
        return x.sum(axis)

    def any(self, x, axis=None, keepdims=False):
        return x.any() if axis is None else x.any(dim=axis, keepdim=keepdims)

    def all(self, x, axis=None, keepdims=False):
        return x.all() if axis is None else x.all(dim=axis, keepdim=keepdims)

    def min(self, x, axis, keepdims=False):
        return x.amin(dim=axis, keepdim=keepdims)

    def max(self, x, axis=None):
        return int(x.max()) if axis is None else x.amax(dim=axis)

    def isin(self, tokens, ids):
        return torch.isin(self._t(tokens), ids)

    def mark(self, shape, cols, valid):
        """Boolean (N, V): True at ``cols[i, j]`` wherever ``valid[i, j]``."""
        out = torch.zeros((shape[0], shape[1] + 1), dtype=torch.bool, device=self.device)
        cols = torch.where(valid, cols.long(), shape[1])            # invalid entries go to a spare column
        return out.scatter(1, cols, True)[:, : shape[1]]

    def read(self, x, start, size, axis):
        return x.narrow(axis, int(start), size)

    def write(self, x, update, index, axis):
        x = x.clone()
        x.narrow(axis, int(index), update.shape[axis]).copy_(update)
        return x

    def sample(self, rng, scores, num):
        """``num`` draws per row without replacement from softmax(scores), as transformers draws."""
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=num, generator=self.generator), rng


def default_reorder_cache(cache, rows: torch.Tensor):
    """Select cache rows in nested tuples/lists/dicts (or ``cache.reorder(rows)`` when it has one)."""
    if cache is None:
        return None
    if hasattr(cache, "reorder"):
        return cache.reorder(rows)
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, rows.to(cache.device))
    if isinstance(cache, dict):
        return {k: default_reorder_cache(v, rows) for k, v in cache.items()}
    if isinstance(cache, (list, tuple)):
        return type(cache)(default_reorder_cache(v, rows) for v in cache)
    return cache


def repeat_rows(tree, n: int):
    """``repeat_interleave`` every tensor of a nested context ``n`` times along rows."""
    if n == 1 or tree is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.repeat_interleave(n, dim=0)
    if isinstance(tree, dict):
        return {k: repeat_rows(v, n) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(repeat_rows(v, n) for v in tree)
    return tree


def _generator(settings: GenerationSettings, generator, device) -> Optional[torch.Generator]:
    if generator is not None:
        return generator
    if settings.seed is not None:
        return torch.Generator(device=device).manual_seed(int(settings.seed))
    return None


@torch.no_grad()
def generate(step: Callable, input_ids, settings: GenerationSettings, *, vocab_size: int, attention_mask=None,
             context=None, reorder_cache: Callable = default_reorder_cache,
             generator: Optional[torch.Generator] = None):
    """Decode from ``input_ids`` (B, P) with ``step`` (see the module docstring).

    Returns int64 ids (B * num_return_sequences, P + generated) including the prompt, or a
    ``GenerateOutput`` with ``settings.return_dict_in_generate``.
    """
    input_ids = torch.as_tensor(input_ids).long()
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.from_numpy(decoding.infer_prompt_mask(input_ids.cpu().numpy(), settings))
    attention_mask = torch.as_tensor(attention_mask).long().to(dev)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"shape {tuple(input_ids.shape)}")
    plan, numbers = decoding.make_plan(settings, vocab_size, settings.output_scores)
    xp = TorchOps(dev, _generator(settings, generator, dev))
    num = {k: xp.asarray(v) for k, v in numbers.items()}
    ids, mask = input_ids.repeat_interleave(plan.expand, 0), attention_mask.repeat_interleave(plan.expand, 0)
    context = repeat_rows(context, plan.expand)

    seqs, seq_scores, scores = decoding.run_eager(xp, plan, num, ids, mask, step, context, reorder_cache)
    if not settings.return_dict_in_generate:
        return seqs
    return GenerateOutput(sequences=seqs, scores=scores, sequences_scores=seq_scores)
