"""Run a StableHLO artifact (``blip export MODEL_DIR OUT --format stablehlo``) with jax and numpy only.

No Flax and none of this library's backends: ``jax.export.deserialize`` restores each program and
``Exported.call`` runs it on the weights of ``params.npz``. Preprocessing is the spec layer's
(``blip_core.processing``). Example::

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
        vc = self.config.vision_config
        check_pixel_values(px.shape, vc.image_size, vc.patch_size, False)
        return px

    def generate(self, pixel_values, input_ids=None, attention_mask=None):
        """Caption ids (B * num_return_sequences, L), int64 (BLIP: starting with bos; BLIP-2: the prompt
        ids of the export's length and its mask are required)."""
        inputs = [self._pixels(pixel_values)]
        if "input_ids" in self.manifest["programs"]["caption"]["inputs"]:
            if input_ids is None:
                raise ValueError("this BLIP-2 program needs input_ids and attention_mask")
            ids = np.asarray(input_ids, np.int32)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
            inputs += [ids, mask]
        seqs, length = self._call("caption", *inputs)
        return np.asarray(seqs)[:, : int(length)].astype(np.int64)

    def get_image_features(self, pixel_values):
        return np.asarray(self._call("image_features", self._pixels(pixel_values)))

    def get_text_features(self, input_ids, attention_mask=None):
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        return np.asarray(self._call("text_features", ids, mask))

    def caption(self, images) -> list:
        px = self.processor(images=images, return_tensors="np")["pixel_values"]
        return self.processor.batch_decode(self.generate(px), skip_special_tokens=True)
