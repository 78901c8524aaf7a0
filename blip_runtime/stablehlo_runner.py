"""Run a StableHLO artifact (``blip export MODEL_DIR OUT --format stablehlo``) with jax and numpy only.

No Flax and none of this library's backends: ``jax.export.deserialize`` restores each program and
``Exported.call`` runs it on the weights of ``params.npz``. Preprocessing is the spec layer's
(``blip_core.processing``; an artifact exported at another image size carries a processor that
resizes to it). Methods mirror ``OnnxBlip``'s: ``generate`` (captioning: ``pixel_values`` [BLIP-2:
``input_ids``, ``attention_mask``]; VQA: ``input_ids, pixel_values, attention_mask``, transformers'
order), ``itm(..., use_itm_head=)`` (retrieval), ``get_image_features`` / ``get_text_features``
(``BlipModel``), and ``caption`` / ``answer`` from images and text. Example::

    from blip_runtime.stablehlo_runner import StableHLOBlip
    model = StableHLOBlip("caption_hlo")
    ids = model.generate(pixel_values)             # the library's generate ids (options fixed at export)
    print(model.caption([image]))
"""
from __future__ import annotations

import os

import jax
import numpy as np

from blip_core.generation import check_pixel_values

from .artifact import Artifact

FORMAT = "blip-stablehlo"


def _text(input_ids, attention_mask):
    ids = np.asarray(input_ids)
    ids = (ids[None] if ids.ndim == 1 else ids).astype(np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    return ids, mask.astype(np.int32)


class StableHLOBlip(Artifact):
    FORMAT, KIND = FORMAT, "BLIP StableHLO artifact"

    def __init__(self, path):
        path = self._open(path)
        self.programs = {}
        for name in self.manifest["programs"]:
            with open(os.path.join(path, f"{name}.stablehlo"), "rb") as fh:
                self.programs[name] = jax.export.deserialize(bytearray(fh.read()))
        with np.load(os.path.join(path, "params.npz")) as data:
            self.leaves = [data[f"p{i}"] for i in range(len(data.files))]

    def _call(self, name, *inputs):
        if name not in self.programs:
            raise ValueError(f"this artifact has no {name!r} program (it has {', '.join(self.programs)})")
        return self.programs[name].call(self.leaves, *inputs)

    def _pixels(self, pixel_values):
        px = np.asarray(pixel_values, self.manifest["dtype"])
        check_pixel_values(px.shape, self.image_size, self.config.vision_config.patch_size, False)
        return px

    def generate(self, *args, **kwargs):
        """Captioning: ``generate(pixel_values, input_ids=None, attention_mask=None)`` -> caption ids
        (B * num_return_sequences, L), int64 (BLIP: starting with bos; BLIP-2: the prompt ids of the
        export's length and its mask are required). VQA: ``generate(input_ids, pixel_values,
        attention_mask=None)`` -> answer ids starting with bos."""
        if "answer" in self.programs:
            return self._answer_ids(*args, **kwargs)
        return self._caption_ids(*args, **kwargs)

    def _caption_ids(self, pixel_values, input_ids=None, attention_mask=None):
        inputs = [self._pixels(pixel_values)]
        if "input_ids" in self.manifest["programs"]["caption"]["inputs"]:
            if input_ids is None:
                raise ValueError("this BLIP-2 program needs input_ids and attention_mask")
            inputs += list(_text(input_ids, attention_mask))
        seqs, length = self._call("caption", *inputs)
        return np.asarray(seqs)[:, : int(length)].astype(np.int64)

    def _answer_ids(self, input_ids=None, pixel_values=None, attention_mask=None):
        if input_ids is None or pixel_values is None:
            raise ValueError("input_ids (the tokenized question) and pixel_values are required")
        px = self._pixels(pixel_values)
        ids, mask = _text(input_ids, attention_mask)
        if ids.shape[0] != px.shape[0]:
            raise ValueError(f"input_ids has batch {ids.shape[0]} but pixel_values has batch {px.shape[0]}")
        seqs, length = self._call("answer", px, ids, mask)
        return np.asarray(seqs)[:, : int(length)].astype(np.int64)

    def itm(self, input_ids, pixel_values, attention_mask=None, use_itm_head: bool = True):
        """ITM logits (B, 2), or with ``use_itm_head=False`` the ITC cosine (B_img, B_txt)."""
        px = self._pixels(pixel_values)
        ids, mask = _text(input_ids, attention_mask)
        if use_itm_head:
            if ids.shape[0] != px.shape[0]:
                raise ValueError(f"input_ids has batch {ids.shape[0]} but pixel_values has batch {px.shape[0]}")
            return np.asarray(self._call("itm", px, ids, mask))
        image = np.asarray(self._call("image_embeds", px))
        return image @ np.asarray(self._call("text_embeds", ids, mask)).T

    def get_image_features(self, pixel_values):
        return np.asarray(self._call("image_features", self._pixels(pixel_values)))

    def get_text_features(self, input_ids, attention_mask=None):
        return np.asarray(self._call("text_features", *_text(input_ids, attention_mask)))

    def caption(self, images) -> list:
        px = self.processor(images=images, return_tensors="np")["pixel_values"]
        return self.processor.batch_decode(self.generate(px), skip_special_tokens=True)

    def answer(self, images, questions) -> list:
        inputs = self.processor(images=images, text=questions, padding=True, return_tensors="np")
        out = self.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        return self.processor.batch_decode(out, skip_special_tokens=True)
