"""Run an exported BLIP-2 ONNX bundle (OPT or T5) with numpy, ``tokenizers``, pillow and onnxruntime only.

The bundle is ``blip export MODEL_DIR OUT --format onnx`` of a ``Blip2ForConditionalGeneration``
(graphs: ``backends/torch/onnx_export_blip2.py``). ``OnnxBlip(path)`` opens it as an ``OnnxBlip2``.
The spec layer supplies every rule: where the image queries go (``blip_core.blip2.query_layout``),
the default prompt, the generation defaults and T5's start token (``blip_core.blip2``), OPT's
positions (``blip_core.decoding.prefill_positions``) and the search (``blip_runtime.numpy_engine``).

Example::

    from blip_runtime import OnnxBlip
    model = OnnxBlip("blip2_onnx")
    print(model.caption([image], prompt="Question: what is shown? Answer:", num_beams=3))
    ids = model.generate(pixel_values, input_ids, attention_mask, max_new_tokens=20)  # = the library's ids

``generate`` returns what the library's ``generate`` returns: OPT, the given ids (placeholders, bos,
prompt) followed by the new tokens; T5, the decoder ids from ``decoder_start_token_id``.
"""
from __future__ import annotations

import numpy as np

from blip_core import blip2 as rules
from blip_core import decoding
from blip_core.generation import check_token_ids

from . import numpy_engine
from .onnx_runner import OnnxBlip, _ids

_NP = numpy_engine.NumpyOps()


