"""The framework-free training loop: order, schedule, evaluation, checkpoints, resume, progress bar.

A backend supplies a *trainer* (``torch_step.Trainer``, ``tf_step.Trainer``, ``jax_step.Trainer``)
with ``step(micro_batches, lr) -> loss``, ``loss(batch) -> float``, ``save_state(dir)`` /
``load_state(dir)`` (optimizer moments and counters) and ``model`` (the library's model object, kept
current). Everything else lives here once: which samples form step ``s`` (``data.step_batches``),
the learning rate of step ``s`` (``learning_rate``), held-out evaluation through the models' public
``generate`` / forward, checkpoints ``OUT/checkpoint-<step>/`` in Hugging Face's format (+
processor files, ``trainer_state.json`` and the optimizer state) and the final model in ``OUT``.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from blip_core import BACKENDS, to_numpy
from blip_core.generation import integer_option, real_option

from . import data as data_mod
from . import metrics

ARCHITECTURE = {"caption": "BlipForConditionalGeneration", "vqa": "BlipForQuestionAnswering",
                "retrieval": "BlipForImageTextRetrieval"}
STATE_FILE = "trainer_state.json"
MIXED_PRECISION = ("no", "bf16")


@dataclass
class TrainConfig:
    task: str = "caption"          # caption | vqa | retrieval
    backend: str = "torch"         # torch | tf | jax
    steps: int = 1000              # optimizer steps
    batch_size: int = 32           # rows per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step (gradients averaged)
    lr: float = 1e-3               # peak learning rate
    warmup: int = 100              # linear warm-up steps, then cosine decay to 0 at ``steps``
    weight_decay: float = 0.01     # AdamW decoupled weight decay (all parameters, as BLIP)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    clip: float = 1.0              # clip by global norm (0: off)
    freeze_vision: bool = False    # train everything but the vision tower
    eval_every: int = 0            # evaluate every N steps (0: only at the end)
    save_every: int = 0            # checkpoint every N steps (0: only the final model)
    eval_size: int = 0             # held-out rows evaluated (0: all)
    seed: int = 0                  # data order (and the fresh model's init when none is given)
    itc_temperature: float = 0.07  # retrieval: ITC softmax temperature (BLIP's initial value)
    threads: int = 0               # torch CPU threads (0: its default; 1 is fastest on a busy machine); tf and jax keep theirs
    mixed_precision: str = "no"    # "no" (float32) | "bf16": bfloat16 compute, float32 master weights and optimizer

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        if self.task not in data_mod.TASKS:
            raise ValueError(f"task={self.task!r}; choose one of {', '.join(data_mod.TASKS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        # each count and rate: outside its range a value was taken silently (a negative warm-up), trained nothing (a
        # batch of 0 rows) or failed deep in the loop or a framework (0 micro-batches a step, a negative learning rate)
        # (types and finiteness by the spec layer's option rules, as generate's settings)
        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0), ("eval_every", 0),
                          ("save_every", 0), ("eval_size", 0), ("threads", 0)):
            value = integer_option(getattr(self, name), name)
            if value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            setattr(self, name, value)
        for name, positive in (("lr", True), ("eps", True), ("itc_temperature", True), ("weight_decay", False),
                               ("clip", False)):
            value = real_option(getattr(self, name), name)
            if not (value > 0 if positive else value >= 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step ``step``: linear warm-up to ``lr``, then cosine to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_trainer(model, cfg: TrainConfig):
    module = importlib.import_module(f"blip_apps.train.{cfg.backend}_step")
    return module.Trainer(model, cfg)


# -- evaluation (public API of every backend) ---------------------------------------------------------
def _decode(processor, ids):
    return [processor.decode(row.tolist(), skip_special_tokens=True).strip() for row in to_numpy(ids)]


def evaluate(model, processor, data: data_mod.TaskData, cfg: TrainConfig, trainer=None,
             batch_size: int = 64) -> dict:
    """Held-out metrics (and the mean loss when a trainer is given) on ``data``."""
    n = data.n if not cfg.eval_size else min(cfg.eval_size, data.n)
    out = {}
    if trainer is not None:
        losses = [trainer.loss(data.batch(np.arange(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        out["loss"] = float(np.average(losses, weights=sizes))
    a = data.arrays
    if cfg.task == "caption":
        preds = []
        for i in range(0, n, batch_size):
            ids = model.generate(pixel_values=a["pixel_values"][i:min(i + batch_size, n)],
                                 max_new_tokens=a["input_ids"].shape[1])
            preds += _decode(processor, ids)
        refs = data.texts[:n]
        out.update(exact_match=metrics.exact_match(preds, refs), bleu4=metrics.bleu4(preds, refs))
    elif cfg.task == "vqa":
        preds = []
        for i in range(0, n, batch_size):
            s = slice(i, min(i + batch_size, n))
            ids = model.generate(input_ids=a["input_ids"][s], attention_mask=a["attention_mask"][s],
                                 pixel_values=a["pixel_values"][s], max_new_tokens=a["decoder_input_ids"].shape[1])
            preds += _decode(processor, ids)
        out["vqa_accuracy"] = metrics.vqa_accuracy(preds, data.answers[:n])
    else:
        out.update(retrieval_scores(model, data, n))
    out["predictions"] = preds if cfg.task != "retrieval" else None
    return out


def retrieval_scores(model, data: data_mod.TaskData, n: int, k: int = 0, batch_size: int = 256) -> dict:
    """Image-to-text recall@1 over the distinct captions of the first ``n`` rows.

    As BLIP's retrieval inference: ITC cosine ranks every caption for each image, the ITM head
    re-ranks the top ``k`` (0: every caption, affordable on small held-out sets) by BLIP's score
    ``itm_logit[match] + itc_cosine`` (``recall@1``, the task metric). ``itc_recall@1`` and
    ``itm_recall@1`` rank by each part alone; ``itc_text_to_image_recall@1`` is the other direction
    (each distinct caption's best image by ITC cosine, right when the image carries that caption).
    ``top1`` / ``itc_top1`` are the chosen caption indices (into the distinct captions) per image.
    """
    texts = list(dict.fromkeys(data.texts[:n]))
    col = {t: j for j, t in enumerate(texts)}
    pos = np.array([col[t] for t in data.texts[:n]])
    tok = data.tokenizer(texts, padding="max_length", max_length=data.arrays["input_ids"].shape[1],
                         truncation=True, return_tensors="np")
    ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
    pv = data.arrays["pixel_values"][:n]
    itc = np.asarray(to_numpy(model(input_ids=ids, pixel_values=pv, attention_mask=mask,
                                    use_itm_head=False).itm_score), np.float64)
    k = min(k, len(texts)) if k else len(texts)
    top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    rows, cols = np.repeat(np.arange(n), k), top.ravel()
    logits = np.concatenate([np.asarray(to_numpy(model(
        input_ids=ids[cols[i:i + batch_size]], pixel_values=pv[rows[i:i + batch_size]],
        attention_mask=mask[cols[i:i + batch_size]], use_itm_head=True).itm_score), np.float64)
        for i in range(0, len(rows), batch_size)])
    itm = np.full_like(itc, -np.inf)
    itm[rows, cols] = logits[:, 1] - logits[:, 0]       # monotone in p(match)
    blip = np.full_like(itc, -np.inf)
    blip[rows, cols] = logits[:, 1] + itc[rows, cols]
    positive = np.arange(len(texts))[None, :] == pos[:, None]          # (images, captions)
    return {"recall@1": metrics.recall_at_1(blip, pos), "itc_recall@1": metrics.recall_at_1(itc, pos),
            "itm_recall@1": metrics.recall_at_1(itm, pos),
            "itc_text_to_image_recall@1": metrics.recall_at_1(itc.T, positive.T),
            "top1": blip.argmax(1).tolist(), "itc_top1": itc.argmax(1).tolist()}


TASK_METRIC = {"caption": "exact_match", "vqa": "vqa_accuracy", "retrieval": "recall@1"}


# -- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(directory, trainer, processor, step: int, cfg: TrainConfig, history: list) -> str:
    os.makedirs(directory, exist_ok=True)
    trainer.model.save_pretrained(directory)
    processor.save_pretrained(directory)
    trainer.save_state(directory)
    # written last and renamed into place: a run killed while saving leaves no trainer_state.json,
    # so ``latest_checkpoint`` never picks a half-written checkpoint
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"step": step, "samples_seen": step * cfg.batch_size * cfg.grad_accum,
                   "config": dataclasses.asdict(cfg), "history": history}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, STATE_FILE))
    return directory


def latest_checkpoint(out: str):
    found = sorted(glob.glob(os.path.join(out, "checkpoint-*", STATE_FILE)),
                   key=lambda p: int(os.path.basename(os.path.dirname(p)).split("-")[1]))
    return os.path.dirname(found[-1]) if found else None
