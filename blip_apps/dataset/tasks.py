"""What each task computes for a batch of records, the same in both engines and every backend.

``TaskSpec`` names the task and its settings; ``Worker(spec)`` loads one model and its processor
and turns records (``sources.read_unit``) into output rows:

- ``prepare(record)`` (run in decode threads / Ray's map step): bytes -> pixel array, or an error;
- ``run(prepared)`` (the model): one row per record, ``{"id", "error", "model", "backend", ...}``.

Every batch goes to the model with one fixed shape: images padded to ``batch_size`` rows (the last
image repeated, its results dropped) and texts padded to ``text_length`` tokens. One shape means
one compiled program in TF and JAX, and an item's numbers do not depend on which other items
share its batch, so the local and the Ray engine write the same bytes whatever their batching.

Result columns per task:

- ``caption``: ``caption``;
- ``vqa``: ``question``, ``answer`` (one ``question`` for all, or ``--text-column`` per item);
- ``embed``: ``image_embedding`` (float32, the ITC space: ``vision_proj`` of the image [CLS] state,
  L2-normalised), and with a text per item (``--text-column``) ``text`` and ``text_embedding``;
- ``match``: ``texts``, ``itm_probability`` (softmax of the ITM head), ``itc_score`` (ITC cosine),
  one entry per text (the ``texts`` given, or the item's own text).

A batch that fails in the model is retried item by item, so one bad item costs only itself.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .sources import decode_image

TASKS = ("caption", "vqa", "embed", "match")
TASK_MODEL = {"caption": "caption", "vqa": "vqa", "embed": "retrieval", "match": "retrieval"}


@dataclass(frozen=True)
class TaskSpec:
    task: str                      # one of TASKS
    model: str                     # model directory
    backend: str = "torch"
    dtype: str | None = None
    batch_size: int = 8
    num_beams: int = 1             # caption / vqa
    max_new_tokens: int = 20       # caption / vqa
    prompt: str | None = None      # caption: the text captions start with
    question: str | None = None    # vqa: the question for every item (else the item's text)
    texts: tuple = field(default=())   # match: the texts scored against every image (else the item's text)
    text_length: int = 0           # tokens every text is padded / truncated to; 0: the model's position table

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        object.__setattr__(self, "texts", tuple(self.texts))

    def settings(self) -> dict:
        """What decides the output (a resumed run must have the same)."""
        d = asdict(self)
        d["texts"] = list(self.texts)
        return d


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _normalize(x, eps):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(eps))


def load_processor(model_dir: str):
    """The model directory's processor (BLIP or BLIP-2 by its config), without loading weights."""
    from blip_core.configs import Blip2Config, load_config
    from blip_core.processing import Blip2Processor, BlipProcessor
    cls = Blip2Processor if isinstance(load_config(model_dir), Blip2Config) else BlipProcessor
    return cls.from_pretrained(model_dir)


class Preparer:
    """Decoding and preprocessing only (no model): thread-safe, cheap to build in any process."""

    def __init__(self, spec: TaskSpec, processor=None):
        self.spec = spec
        self.processor = processor or load_processor(spec.model)
        size = self.processor.image_processor.size
        self.pixel_shape = (3, size["height"], size["width"])

    def prepare(self, record):
        """Decode and preprocess one record: adds ``pixels`` (3, H, W) float32, or sets ``error``."""
        if record.get("error"):
            return dict(record, data=None)
        try:
            image = decode_image(record["data"])
            pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
        except (ValueError, TypeError, OSError, MemoryError) as exc:
            return dict(record, data=None, error=str(exc) if isinstance(exc, ValueError) else
                        f"{exc.__class__.__name__}: {exc}")
        return dict(record, data=None, pixels=np.asarray(pixels, np.float32))