class OnnxBlip2(OnnxBlip):
    """An exported ``Blip2ForConditionalGeneration``; see the module docstring."""

    KIND = "BLIP-2 ONNX bundle"

    @property
    def processor(self):
        if self._processor is None:
            from blip_core.processing import Blip2Processor
            self._processor = Blip2Processor.from_pretrained(self.path)
        return self._processor

    @property
    def is_decoder_only(self) -> bool:
        return self.manifest["language_model"] == "opt"

    # -- stages --------------------------------------------------------------------------------
    def image_stages(self, pixel_values) -> dict:
        """``{"vision", "qformer", "projection"}``: the tower's states, the query states, the projected
        queries (the keys of the library's ``stages``)."""
        out = self.run("vision_qformer", pixel_values=self._pixels(pixel_values))
        return dict(zip(("vision", "qformer", "projection"), out))

    def get_image_features(self, pixel_values):
        """The projected image queries (B, Q, E), as ``Blip2ForConditionalGeneration.get_image_features``."""
        return self.image_stages(pixel_values)["projection"]

    def _prompt(self, batch, input_ids, attention_mask):
        """The language model's input: ids, query slots, mask (``rules.query_layout``) and the prefix."""
        cfg = self.config
        if input_ids is None:
            ids = rules.default_prompt(cfg, batch)
        else:
            ids = _ids(input_ids, "input_ids")
            check_token_ids(ids, cfg.text_config.vocab_size)
        if ids.shape[0] != batch:
            raise ValueError(f"the text batch ({ids.shape[0]}) and the image batch ({batch}) differ")
        mask = None if attention_mask is None else _ids(attention_mask, "attention_mask")
        return ids, rules.query_layout(ids, mask, cfg)

    # -- generation ----------------------------------------------------------------------------
    def _cache_names(self):
        layers = self.manifest["decoder_layers"]
        return [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]

    def _empty_cache(self, n):
        m = self.manifest
        return [np.zeros((n, m["decoder_heads"], 0, m["decoder_head_dim"]), np.float32)] * len(self._cache_names())

    def opt_step(self):
        """The step of ``numpy_engine.generate`` for OPT; ``context`` = (prompt ids behind the prefix,
        prompt embeddings, their query slots, the prefix's mask), as the library's OPT step."""
        session, names = self.sessions["decoder_step"], self._cache_names()
        width, limit = self.manifest["embed_dim"], self.config.text_config.max_position_embeddings

        def step(ids, _positions, key_mask, cache, index, context):
            prompt_ids, embeds, slots, prefix_mask = context
            n, s = ids.shape
            mask = np.concatenate([prefix_mask, key_mask[:, : int(index) + s]], 1).astype(np.int64)
            positions = decoding.prefill_positions(_NP, mask)     # over the prefix too (the library's rule)
            if cache is None:
                feeds = dict(input_ids=prompt_ids, inputs_embeds=embeds, embeds_mask=slots.astype(np.int64),
                             position_ids=positions)
                cache = self._empty_cache(n)
            else:
                feeds = dict(input_ids=np.asarray(ids, np.int64), inputs_embeds=np.zeros((n, s, width), np.float32),
                             embeds_mask=np.zeros((n, s), np.int64), position_ids=positions[:, -s:])
            rules.check_opt_position(int(feeds["position_ids"].max()), limit)
            feeds["attention_mask"] = mask
            feeds.update(zip(names, cache))
            out = session.run(None, feeds)
            return out[0], out[1:]
        return step

    def t5_step(self):
        """The T5 decoder step of ``numpy_engine.generate``; ``context`` = (cross keys/values, encoder mask)."""
        session, names = self.sessions["decoder_step"], self._cache_names()
        cross_names = [n.replace("past_", "cross_") for n in names]

        def step(ids, _positions, key_mask, cache, index, context):
            cross, enc_mask = context
            feeds = {"input_ids": np.asarray(ids, np.int64),
                     "attention_mask": np.asarray(key_mask[:, : int(index) + ids.shape[1]], np.int64),
                     "encoder_attention_mask": enc_mask}
            feeds.update(zip(names, self._empty_cache(ids.shape[0]) if cache is None else cache))
            feeds.update(zip(cross_names, cross))
            out = session.run(None, feeds)
            return out[0], out[1:]
        return step

    def generate(self, pixel_values, input_ids=None, attention_mask=None, **options):
        """``Blip2ForConditionalGeneration.generate``: greedy, beam, sampling and the processors of
        ``blip_core.decoding`` (options as the library's); int64 ids, or a ``GenerateOutput`` with
        ``return_dict_in_generate=True``."""
        cfg = self.config
        vocab = cfg.text_config.vocab_size
        options = {k: v for k, v in options.items() if k not in ("generator", "prng_key")}
        queries = self.get_image_features(pixel_values)
        ids, (full_ids, slots, mask, prefix) = self._prompt(queries.shape[0], input_ids, attention_mask)
        embeds = rules.place_queries(queries, slots)
        if self.is_decoder_only:
            settings = rules.generation_settings(cfg, ids.shape[1], **options)
            context = (full_ids, embeds, slots, mask[:, :prefix])
            return numpy_engine.generate(self.opt_step(), ids, settings, vocab_size=vocab,
                                         attention_mask=mask[:, prefix:], context=context)
        start_id = rules.decoder_start_token_id(cfg, options.pop("decoder_start_token_id", None))
        settings = rules.generation_settings(cfg, 1, **options)
        out = self.run("encoder", input_ids=full_ids, inputs_embeds=embeds, embeds_mask=slots.astype(np.int64),
                       attention_mask=mask)
        start = np.full((ids.shape[0], 1), start_id, np.int64)
        return numpy_engine.generate(self.t5_step(), start, settings, vocab_size=vocab,
                                     attention_mask=np.ones_like(start), context=(list(out[1:]), mask))

    def caption(self, images, prompt: str | None = None, **options) -> list:
        """Captions of PIL images (or arrays the image processor takes), with an optional text prompt."""
        processor = self.processor
        if prompt is None:
            inputs = processor(images=images, return_tensors="np")
            ids = mask = None
        else:
            n = len(images) if isinstance(images, (list, tuple)) else 1
            inputs = processor(images=images, text=[prompt] * n, return_tensors="np")
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
        out = self.generate(inputs["pixel_values"], input_ids=ids, attention_mask=mask, **options)
        return processor.batch_decode(out, skip_special_tokens=True)
