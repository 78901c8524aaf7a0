"""``train(...)``: fine-tune a BLIP model on an imagefolder data set in torch, tf or jax.

Example::

    from blip_apps.train import TrainConfig, train
    train(model_dir=None, data_dir="shapes", out="caption-out",
          cfg=TrainConfig(task="caption", backend="jax", steps=600, batch_size=32, lr=1e-3, seed=0))

``model_dir=None`` starts from a fresh seeded tiny model (``tiny_model``) over the synthetic
vocabulary. The loop itself is ``loop.py``; this module wires data, model, trainer, evaluation,
checkpoints and the tqdm progress bar together.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from . import data as data_mod
from .loop import (ARCHITECTURE, STATE_FILE, TASK_METRIC, TrainConfig, evaluate, latest_checkpoint, learning_rate,
                   make_trainer, save_checkpoint)


def tiny_config(vocab_file: str, image_size: int = 64):
    """A small BLIP: 4-layer ViT (64 wide, 16x16 patches: a 4x4 grid on 64x64 images), 2-layer text towers, over ``vocab_file``."""
    from blip_core.configs import BlipConfig
    with open(vocab_file, encoding="utf-8") as fh:
        vocab = [line.rstrip("\n") for line in fh]
    n = len(vocab)          # [DEC] and [ENC] come after the vocabulary, as in BLIP
    return BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=16, initializer_range=0.02),
        text_config=dict(vocab_size=n + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=n,
                         sep_token_id=vocab.index("[SEP]"), pad_token_id=vocab.index("[PAD]")),
        projection_dim=32, image_text_hidden_size=32)


def tiny_processor(vocab_file: str, image_size: int = 64):
    from blip_core.processing import BertTokenizer, BlipImageProcessor, BlipProcessor, add_blip_special_tokens
    vocab_dir = tempfile.mkdtemp()
    try:
        shutil.copy(vocab_file, os.path.join(vocab_dir, "vocab.txt"))
        tokenizer = add_blip_special_tokens(BertTokenizer.from_pretrained(vocab_dir))
    finally:
        shutil.rmtree(vocab_dir, ignore_errors=True)
    return BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer)


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """MAE's fixed 2-D sine-cosine position embeddings (1, 1 + grid*grid, dim); the class token gets zeros.

    Half the channels encode the row, half the column, each as sin / cos at ``dim/4`` frequencies
    ``1 / 10000^(k / (dim/4))``.
    """
    quarter = dim // 4
    freq = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.ravel(), cols.ravel()):
        angle = coord[:, None] * freq[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    table = np.concatenate(parts, axis=1)
    return np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32)


# Scale of the starting 2-D sine-cosine positions. At 1 (MAE's table as is) the position of a token
# is about as loud as its patch content (patch embeddings have std ~1 on these images) and the tiny
# captioner never learns WHERE the shape is: on 200 held-out images after 600 steps (16x16 patches,
# lr 2e-3, batch 64) the place was right in 28% of captions (chance: 25%), exact match 0.26; at 3x
# exact match 0.65, at 10x 0.93 with the place right in 100%.
POSITION_SCALE = 10.0


def tiny_model(task: str, directory: str, seed: int = 0, vocab_file: str = None) -> str:
    """Write a fresh seeded tiny model for ``task`` (config, safetensors, processor files) to ``directory``.

    The weights are the library's seeded draw, except the vision position embeddings, which start
    as 2-D sine-cosine tables (``sincos_positions``, as MAE) times ``POSITION_SCALE`` and are then
    learned like every other weight: with a random 0.02 start, or an unscaled table, a tiny ViT
    takes thousands of steps to learn where things are.
    """
    import backends.torch
    import torch
    from blip_apps.synthetic import VOCAB_FILE
    vocab_file = vocab_file or VOCAB_FILE
    os.makedirs(directory, exist_ok=True)
    config = tiny_config(vocab_file)
    model = getattr(backends.torch, ARCHITECTURE[task])(config, seed=seed)
    vc = config.vision_config
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.copy_(
            torch.from_numpy(POSITION_SCALE * sincos_positions(vc.image_size // vc.patch_size, vc.hidden_size)))
    model.save_pretrained(directory)
    tiny_processor(vocab_file).save_pretrained(directory)
    return directory


def _load_model(directory: str, task: str, backend: str, seed: int = 0, log=None):
    """The ``task``'s class loaded from ``directory``. A checkpoint of another BLIP class starts it as
    BLIP starts its fine-tuning from a pre-trained model: the weights both classes have (the vision
    tower; the text decoder of a captioner for VQA's answer decoder) are loaded, the others drawn
    from ``seed`` (the library's seeded draw)."""
    import importlib
    import warnings

    from blip_core import architecture_of
    arch, want = architecture_of(directory), ARCHITECTURE[task]
    cls = getattr(importlib.import_module(f"backends.{backend}"), want)
    if arch == want:
        return cls.from_pretrained(directory)
    if arch not in ARCHITECTURE.values():
        raise ValueError(f"{directory} holds a {arch}; --task {task} trains a {want} (or starts one from "
                         f"a {', '.join(sorted(set(ARCHITECTURE.values()) - {want}))})")
    with warnings.catch_warnings():      # the library warns about the drawn weights; this says it once
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(directory, strict=False, seed=seed)
    if log is not None:
        log(f"{want} started from the {arch} in {directory}: the weights both have loaded, the others "
            f"drawn from seed {seed}")
    return model


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def train(model_dir, data_dir: str, out: str, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          log=print, stop_after: int = None) -> dict:
    """Train, evaluate and save; returns ``{"history": [...], "final": metrics, "seconds": ...}``.

    ``resume=True`` continues from the newest ``out/checkpoint-*`` (weights, optimizer state, step);
    the data order is a function of (seed, step), so the run continues with the numbers an
    uninterrupted run would have. ``stop_after`` ends the run early after that many steps (tests).
    """
    from blip_core.processing import BlipProcessor
    from tqdm.auto import tqdm

    start, history = 0, []
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint-*/ with {STATE_FILE} under {out}")
    if ckpt is not None:
        with open(os.path.join(ckpt, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
        start, history = state["step"], state["history"]
        saved = dict(state["config"], betas=tuple(state["config"]["betas"]))
        changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
                   if k in saved and saved[k] != v and k not in ("eval_every", "save_every", "backend")}
        if changed:
            raise ValueError(f"--resume with different settings than the checkpoint: {changed}")
        model_dir = ckpt
    elif model_dir is None:
        model_dir = tiny_model(cfg.task, os.path.join(out, "init"), seed=cfg.seed)
    processor = BlipProcessor.from_pretrained(model_dir)
    model = _load_model(model_dir, cfg.task, cfg.backend, seed=cfg.seed, log=log)
    train_dir, test_dir = data_mod.data_splits(data_dir)
    train_split = data_mod.read_split(train_dir, processor.image_processor)
    test_split = data_mod.read_split(test_dir, processor.image_processor)
    tok, bos = processor.tokenizer, model.config.text_config.bos_token_id
    lengths = data_mod.lengths_for(cfg.task, tok, train_split, test_split)
    train_data = data_mod.TaskData(train_split, cfg.task, tok, bos, lengths)
    test_data = data_mod.TaskData(test_split, cfg.task, tok, bos, lengths)
    trainer = make_trainer(model, cfg)
    if ckpt is not None:
        trainer.load_state(ckpt)
        log(f"resuming from {ckpt} at step {start}")
    rows = cfg.batch_size * cfg.grad_accum
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for step in range(start, end):
        batches = data_mod.step_batches(train_data, cfg.seed, step, cfg.batch_size, cfg.grad_accum)
        loss = trainer.step(batches, learning_rate(step, cfg))
        seen += rows
        done = step + 1
        history.append({"step": done, "loss": loss})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            m = evaluate(trainer.model, processor, test_data, cfg, trainer)
            history[-1]["eval"] = {k: v for k, v in m.items() if isinstance(v, float)}
            bar.write(f"step {done}: held-out {_fmt(m)}")
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(os.path.join(out, f"checkpoint-{done}"), trainer, processor, done, cfg, history)
    bar.close()
    seconds = time.perf_counter() - t0
    if end < cfg.steps:     # stopped early on request: leave a checkpoint to resume from
        save_checkpoint(os.path.join(out, f"checkpoint-{end}"), trainer, processor, end, cfg, history)
        return {"history": history, "final": None, "seconds": seconds}
    final = evaluate(trainer.model, processor, test_data, cfg, trainer)
    log(f"held-out after {cfg.steps} steps: {_fmt(final)}  ({cfg.task} metric {TASK_METRIC[cfg.task]})")
    if final.get("predictions"):
        log(f"examples: {final['predictions'][:4]}")
    os.makedirs(out, exist_ok=True)
    trainer.model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1), "steps": cfg.steps,
               "final": {k: v for k, v in final.items() if isinstance(v, float)},
               "history": history}
    with open(os.path.join(out, "training_log.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return {"history": history, "final": final, "seconds": seconds}
