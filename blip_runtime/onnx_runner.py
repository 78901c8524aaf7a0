"""Run an exported BLIP ONNX bundle with numpy, ``tokenizers``, pillow and onnxruntime only.

The bundle (``blip export MODEL_DIR OUT --format onnx``, or ``backends.torch.onnx_export.export_onnx``)
holds the graphs listed in ``manifest.json``, the model's ``config.json`` and its processor files.
Preprocessing, prompts, generation settings and the decoding rules are the library's own spec
layer (``blip_core``, which imports no framework); the decoder loop is ``blip_runtime.numpy_engine``.

Example::

    from blip_runtime import OnnxBlip
    model = OnnxBlip("caption_onnx")
    print(model.caption([image], num_beams=3))              # ["a small red circle on the left"]
    ids = model.generate(pixel_values, max_new_tokens=20)   # the same ids as the library's generate

Methods mirror the library's classes: ``generate`` (captioning: ``pixel_values, input_ids=None,
attention_mask=None``; VQA: ``input_ids, pixel_values, attention_mask=None``), ``vision``,
``itm`` (retrieval, ``use_itm_head=True`` for ITM logits, False for ITC cosine),
``get_text_features`` / ``get_image_features`` (``BlipModel``). BLIP-2 bundles open as
``blip_runtime.onnx_blip2.OnnxBlip2``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort

from blip_core.generation import (
    blip_caption_prompt,
    check_pixel_values,
    resolve_blip_generation,
)

from . import numpy_engine
from .artifact import Artifact

FORMAT = "blip-onnx"


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _manifest_architecture(path) -> str:
    try:
        with open(os.path.join(os.fspath(path), "manifest.json")) as fh:
            return str(json.load(fh).get("architecture", ""))
    except (OSError, ValueError, AttributeError):
        return ""            # __init__ reports what is wrong with the directory


def _ids(x, name):
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.dtype.kind not in "iub":
        raise ValueError(f"{name} must be a (batch, length) integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


class OnnxBlip(Artifact):
    """An exported bundle: ``OnnxBlip(path, threads=None)``; see the module docstring. A BLIP-2 bundle
    opens as ``blip_runtime.onnx_blip2.OnnxBlip2``."""

    FORMAT, KIND = FORMAT, "BLIP ONNX bundle"

    def __new__(cls, path=None, threads: int | None = None):
        if cls is OnnxBlip and path is not None and _manifest_architecture(path).startswith("Blip2"):
            from .onnx_blip2 import OnnxBlip2
            cls = OnnxBlip2
        return super().__new__(cls)

    def __init__(self, path, threads: int | None = None):
        path = self._open(path)
        self.task, self.architecture = self.manifest["task"], self.manifest["architecture"]
        self.sessions = {name: _session(os.path.join(path, file), threads)
                         for name, file in self.manifest["graphs"].items()}

    def run(self, graph: str, **feeds) -> list:
        """One graph on named numpy inputs; returns its outputs in the manifest's order."""
        if graph not in self.sessions:
            raise ValueError(f"this {self.task} bundle has no {graph!r} graph (it has {', '.join(self.sessions)})")
        return self.sessions[graph].run(None, feeds)

    # -- stages --------------------------------------------------------------------------------
    def _pixels(self, pixel_values):
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        px = np.asarray(pixel_values, np.float32)
        check_pixel_values(px.shape, self.image_size, self.config.vision_config.patch_size, False)
        return px

    def vision(self, pixel_values):
        """``(last_hidden_state, pooler_output)`` of the vision tower."""
        return tuple(self.run("vision", pixel_values=self._pixels(pixel_values)))

    def _text(self, input_ids, attention_mask):
        ids = _ids(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _ids(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        vocab = self.config.text_config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids has ids outside the vocabulary of size {vocab}")
        return ids, mask

    # -- generation ----------------------------------------------------------------------------
    def step_function(self, masked: bool):
        """The decoder step of ``numpy_engine.generate`` on the ONNX graphs; ``masked``: the graph takes
        ``encoder_attention_mask`` (VQA). ``context`` = (cross keys/values per layer, that mask or None)."""
        m = self.manifest
        layers, heads, hd = m["decoder_layers"], m["decoder_heads"], m["decoder_head_dim"]
        past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        cross_names = [f"cross_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        session = self.sessions["decoder_step"]
        dtype = np.dtype(m.get("dtype", "float32"))      # of the keys/values (a float16 export's caches)

        def step(ids, positions, key_mask, cache, index, context):
            n = ids.shape[0]
            if cache is None:
                cache = [np.zeros((n, heads, 0, hd), dtype)] * len(past_names)
            cross, enc_mask = context
            feeds = {"input_ids": np.asarray(ids, np.int64), "position_ids": np.asarray(positions, np.int64),
                     "attention_mask": np.asarray(key_mask[:, : int(index) + ids.shape[1]], np.int64)}
            if masked:
                feeds["encoder_attention_mask"] = enc_mask
            feeds.update(zip(past_names, cache))
            feeds.update(zip(cross_names, cross))
            out = session.run(None, feeds)
            return out[0].astype(np.float32, copy=False), out[1:]
        return step

    def _decode(self, prompt, mask, states, states_mask, settings):
        cross = self.run("cross_kv", encoder_hidden_states=states)
        masked = self.manifest["decoder_cross_mask"]
        if masked and states_mask is None:
            states_mask = np.ones(states.shape[:2], np.int64)
        return numpy_engine.generate(self.step_function(masked), prompt, settings,
                                     vocab_size=self.config.text_config.vocab_size, attention_mask=mask,
                                     context=(list(cross), states_mask))

    def generate(self, *args, **kwargs):
        """Captioning: ``generate(pixel_values, input_ids=None, attention_mask=None, **options)``;
        VQA: ``generate(input_ids, pixel_values, attention_mask=None, **options)`` (transformers' orders)."""
        if self.task == "caption":
            return self._caption_ids(*args, **kwargs)
        if self.task == "vqa":
            return self._answer_ids(*args, **kwargs)
        raise ValueError(f"a {self.task} bundle does not generate")

    def _caption_ids(self, pixel_values=None, input_ids=None, attention_mask=None, **options):
        tc = self.config.text_config
        px = self._pixels(pixel_values)
        ids = None if input_ids is None else self._text(input_ids, None)[0]
        mask = None if attention_mask is None else _ids(attention_mask, "attention_mask")
        prompt, mask = blip_caption_prompt(ids, mask, px.shape[0], tc.bos_token_id, tc.eos_token_id)
        settings = resolve_blip_generation(tc, prompt.shape[1], **options)
        image = self.vision(px)[0]
        return self._decode(prompt, mask, image, None, settings)

    def _answer_ids(self, input_ids=None, pixel_values=None, attention_mask=None, **options):
        tc = self.config.text_config
        if input_ids is None:
            raise ValueError("input_ids (the tokenized question) is required")
        ids, mask = self._text(input_ids, attention_mask)
        px = self._pixels(pixel_values)
        if ids.shape[0] != px.shape[0]:
            raise ValueError(f"input_ids has batch {ids.shape[0]} but pixel_values has batch {px.shape[0]}")
        settings = resolve_blip_generation(tc, 1, **options)
        question = self.question_embeds(ids, px, mask)
        bos = np.full((ids.shape[0], 1), tc.bos_token_id, np.int64)
        q_mask = None if attention_mask is None else mask
        return self._decode(bos, None, question, q_mask, settings)

    def question_embeds(self, input_ids, pixel_values, attention_mask=None):
        ids, mask = self._text(input_ids, attention_mask)
        image = self.vision(pixel_values)[0]
        return self.run("question_encoder", input_ids=ids, attention_mask=mask, image_embeds=image)[0]

    # -- retrieval and embeddings --------------------------------------------------------------
    def itm(self, input_ids, pixel_values, attention_mask=None, use_itm_head: bool = True):
        """ITM logits (B, 2), or with ``use_itm_head=False`` the ITC cosine (B_img, B_txt)."""
        ids, mask = self._text(input_ids, attention_mask)
        image = self.vision(pixel_values)[0]
        if use_itm_head:
            if ids.shape[0] != image.shape[0]:
                raise ValueError(f"input_ids has batch {ids.shape[0]} but pixel_values has batch {image.shape[0]}")
            return self.run("itm", input_ids=ids, attention_mask=mask, image_embeds=image)[0]
        image_feat = self.run("image_embeds", image_embeds=image)[0]
        text_feat = self.run("text_embeds", input_ids=ids, attention_mask=mask)[0]
        return image_feat @ text_feat.T

    def get_text_features(self, input_ids, attention_mask=None):
        ids, mask = self._text(input_ids, attention_mask)
        return self.run("text_features", input_ids=ids, attention_mask=mask)[0]

    def get_image_features(self, pixel_values):
        return self.run("image_features", pixel_values=self._pixels(pixel_values))[0]

    # -- text in, text out ---------------------------------------------------------------------
    def caption(self, images, prompt: str | None = None, **options) -> list:
        """Captions of PIL images (or arrays the image processor takes)."""
        inputs = self.processor(images=images, return_tensors="np")
        ids = mask = None
        if prompt is not None:
            text = self.processor(text=[prompt] * len(inputs["pixel_values"]), return_tensors="np")
            ids, mask = text["input_ids"], text["attention_mask"]
        out = self.generate(inputs["pixel_values"], input_ids=ids, attention_mask=mask, **options)
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def answer(self, images, questions, **options) -> list:
        inputs = self.processor(images=images, text=questions, padding=True, return_tensors="np")
        out = self.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], **options)
        return self.processor.batch_decode(out, skip_special_tokens=True)