class Worker:
    """One model and its processor; ``prepare`` is thread-safe, ``run`` is called from one thread."""

    def __init__(self, spec: TaskSpec):
        from .. import cli   # the command line's loading rules and one-line errors
        from ..memory import keep_freed_memory
        keep_freed_memory()   # many model calls in this process: each reuses the pages the last one freed
        self.spec = spec
        self.model = cli._load(spec.model, spec.backend, spec.dtype)
        cli._check_class(self.model, "match" if spec.task == "embed" else spec.task, spec.model)
        self.processor = cli._processor(spec.model, self.model)
        self.preparer = Preparer(spec, self.processor)
        self.prepare = self.preparer.prepare
        cfg = getattr(self.model.config, "text_config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or 512
        self.text_length = min(spec.text_length or limit, limit)
        self.model_name = os.path.abspath(spec.model)
        if spec.task == "embed":
            self._projections()

    # -- helpers -------------------------------------------------------------------------------
    def _projections(self):
        from blip_core.checkpoint.files import load_state_dict
        from blip_core.numerics import NORM_EPS
        if type(self.model).__name__.removeprefix("TF") != "BlipForImageTextRetrieval":
            raise ValueError(f"{self.spec.model}: 'embed' needs a BlipForImageTextRetrieval checkpoint")
        state = load_state_dict(self.spec.model)
        self.proj = {k: (np.asarray(state[f"{k}_proj.weight"], np.float32),
                         np.asarray(state[f"{k}_proj.bias"], np.float32)) for k in ("vision", "text")}
        self.eps = NORM_EPS
        del state

    def _project(self, kind, hidden):
        w, b = self.proj[kind]
        return _normalize(np.asarray(hidden, np.float32)[:, 0] @ w.T + b, self.eps)

    def _tokens(self, texts):
        enc = self.processor(text=list(texts), padding="max_length", truncation=True, max_length=self.text_length,
                             return_tensors="np")
        return enc["input_ids"], enc["attention_mask"]

    def _decode(self, ids):
        from blip_core.numerics import to_numpy
        return [self.processor.decode(row, skip_special_tokens=True).strip() for row in to_numpy(ids).tolist()]

    def _base(self, record):
        return {"id": record["id"], "error": None, "model": self.model_name, "backend": self.spec.backend}

    def error_row(self, record, reason):
        row = self._base(record)
        row["error"] = reason
        return row

    # -- the model step ------------------------------------------------------------------------
    def run(self, prepared):
        """Rows for ``prepared`` records (errors included), in the same order."""
        rows = [None] * len(prepared)
        good = []
        for i, rec in enumerate(prepared):
            if rec.get("error"):
                rows[i] = self.error_row(rec, rec["error"])
            else:
                good.append(i)
        for start in range(0, len(good), self.spec.batch_size):
            idx = good[start:start + self.spec.batch_size]
            batch = [prepared[i] for i in idx]
            try:
                out = self._batch(batch)
            except (ValueError, TypeError, RuntimeError, MemoryError) as exc:
                out = []
                for rec in batch if len(batch) > 1 else []:
                    try:
                        out += self._batch([rec])
                    except (ValueError, TypeError, RuntimeError, MemoryError) as exc1:
                        out.append(self.error_row(rec, f"model: {exc1.__class__.__name__}: {exc1}"))
                if len(batch) == 1:
                    out = [self.error_row(batch[0], f"model: {exc.__class__.__name__}: {exc}")]
            for i, row in zip(idx, out):
                rows[i] = row
        return rows

    def _batch(self, batch):
        n, size = len(batch), self.spec.batch_size
        pixels = np.stack([r["pixels"] for r in batch] + [batch[-1]["pixels"]] * (size - n))
        texts = [r.get("text") for r in batch] + [batch[-1].get("text")] * (size - n)
        rows = [self._base(r) for r in batch]
        fn = getattr(self, f"_{self.spec.task}")
        for row, extra in zip(rows, fn(pixels, texts)[:n]):
            row.update(extra)
        return rows

    def _caption(self, pixels, texts):
        kwargs = {}
        if self.spec.prompt:
            enc = self.processor(text=[self.spec.prompt] * len(pixels), return_tensors="np")
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        ids = self.model.generate(pixel_values=pixels, num_beams=self.spec.num_beams,
                                  max_new_tokens=self.spec.max_new_tokens, **kwargs)
        return [{"caption": c} for c in self._decode(ids)]

    def _vqa(self, pixels, texts):
        questions = [self.spec.question or t for t in texts]
        if any(not q for q in questions):
            raise ValueError("no question: give one for all items, or a text column")
        ids, mask = self._tokens(questions)
        out = self.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                  num_beams=self.spec.num_beams, max_new_tokens=self.spec.max_new_tokens)
        return [{"question": q, "answer": a} for q, a in zip(questions, self._decode(out))]

    def _embed(self, pixels, texts):
        from blip_core.numerics import to_numpy
        ids, mask = self._tokens([""])
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False)
        image = self._project("vision", to_numpy(out.last_hidden_state))
        rows = [{"image_embedding": e} for e in image]
        if any(t is not None for t in texts):
            text = self.embed_texts([t or "" for t in texts])
            for row, t, e in zip(rows, texts, text):
                row.update(text=t, text_embedding=e if t is not None else None)
        return rows

    def embed_texts(self, texts):
        """ITC text embeddings (N, D) for ``texts`` (the image input is one blank image, unused by ITC)."""
        from blip_core.numerics import to_numpy
        ids, mask = self._tokens(texts)
        size = self.processor.image_processor.size
        blank = np.zeros((1, 3, size["height"], size["width"]), np.float32)
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=blank, use_itm_head=False)
        return self._project("text", to_numpy(out.question_embeds))

    def _match(self, pixels, texts):
        from blip_core.numerics import to_numpy
        b = len(pixels)
        per_item = not self.spec.texts
        if per_item and any(not t for t in texts):
            raise ValueError("no text to match: give texts for all items, or a text column")
        cands = [[t] for t in texts] if per_item else [list(self.spec.texts)] * b
        k = len(cands[0])
        ids, mask = self._tokens([t for c in cands for t in c])
        itm = to_numpy(self.model(input_ids=ids, attention_mask=mask, pixel_values=np.repeat(pixels, k, axis=0),
                                  use_itm_head=True).itm_score)
        prob = _softmax(itm)[:, 1].reshape(b, k).astype(np.float32)
        if per_item:
            itc = np.diagonal(to_numpy(self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                  use_itm_head=False).itm_score))[:, None]
        else:
            itc = to_numpy(self.model(input_ids=ids[:k], attention_mask=mask[:k], pixel_values=pixels,
                                      use_itm_head=False).itm_score)
        itc = np.asarray(itc, np.float32)
        return [{"texts": c, "itm_probability": prob[i].tolist(), "itc_score": itc[i].tolist()}
                for i, c in enumerate(cands)]
