"""One optimizer step in JAX: ``optax.adamw`` behind ``optax.clip_by_global_norm``, gradient accumulation.

The loss goes through the model's public forward with ``params=`` (so the maths is the backend's
own), differentiated by ``jax.value_and_grad`` and compiled once per batch shape. The learning rate
of each step is set through ``optax.inject_hyperparams``. With ``freeze_vision`` the optimizer only
sees the parameters outside ``vision_model`` (the frozen ones are passed as a constant). The
retrieval loss is the one documented in ``torch_step``.

Mixed precision (``TrainConfig(mixed_precision="bf16")``, the recipe of DeepMind's ``jmp``): the
float32 master parameters are cast to bfloat16 inside the differentiated function and the forward
runs on a bfloat16 copy of the model (same config, no weights of its own), so activations are
bfloat16; the loss is taken in float32 and the gradients come back float32 through the cast, where
clipping and ``optax.adamw`` see only float32.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZER_FILE = "optimizer_jax.npz"
_INPUTS = {"caption": ("pixel_values", "input_ids", "attention_mask", "labels"),
           "vqa": ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
                   "labels")}


def retrieval_loss(model, params, batch: dict, temperature: float):
    pv, ids, mask, group = batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["text_group"]
    sim = model(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=False,
                params=params).itm_score.astype(jnp.float32) / temperature
    same = (group[:, None] == group[None, :]).astype(sim.dtype)
    targets = same / same.sum(1, keepdims=True)
    itc = (-(jax.nn.log_softmax(sim, 1) * targets).sum(1).mean()
           - (jax.nn.log_softmax(sim.T, 1) * targets).sum(1).mean()) / 2
    masked = jnp.where(same > 0, -jnp.inf, jax.lax.stop_gradient(sim))
    neg_text, neg_image = jnp.argmax(masked, 1), jnp.argmax(masked, 0)
    has_neg = jnp.any(same < 1, axis=1).astype(sim.dtype)
    b = ids.shape[0]
    logits = model(input_ids=jnp.concatenate([ids, ids[neg_text], ids]),
                   pixel_values=jnp.concatenate([pv, pv, pv[neg_image]]),
                   attention_mask=jnp.concatenate([mask, mask[neg_text], mask]), use_itm_head=True,
                   params=params).itm_score
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    weight = jnp.concatenate([jnp.ones(b, sim.dtype), has_neg, has_neg])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return itc + (ce * weight).sum() / weight.sum()


def task_loss(model, task: str, params, batch: dict, temperature: float):
    if task == "retrieval":
        return retrieval_loss(model, params, batch, temperature)
    return model(**{k: batch[k] for k in _INPUTS[task]}, params=params).loss.astype(jnp.float32)


def half_precision_model(model):
    """A weightless bfloat16 twin of ``model`` (same class and config): its forward takes ``params=``."""
    twin = object.__new__(type(model))
    twin._setup(model.config, None, jnp.bfloat16)
    return twin


def to_bfloat16(params):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  params)


class Trainer:
    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.frozen_keys = {"vision_model"} if cfg.freeze_vision else set()
        trainable, self.frozen = self._split(model.params)
        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, b1=cfg.betas[0], b2=cfg.betas[1],
                                                      eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.tx = optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip else optax.chain(adamw)
        self.trainable = trainable
        self.opt_state = self.tx.init(trainable)

        bf16 = cfg.mixed_precision == "bf16"
        compute = half_precision_model(model) if bf16 else model

        def loss_fn(trainable, frozen, batch):
            params = {**frozen, **trainable}
            return task_loss(compute, cfg.task, to_bfloat16(params) if bf16 else params, batch, cfg.itc_temperature)

        def update(trainable, opt_state, grads, lr):
            opt_state[-1].hyperparams["learning_rate"] = lr
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        self._grad = jax.jit(jax.value_and_grad(loss_fn))
        self._loss = jax.jit(loss_fn)
        self._update = jax.jit(update)

    def _split(self, params):
        return ({k: v for k, v in params.items() if k not in self.frozen_keys},
                {k: v for k, v in params.items() if k in self.frozen_keys})

    @staticmethod
    def _device(batch):
        return {k: jnp.asarray(v, jnp.int32 if np.asarray(v).dtype.kind in "iu" else None) for k, v in batch.items()}

    def step(self, batches, lr: float) -> float:
        grads, total = None, 0.0
        for batch in batches:
            loss, g = self._grad(self.trainable, self.frozen, self._device(batch))
            grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
            total += float(loss)
        if len(batches) > 1:
            grads = jax.tree_util.tree_map(lambda x: x / len(batches), grads)
        self.trainable, self.opt_state = self._update(self.trainable, self.opt_state, grads,
                                                      jnp.asarray(lr, jnp.float32))
        self.model.params = {**self.frozen, **self.trainable}
        return total / len(batches)

    def loss(self, batch) -> float:
        return float(self._loss(self.trainable, self.frozen, self._device(batch)))

    def save_state(self, directory: str) -> None:
        leaves = jax.tree_util.tree_leaves(self.opt_state)
        np.savez(os.path.join(directory, OPTIMIZER_FILE), **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})

    def load_state(self, directory: str) -> None:
        with np.load(os.path.join(directory, OPTIMIZER_FILE)) as f:
            leaves = [jnp.asarray(f[f"leaf_{i}"]) for i in range(len(f.files))]
        treedef = jax.tree_util.tree_structure(self.opt_state)
        if treedef.num_leaves != len(leaves):
            raise ValueError(f"{directory}: optimizer state has {len(leaves)} arrays, expected {treedef.num_leaves}")
        self.opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
