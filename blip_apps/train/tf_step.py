"""One optimizer step in TensorFlow: ``keras.optimizers.AdamW`` on the model's ``tf.Variable``s,
``tf.clip_by_global_norm``, gradient accumulation; the loss and its gradient run in one ``tf.function``.

Keras' Adam adds epsilon to ``sqrt(v)`` before the bias correction (Kingma and Ba's "epsilon hat"),
torch and optax after: ``m_hat / (sqrt(v_hat) + eps)``. Keras' rule equals that one when its
epsilon is ``eps * sqrt(1 - beta_2^t)`` at step t, so each step sets it so before applying (without
this the weights of the backends drift apart by ~1e-5 in three steps on the tiny models).
The retrieval loss is the one documented in ``torch_step``.

Mixed precision (``TrainConfig(mixed_precision="bf16")``), with explicit casts as Keras' ``mixed_bfloat16``
policy does them (our models are ``tf.Module``s, not Keras layers, so the policy itself does not
reach them): a bfloat16 twin of the model computes the loss; before each micro-batch its variables
are assigned the bfloat16 casts of the float32 master variables, and its gradients are cast to
float32 before accumulation, clipping and ``keras.optimizers.AdamW`` on the masters.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

OPTIMIZER_FILE = "optimizer_tf.npz"
_INPUTS = {"caption": ("pixel_values", "input_ids", "attention_mask", "labels"),
           "vqa": ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
                   "labels")}


def retrieval_loss(model, batch: dict, temperature: float):
    pv, ids, mask, group = batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["text_group"]
    sim = tf.cast(model(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=False).itm_score,
                  tf.float32) / temperature
    same = tf.cast(tf.equal(group[:, None], group[None, :]), sim.dtype)
    targets = same / tf.reduce_sum(same, 1, keepdims=True)
    itc = (-tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(sim, 1) * targets, 1))
           - tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(tf.transpose(sim), 1) * targets, 1))) / 2
    masked = tf.where(same > 0, tf.constant(-np.inf, sim.dtype), tf.stop_gradient(sim))
    neg_text, neg_image = tf.argmax(masked, 1), tf.argmax(masked, 0)
    has_neg = tf.cast(tf.reduce_any(same < 1, axis=1), sim.dtype)
    b = tf.shape(ids)[0]
    logits = model(input_ids=tf.concat([ids, tf.gather(ids, neg_text), ids], 0),
                   pixel_values=tf.concat([pv, pv, tf.gather(pv, neg_image)], 0),
                   attention_mask=tf.concat([mask, tf.gather(mask, neg_text), mask], 0), use_itm_head=True).itm_score
    labels = tf.concat([tf.ones([b], tf.int32), tf.zeros([2 * b], tf.int32)], 0)
    weight = tf.concat([tf.ones([b], sim.dtype), has_neg, has_neg], 0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32))
    return itc + tf.reduce_sum(ce * weight) / tf.reduce_sum(weight)


def task_loss(model, task: str, batch: dict, temperature: float):
    if task == "retrieval":
        return retrieval_loss(model, batch, temperature)
    return tf.cast(model(**{k: batch[k] for k in _INPUTS[task]}).loss, tf.float32)


class Trainer:
    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.paths = [path for path in model.params if not (cfg.freeze_vision and path.startswith("vision_model/"))]
        self.variables = [model.params[path] for path in self.paths]
        self.bf16 = cfg.mixed_precision == "bf16"
        # the model the loss runs on: the float32 model itself, or its bfloat16 twin
        compute = (type(model)(model.config, dtype="bfloat16", _values={p: v.numpy() for p, v in model.params.items()})
                   if self.bf16 else model)
        self.compute = compute
        watched = [compute.params[path] for path in self.paths]
        self.optimizer = keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                                                beta_1=cfg.betas[0], beta_2=cfg.betas[1], epsilon=cfg.eps)
        self.optimizer.build(self.variables)

        @tf.function(reduce_retracing=True)
        def grad_fn(batch):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(watched)
                loss = task_loss(compute, cfg.task, batch, cfg.itc_temperature)
            return loss, tape.gradient(loss, watched)

        self._grad = grad_fn
        self._loss = tf.function(lambda batch: task_loss(compute, cfg.task, batch, cfg.itc_temperature),
                                 reduce_retracing=True)

    def _sync(self):
        """bfloat16: the twin's variables take the bfloat16 casts of the float32 masters."""
        if self.bf16:
            for path, v in self.model.params.items():
                self.compute.params[path].assign(tf.cast(v, tf.bfloat16))

    @staticmethod
    def _tensors(batch):
        return {k: tf.constant(v.astype(np.int32) if v.dtype.kind in "iu" else v) for k, v in batch.items()}

    def step(self, batches, lr: float) -> float:
        grads, total = None, 0.0
        self._sync()
        for batch in batches:
            loss, g = self._grad(self._tensors(batch))
            g = [tf.zeros_like(v) if x is None else tf.cast(tf.convert_to_tensor(x), v.dtype)
                 for x, v in zip(g, self.variables)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            total += float(loss)
        if len(batches) > 1:
            grads = [x / len(batches) for x in grads]
        if self.cfg.clip:
            grads, _ = tf.clip_by_global_norm(grads, self.cfg.clip)
        self.optimizer.learning_rate = lr
        t = int(self.optimizer.iterations.numpy()) + 1
        self.optimizer.epsilon = self.cfg.eps * (1.0 - self.cfg.betas[1] ** t) ** 0.5
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return total / len(batches)

    def loss(self, batch) -> float:
        self._sync()
        return float(self._loss(self._tensors(batch)))

    def save_state(self, directory: str) -> None:
        np.savez(os.path.join(directory, OPTIMIZER_FILE),
                 **{f"var_{i}": v.numpy() for i, v in enumerate(self.optimizer.variables)})

    def load_state(self, directory: str) -> None:
        with np.load(os.path.join(directory, OPTIMIZER_FILE)) as f:
            if len(f.files) != len(self.optimizer.variables):
                raise ValueError(f"{directory}: optimizer state has {len(f.files)} arrays, "
                                 f"expected {len(self.optimizer.variables)}")
            for i, v in enumerate(self.optimizer.variables):
                v.assign(f[f"var_{i}"])
