"""One optimizer step in PyTorch: ``torch.optim.AdamW``, gradient accumulation, global-norm clipping.

The model stays in eval mode (no dropout: BLIP's configs have none, and tf / jax implement none), so
the three backends compute the same function. Frozen parameters (``freeze_vision``) get
``requires_grad=False`` and are left out of the optimizer.

Retrieval loss (the same formula in ``tf_step`` and ``jax_step``), for a batch of B image-caption
pairs with caption groups g (equal captions are positives of each other):

- ITC: ``s_ij = cos(image_i, text_j) / T`` from the model's own ITC path (``use_itm_head=False``,
  the ``vision_proj`` / ``text_proj`` projections), T = ``itc_temperature``; soft targets
  ``t_ij = [g_i = g_j] / #{k: g_i = g_k}``; ``L_itc = (CE_rows(s, t) + CE_rows(s^T, t)) / 2``.
- ITM (BLIP's hard negatives, picked deterministically): for image i the negative caption is
  ``argmax_j s_ij`` over captions of another group, for caption j the negative image ``argmax_i s_ij``
  likewise (BLIP draws them from ``softmax(s)``; the argmax keeps the backends on the same pairs).
  The ITM head scores the B positives (label 1) and 2B negatives (label 0); ``L_itm`` is the mean
  cross entropy over the positives and the negatives that exist (a row whose batch holds only its
  own group has no negative).
- ``loss = L_itc + L_itm``.

Mixed precision (``TrainConfig(mixed_precision="bf16")``): the forward and the loss run under
``torch.autocast("cpu", torch.bfloat16)`` (matmuls and convolutions in bfloat16, reductions and
softmax as autocast decides), the parameters, gradients and AdamW moments stay float32.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

OPTIMIZER_FILE = "optimizer.pt"
_INPUTS = {"caption": ("pixel_values", "input_ids", "attention_mask", "labels"),
           "vqa": ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
                   "labels")}


def retrieval_loss(model, batch: dict, temperature: float):
    pv, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    group = batch["text_group"]
    sim = model(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=False).itm_score / temperature
    same = (group[:, None] == group[None, :]).to(sim.dtype)
    targets = same / same.sum(1, keepdim=True)
    itc = (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean()) / 2
    with torch.no_grad():
        masked = sim.masked_fill(same.bool(), float("-inf"))
        neg_text = masked.argmax(1)                  # per image
        neg_image = masked.argmax(0)                 # per caption
        has_neg = (same < 1).any(1).to(sim.dtype)
    b = ids.shape[0]
    pair_ids = torch.cat([ids, ids[neg_text], ids])
    pair_mask = torch.cat([mask, mask[neg_text], mask])
    pair_pv = torch.cat([pv, pv, pv[neg_image]])
    logits = model(input_ids=pair_ids, pixel_values=pair_pv, attention_mask=pair_mask, use_itm_head=True).itm_score
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    weight = torch.cat([torch.ones(b, dtype=sim.dtype), has_neg, has_neg])
    itm = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum()
    return itc + itm


def task_loss(model, task: str, batch: dict, temperature: float, mixed_precision: str = "no"):
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        if task == "retrieval":
            loss = retrieval_loss(model, batch, temperature)
        else:
            loss = model(**{k: batch[k] for k in _INPUTS[task]}).loss
    return loss.float()


class Trainer:
    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model.eval()
        self.params = []
        for name, p in model.named_parameters():
            frozen = cfg.freeze_vision and name.startswith("vision_model.")
            p.requires_grad_(not frozen)
            if not frozen:
                self.params.append(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)

    def step(self, batches, lr: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = task_loss(self.model, self.cfg.task, batch, self.cfg.itc_temperature, self.cfg.mixed_precision)
            (loss / len(batches)).backward()
            total += float(loss.detach())
        if self.cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return total / len(batches)

    @torch.no_grad()
    def loss(self, batch) -> float:
        return float(task_loss(self.model, self.cfg.task, batch, self.cfg.itc_temperature,
                                self.cfg.mixed_precision))

    def save_state(self, directory: str) -> None:
        torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))

    def load_state(self, directory: str) -> None:
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
