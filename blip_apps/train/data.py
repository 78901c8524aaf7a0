"""Data for the training loop: an ``imagefolder`` split in memory, task batches, the seeded order.

A split is a folder of images with a ``metadata.jsonl`` (Hugging Face's ``imagefolder`` convention):
``file_name`` plus ``text`` (captions, retrieval) or ``question`` + ``answer`` (VQA). Images go
through the model's ``BlipImageProcessor`` once; texts are tokenised once to a fixed length, so
every batch has the same shapes (one compiled program in tf and jax).

Order: sample ``g`` of the run (counting from 0 over steps, accumulation slices and batch rows) is
``permutation(seed, epoch)[g % N]`` with ``epoch = g // N`` and the permutation
``numpy.random.default_rng([seed, epoch]).permutation(N)``. Step ``s`` (with ``K`` accumulation
slices of ``B`` rows) reads ``g`` in ``[s*K*B, (s+1)*K*B)``, so the order is a pure function of the
seed and the step: every backend reads the same batches and a resumed run continues exactly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

TASKS = ("caption", "vqa", "retrieval")


@dataclass
class Split:
    """One split in memory: ``pixel_values`` (N, 3, H, W) float32 and the rows of ``metadata.jsonl``."""
    directory: str
    rows: list
    pixel_values: np.ndarray


def read_split(directory: str, image_processor) -> Split:
    meta = os.path.join(directory, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{directory}: no metadata.jsonl (expected Hugging Face's imagefolder layout)")
    from PIL import Image
    with open(meta, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        raise ValueError(f"{meta} holds no rows")
    images = []
    for row in rows:
        with Image.open(os.path.join(directory, row["file_name"])) as im:
            images.append(im.convert("RGB"))
    pixels = image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    return Split(directory, rows, pixels)


def data_splits(data_dir: str) -> tuple[str, str]:
    """``(train, test)`` folders of a data set directory (``train/`` and ``test/`` or ``validation/``)."""
    train = os.path.join(data_dir, "train")
    if not os.path.isdir(train):
        raise FileNotFoundError(f"{data_dir}: expected a train/ folder (imagefolder layout)")
    for name in ("test", "validation"):
        if os.path.isdir(os.path.join(data_dir, name)):
            return train, os.path.join(data_dir, name)
    raise FileNotFoundError(f"{data_dir}: expected a test/ or validation/ folder for the held-out split")


def _tokens(tokenizer, texts, length):
    enc = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def text_length(tokenizer, texts) -> int:
    return max(len(tokenizer(t)["input_ids"]) for t in texts)


class TaskData:
    """Arrays of one split for one task; ``batch(indices)`` gives the model inputs as numpy.

    - caption: ``input_ids`` with bos in place of [CLS] (as BLIP trains and generates), ``labels`` the
      same ids with padding as -100.
    - vqa: question ``input_ids`` / ``attention_mask``; answer ``decoder_input_ids`` = bos, answer
      tokens, [SEP]; ``labels`` the same with padding as -100.
    - retrieval: caption ``input_ids`` / ``attention_mask`` as the processor gives them ([CLS] first),
      and ``text_group`` (rows with the same caption share a group: they are positives of each other).
    """

    def __init__(self, split: Split, task: str, tokenizer, bos_token_id: int, lengths: dict):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.split, self.task, self.tokenizer = split, task, tokenizer
        self.n = len(split.rows)
        rows = split.rows
        key = "question" if task == "vqa" else "text"
        missing = [r.get("file_name") for r in rows if key not in r or (task == "vqa" and "answer" not in r)]
        if missing:
            raise ValueError(f"{split.directory}: rows without the {task} fields, e.g. {missing[0]}")
        self.texts = [r[key] for r in rows]
        ids, mask = _tokens(tokenizer, self.texts, lengths["text"])
        self.arrays = {"pixel_values": split.pixel_values, "input_ids": ids, "attention_mask": mask}
        if task == "caption":
            ids = ids.copy()
            ids[:, 0] = bos_token_id
            self.arrays.update(input_ids=ids, labels=np.where(mask == 1, ids, -100))
        elif task == "vqa":
            self.answers = [r["answer"] for r in rows]
            dec, dec_mask = _tokens(tokenizer, self.answers, lengths["answer"])
            dec[:, 0] = bos_token_id
            self.arrays.update(decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                               labels=np.where(dec_mask == 1, dec, -100))
        else:
            groups = {t: i for i, t in enumerate(dict.fromkeys(self.texts))}
            self.arrays["text_group"] = np.array([groups[t] for t in self.texts], np.int64)

    def batch(self, indices) -> dict:
        idx = np.asarray(indices)
        out = {k: v[idx] for k, v in self.arrays.items()}
        if self.task == "retrieval":   # groups renumbered within the batch (only equality matters)
            _, out["text_group"] = np.unique(out["text_group"], return_inverse=True)
        return out


def lengths_for(task: str, tokenizer, *splits: Split) -> dict:
    rows = [r for s in splits for r in s.rows]
    key = "question" if task == "vqa" else "text"
    out = {"text": text_length(tokenizer, [r[key] for r in rows])}
    if task == "vqa":
        out["answer"] = text_length(tokenizer, [r["answer"] for r in rows])
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Samples ``start .. start+count-1`` of the run's stream (see the module docstring)."""
    out, cache = [], {}
    for g in range(start, start + count):
        epoch = g // n
        if epoch not in cache:
            cache[epoch] = epoch_permutation(n, seed, epoch)
        out.append(cache[epoch][g % n])
    return np.array(out, np.int64)


def step_batches(data: TaskData, seed: int, step: int, batch_size: int, accum: int) -> list[dict]:
    """The ``accum`` micro-batches of optimizer step ``step`` (0-based)."""
    idx = sample_indices(data.n, seed, step * accum * batch_size, accum * batch_size)
    return [data.batch(idx[k * batch_size:(k + 1) * batch_size]) for k in range(accum)]
