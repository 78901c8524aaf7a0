"""BLIP-2 in Flax linen: vision tower -> Q-Former over learned queries -> OPT or T5 language model.

Classes (transformers 4.57 names, arguments and outputs): ``Blip2VisionModel``, ``Blip2QFormerModel`` (from
``qformer.py``), ``Blip2Model``, ``Blip2ForConditionalGeneration``; the retrieval and projection classes
(``blip2_retrieval.py``, kept apart for file size) reuse this module's ``Blip2Module``. Each holds a linen module
whose submodule names are transformers' (``vision_model``, ``qformer``, ``language_projection``, ``language_model``),
so the param paths are the weight table's jax paths.

Image-query fusion follows ``blip_core.blip2``: with ``config.image_token_index`` the projected queries replace
the Q placeholders of every row (rows without exactly Q placeholders raise); without it they are concatenated in
front of the text embeddings. In float16 the Q-Former and the query tokens stay float32 (``Blip2Weights``);
activations are cast at each boundary.

``generate`` compiles the towers, the language-model prefix (OPT's fused prompt, T5's encoder: run once) and
the decoding loop of ``generation.py`` into one program; the model side is ``init_cache`` and
``decoding_step``: ``step(ids, positions, key_mask, cache, index, context) -> (last logits (N, V) float32, cache)``.

Example::

    model = Blip2ForConditionalGeneration.from_pretrained("dir", dtype="bfloat16")
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip_core import blip2 as rules
from blip_core import decoding
from blip_core.configs import Blip2Config, Blip2VisionConfig
from blip_core.outputs import (BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions,
                               Blip2ForConditionalGenerationModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput)

from . import opt, t5
from ._base import as_input, is_concrete, mask_like, token_ids
from .blip import _labels
from .generation import decode, pad_batch, result, sampling_key, traced_numbers
from .qformer import Blip2QFormerModel, Blip2Weights, QFormer, TextEmbeddings
from .text import lm_loss
from .vision import BlipVisionModel, VisionTransformer, vision_inputs

__all__ = ["Blip2VisionModel", "Blip2QFormerModel", "Blip2Model", "Blip2ForConditionalGeneration"]


class Blip2VisionModel(Blip2Weights, BlipVisionModel):
    """The BLIP-2 ViT (``Blip2VisionConfig``: q/v ``qkv`` bias, eps 1e-6)."""

    config_class = Blip2VisionConfig


# -- modules -------------------------------------------------------------------------------------------
class Blip2Module(nn.Module):
    """Any BLIP-2 class: ``parts`` names the submodules it owns beyond ``query_tokens``."""

    config: Any
    parts: tuple

    def setup(self):
        c = self.config
        h = c.qformer_config.hidden_size
        self.query_tokens = self.param("query_tokens", nn.initializers.zeros, (1, c.num_query_tokens, h))
        if "vision_model" in self.parts:
            self.vision_model = VisionTransformer(c.vision_config)
        if "embeddings" in self.parts:
            self.embeddings = TextEmbeddings(c.qformer_config)
        self.qformer = QFormer(c.qformer_config)
        if "language_model" in self.parts:
            self.language_projection = nn.Dense(c.text_config.hidden_size)
            lm = opt.OPTForCausalLM if rules.is_decoder_only(c) else t5.T5ForConditionalGeneration
            self.language_model = lm(c.text_config)
        if "vision_projection" in self.parts:
            self.vision_projection = nn.Dense(c.image_text_hidden_size)
        if "text_projection" in self.parts:
            self.text_projection = nn.Dense(c.image_text_hidden_size)
        if "itm_head" in self.parts:
            self.itm_head = nn.Dense(2)

    def image_queries(self, pv, interpolate: bool, qdt):
        """``(vision (last, pooled, hidden, attentions), Q-Former (last, hidden, attentions, cross))``."""
        vision = self.vision_model.full(pv, interpolate)
        queries = jnp.broadcast_to(self.query_tokens, (pv.shape[0],) + self.query_tokens.shape[1:])
        return vision, self.qformer(queries, None, vision[0], None, None, qdt)

    def language_inputs(self, pv, interpolate: bool, qdt):
        vision, qformer = self.image_queries(pv, interpolate, qdt)
        # the Q-Former may be float32 inside a float16 model: come back to the tower's dtype
        return self.language_projection(qformer[0].astype(vision[0].dtype)), vision, qformer

    def placeholder_embedding(self):
        """The embedding row of ``image_token_index`` (how placeholders are found in ``inputs_embeds``)."""
        return self.language_model.embed(jnp.full((1, 1), self.config.image_token_index, jnp.int32))[0, 0]

    def fuse(self, lm_inputs, ids, mask, embeds=None):
        """Projected queries into the text embeddings (of ``ids``, or ``embeds`` given): ``(embeds, mask)``."""
        if embeds is None:
            embeds = self.language_model.embed(ids)
        lm_inputs = lm_inputs.astype(embeds.dtype)
        if not rules.uses_placeholders(self.config):
            ones = jnp.ones(lm_inputs.shape[:2], mask.dtype)
            return jnp.concatenate([lm_inputs, embeds], axis=1), jnp.concatenate([ones, mask], axis=1)
        if ids is not None:     # exactly Q per row (checked by the caller)
            slots = ids == self.config.image_token_index
        else:
            slots = jnp.all(embeds == self.placeholder_embedding().astype(embeds.dtype), axis=-1)
        rank = jnp.clip(jnp.cumsum(slots, axis=1) - 1, 0, lm_inputs.shape[1] - 1)
        placed = jnp.take_along_axis(lm_inputs, rank[..., None], axis=1)
        return jnp.where(slots[..., None], placed, embeds), mask

    def run_language_model(self, embeds, mask, dec_ids, dec_mask, labels, loss_convention: str = "transformers"):
        """``(loss or None, logits, lm hidden states, encoder states or None, maps)``; ``maps`` holds the
        attention maps (OPT ``attentions``; T5 ``decoder_attentions``, ``cross_attentions``,
        ``encoder_attentions``) and T5's ``encoder_hidden_states``: under jit, what a caller drops is not computed."""
        lm = self.language_model
        if rules.is_decoder_only(self.config):
            logits, hidden, _, attentions = lm(embeds, mask)
            loss = None
            if labels is not None:   # only the text positions carry labels: the last labels.shape[1] logits
                window, ignored = rules.loss_window(logits.shape[1], labels.shape[1], loss_convention)
                scored = jnp.pad(labels, ((0, 0), (ignored, 0)), constant_values=-100) if ignored else labels
                loss = lm_loss(logits[:, -window:], scored)
                logits = logits[:, -labels.shape[1]:]
            return loss, logits, hidden, None, {"attentions": attentions}
        rules.check_loss_convention(loss_convention)     # T5's loss is the same under both
        if dec_ids is None:
            dec_ids = t5.shift_right(labels, *rules.label_shift_ids(self.config))
        dec_mask = jnp.ones(dec_ids.shape, jnp.int32) if dec_mask is None else dec_mask
        o = lm(embeds, mask, dec_ids, dec_mask)
        maps = {k: o[k] for k in ("decoder_attentions", "cross_attentions", "encoder_attentions",
                                  "encoder_hidden_states")}
        loss = t5.token_loss(o["logits"], labels) if labels is not None else None
        return loss, o["logits"], o["decoder_hidden_states"], o["encoder_last_hidden_state"], maps


_FLAGS = ("output_hidden_states", "output_attentions")


def _vision_output(v, hs, at):
    return BaseModelOutputWithPooling(last_hidden_state=v[0], pooler_output=v[1], hidden_states=v[2] if hs else None,
                                      attentions=v[3] if at else None)


def _qformer_output(q, hs, at):
    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=q[0], pooler_output=q[0][:, 0], hidden_states=q[1] if hs else None,
        attentions=q[2] if at else None, cross_attentions=q[3] if at else None)


class _Blip2Base(Blip2Weights):
    config_class = Blip2Config
    kept_float32 = rules.KEEP_FLOAT32_MODULES
    parts: tuple = ()

    def _module(self):
        return Blip2Module(self.config, self.parts)

    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _pixels(self, pixel_values, interpolate):
        return vision_inputs(self.config.vision_config, pixel_values, interpolate, self.dtype)

    def _mask(self, mask, shape, name="attention_mask"):
        return mask_like(mask, shape, name)


# -- Blip2Model / Blip2ForConditionalGeneration -----------------------------------------------------------
class _Blip2WithLanguageModel(_Blip2Base):
    parts = ("vision_model", "language_model")

    @property
    def is_decoder_only(self) -> bool:
        return rules.is_decoder_only(self.config)

    def _text_ids(self, input_ids, attention_mask):
        tc = self.config.text_config
        if input_ids is None:
            raise ValueError("input_ids is required")
        ids = token_ids(input_ids, "input_ids", tc.vocab_size)
        if rules.uses_placeholders(self.config) and is_concrete(ids):
            rules.image_slots(np.asarray(ids), self.config)
        return ids, self._mask(attention_mask, ids.shape)

    def _text(self, input_ids, attention_mask, inputs_embeds, params):
        """``(ids or None, embeds or None, mask)``: exactly one of ``input_ids`` / ``inputs_embeds``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            ids, mask = self._text_ids(input_ids, attention_mask)
            return ids, None, mask
        embeds = jnp.asarray(as_input(inputs_embeds, "inputs_embeds", "f", ndim=3)).astype(self.dtype)
        known = is_concrete(embeds) and all(is_concrete(a) for a in jax.tree_util.tree_leaves(params))
        if rules.uses_placeholders(self.config) and known:
            row = self._apply(params, method=lambda m: m.placeholder_embedding().astype(embeds.dtype))
            rules.check_image_slots(np.asarray(jnp.all(embeds == row, axis=-1)).sum(axis=1), self.config)
        return None, embeds, self._mask(attention_mask, embeds.shape[:2])

    def _decoder_inputs(self, decoder_input_ids, decoder_attention_mask, labels, text_shape):
        vocab = self.config.text_config.vocab_size
        dec = token_ids(decoder_input_ids, "decoder_input_ids", vocab)
        dec_mask = None if decoder_attention_mask is None or dec is None else \
            self._mask(decoder_attention_mask, dec.shape, "decoder_attention_mask")
        if labels is not None:
            labels = as_input(labels, "labels", "iu", ndim=2)
            shape = labels.shape if self.is_decoder_only or dec is None else dec.shape
            if self.is_decoder_only:   # the language model sees the queries too on the concatenation path
                prefix = 0 if rules.uses_placeholders(self.config) else self.config.num_query_tokens
                rules.labelled_length(text_shape[1] + prefix, labels.shape[1])
            labels = _labels(labels, shape, vocab)
        elif not self.is_decoder_only and dec is None:
            raise ValueError("a T5 language model needs decoder_input_ids or labels")
        return dec, dec_mask, labels

    def _forward(self, params, pv, ids, embeds, mask, dec, dec_mask, labels, interpolate, output_hidden_states=False,
                 output_attentions=False, loss_convention="transformers"):
        qdt = self.qformer_dtype

        def run(m, pv, ids, embeds, mask, dec, dec_mask, labels):
            lm_inputs, vision, qformer = m.language_inputs(pv, interpolate, qdt)
            embeds, full_mask = m.fuse(lm_inputs, ids, mask, embeds)
            loss, logits, hidden, enc, maps = m.run_language_model(embeds, full_mask, dec, dec_mask, labels,
                                                                   loss_convention)
            maps = {k: v for k, v in maps.items() if output_attentions or k == "encoder_hidden_states"}
            if not output_hidden_states:
                maps.pop("encoder_hidden_states", None)
            return dict(loss=loss, logits=logits, lm_hidden=hidden, encoder=enc, vision=vision, qformer=qformer,
                        projection=lm_inputs, lm_maps=maps)
        return self._apply(params, pv, ids, embeds, mask, dec, dec_mask, labels, method=run)

    def _run(self, pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
             interpolate_pos_encoding, params, hs=False, at=False, inputs_embeds=None,
             loss_convention="transformers"):
        rules.check_loss_convention(loss_convention)
        params = self._params(params)
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, embeds, mask = self._text(input_ids, attention_mask, inputs_embeds, params)
        if mask.shape[0] != pv.shape[0]:
            raise ValueError(f"the text batch ({mask.shape[0]}) and the image batch ({pv.shape[0]}) differ")
        dec, dec_mask, labels = self._decoder_inputs(decoder_input_ids, decoder_attention_mask, labels, mask.shape)
        fn = self._jit("forward", "_forward", ("interpolate", "loss_convention") + _FLAGS)
        return fn(params, pv, ids, embeds, mask, dec, dec_mask, labels, interpolate=bool(interpolate_pos_encoding),
                  output_hidden_states=bool(hs), output_attentions=bool(at), loss_convention=loss_convention)

    def __call__(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, inputs_embeds=None, labels=None, interpolate_pos_encoding: bool = False,
                 output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                 loss_convention: str = "transformers", params=None):
        """With ``labels``, OPT's logits are those of the labelled (last ``labels.shape[1]``) positions.
        ``inputs_embeds`` replaces ``input_ids``; its placeholders are the rows equal to the image token's
        embedding. ``loss_convention``: "transformers" (default) or "lavis" (see ``blip_core.blip2.loss_window``)."""
        hs, at = bool(output_hidden_states), bool(output_attentions)
        o = self._run(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
                      interpolate_pos_encoding, params, hs, at, inputs_embeds, loss_convention)
        maps = o["lm_maps"]
        if self.is_decoder_only:
            lm = CausalLMOutputWithPast(logits=o["logits"], hidden_states=o["lm_hidden"] if hs else None,
                                        attentions=maps.get("attentions"))
        else:
            lm = Seq2SeqLMOutput(logits=o["logits"], decoder_hidden_states=o["lm_hidden"] if hs else None,
                                 decoder_attentions=maps.get("decoder_attentions"),
                                 cross_attentions=maps.get("cross_attentions"),
                                 encoder_last_hidden_state=o["encoder"],
                                 encoder_hidden_states=maps.get("encoder_hidden_states"),
                                 encoder_attentions=maps.get("encoder_attentions"))
        out = Blip2ForConditionalGenerationModelOutput(loss=o["loss"], logits=o["logits"],
                                                     vision_outputs=_vision_output(o["vision"], hs, at),
                                                     qformer_outputs=_qformer_output(o["qformer"], hs, at),
                                                     language_model_outputs=lm)
        return out if return_dict else out.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, labels=None, interpolate_pos_encoding=False, params=None, **_) -> dict:
        o = self._run(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
                      interpolate_pos_encoding, params)
        st = {"vision": o["vision"][0], "vision_pooled": o["vision"][1], "qformer": o["qformer"][0],
              "projection": o["projection"], "lm_hidden": o["lm_hidden"][-1], "logits": o["logits"]}
        if o["loss"] is not None:
            st["loss"] = o["loss"]
        return st


class Blip2Model(_Blip2WithLanguageModel):
    """Vision + Q-Former + language model, with feature getters for each part."""

    def __call__(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, labels=None, interpolate_pos_encoding: bool = False, inputs_embeds=None,
                 output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                 loss_convention: str = "transformers", params=None):
        """As ``Blip2ForConditionalGeneration``; ``inputs_embeds`` comes after transformers' parameters, which
        have no ``inputs_embeds`` here, so that positional calls mean what they mean there."""
        return super().__call__(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                inputs_embeds=inputs_embeds, labels=labels,
                                interpolate_pos_encoding=interpolate_pos_encoding,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=return_dict, loss_convention=loss_convention, params=params)

    def _text_features(self, params, ids, mask, dec, dec_mask, labels):
        def run(m, ids, mask, dec, dec_mask, labels):
            return m.run_language_model(m.language_model.embed(ids), mask, dec, dec_mask, labels)[:4]
        return self._apply(params, ids, mask, dec, dec_mask, labels, method=run)

    def get_text_features(self, input_ids, attention_mask=None, decoder_input_ids=None,
                          decoder_attention_mask=None, labels=None, legacy_output: bool = True, params=None):
        """Language model on text alone: its output object, or its logits with ``legacy_output=False``."""
        ids = token_ids(input_ids, "input_ids", self.config.text_config.vocab_size)
        if ids is None:
            raise ValueError("input_ids is required")
        mask = self._mask(attention_mask, ids.shape)
        dec, dec_mask, labels = self._decoder_inputs(decoder_input_ids, decoder_attention_mask, labels, ids.shape)
        fn = self._jit("text_features", "_text_features")
        loss, logits, hidden, enc = fn(self._params(params), ids, mask, dec, dec_mask, labels)
        if legacy_output:
            return (CausalLMOutputWithPast(loss=loss, logits=logits) if self.is_decoder_only else
                    Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=enc))
        return logits

    def _image_features(self, params, pv, interpolate, which):
        qdt = self.qformer_dtype

        def run(m, pv):
            if which == "vision":
                return m.vision_model.full(pv, interpolate)[:2]
            return m.image_queries(pv, interpolate, qdt)[1][0]
        return self._apply(params, pv, method=run)

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                           legacy_output: bool = True, params=None):
        """Vision tower outputs, or its ``pooler_output`` with ``legacy_output=False``."""
        fn = self._jit("image_features", "_image_features", ("interpolate", "which"))
        last, pooled = fn(self._params(params), self._pixels(pixel_values, interpolate_pos_encoding),
                          interpolate=bool(interpolate_pos_encoding), which="vision")
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled) if legacy_output else pooled

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                             legacy_output: bool = True, params=None):
        """Q-Former outputs over the image, or their ``last_hidden_state`` with ``legacy_output=False``."""
        fn = self._jit("image_features", "_image_features", ("interpolate", "which"))
        h = fn(self._params(params), self._pixels(pixel_values, interpolate_pos_encoding),
               interpolate=bool(interpolate_pos_encoding), which="qformer")
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=h[:, 0]) \
            if legacy_output else h


class Blip2ForConditionalGeneration(_Blip2WithLanguageModel):
    """Image (+ prompt) -> text: logits (and the loss with ``labels``), ``generate``.

    ``generate`` returns, as transformers 4.57: for OPT the given ids (placeholders + bos + prompt, or the
    ids alone on the concatenation path) followed by the new tokens, or the new tokens alone when only
    ``inputs_embeds`` are given; for T5 the decoder ids, starting with ``decoder_start_token_id``.

    ``decoding_context(pixel_values, input_ids, attention_mask)`` holds what a step closes over (rows first):
    for OPT the fused prompt embeddings (``prompt``) and whatever sits in front of the token buffer
    (``prefix`` and ``prefix_mask``: the concatenated queries, or all of ``inputs_embeds`` given alone); for
    T5 the cross-attention keys/values of the encoder states (the encoder runs once) and their mask.
    ``init_cache(rows, total_len, prefix)`` and ``decoding_step(params)`` follow the engine's step contract.
    """

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False, return_dict: bool = False,
                           params=None):
        """The projected queries (B, Q, D_lm) the language model receives; with ``return_dict`` also the
        vision and Q-Former outputs: ``(projected, vision_outputs, qformer_outputs)``."""
        fn = self._jit("image_features", "_image_features", ("interpolate",))
        lm_inputs, vision, qformer = fn(self._params(params), self._pixels(pixel_values, interpolate_pos_encoding),
                                        interpolate=bool(interpolate_pos_encoding))
        if not return_dict:
            return lm_inputs
        return lm_inputs, _vision_output(vision, False, False), _qformer_output(qformer, False, False)

    def _image_features(self, params, pv, interpolate):
        qdt = self.qformer_dtype
        return self._apply(params, pv, method=lambda m, pv: m.language_inputs(pv, interpolate, qdt))

    # -- decoding ------------------------------------------------------------------------------------------
    def init_cache(self, rows: int, total_len: int, prefix: int = 0):
        """Zeroed caches; OPT's has ``prefix`` more slots for what sits in front of the token buffer."""
        tc = self.config.text_config
        if self.is_decoder_only:
            return opt.init_cache(tc, rows, prefix + total_len, self.dtype)
        return t5.init_cache(tc, rows, total_len, self.dtype)

    def _context(self, params, pv, ids, embeds, mask, interpolate):
        qdt = self.qformer_dtype

        def run(m, pv, ids, embeds, mask):
            lm_inputs = m.language_inputs(pv, interpolate, qdt)[0]
            fused, full_mask = m.fuse(lm_inputs, ids, mask, embeds)
            if not self.is_decoder_only:
                enc = m.language_model.encode(fused, full_mask)[0]
                return {"cross_kv": m.language_model.cross_kv(enc), "encoder_mask": full_mask}
            if ids is None:          # embeddings alone: all of them sit in front of an empty token buffer
                return {"prefix": fused, "prefix_mask": full_mask}
            if rules.uses_placeholders(self.config):
                return {"prompt": fused, "prefix": fused[:, :0], "prefix_mask": full_mask[:, :0]}
            q = lm_inputs.shape[1]   # concatenation path: the queries sit in front, the ids are the buffer's
            return {"prefix": fused[:, :q], "prefix_mask": full_mask[:, :q]}
        return self._apply(params, pv, ids, embeds, mask, method=run)

    def _prompt(self, pixel_values, input_ids, attention_mask, inputs_embeds, interpolate, params):
        pv = self._pixels(pixel_values, interpolate)
        if input_ids is None and inputs_embeds is None:
            input_ids = rules.default_prompt(self.config, pv.shape[0])
        ids, embeds, mask = self._text(input_ids, attention_mask, inputs_embeds, params)
        if mask.shape[0] != pv.shape[0]:
            raise ValueError(f"the text batch ({mask.shape[0]}) and the image batch ({pv.shape[0]}) differ")
        return pv, ids, embeds, mask

    def decoding_context(self, pixel_values=None, input_ids=None, attention_mask=None, inputs_embeds=None,
                         interpolate_pos_encoding: bool = False, params=None):
        """The per-input pytree the decoding step closes over (see the class docstring)."""
        params = self._params(params)
        pv, ids, embeds, mask = self._prompt(pixel_values, input_ids, attention_mask, inputs_embeds,
                                             interpolate_pos_encoding, params)
        fn = self._jit("context", "_context", ("interpolate",))
        return fn(params, pv, ids, embeds, mask, interpolate=bool(interpolate_pos_encoding))

    def decoding_step(self, params=None):
        """``step(ids, positions, key_mask, cache, index, context) -> (logits (N, V) float32, cache)``.

        ``index`` 0 given as a Python int is the prefill over the whole prompt; afterwards ``ids`` is the one
        token at buffer ``index``. OPT's context may put embeddings in front of the token buffer (the queries
        of the concatenation path, or all of ``inputs_embeds`` given alone): their mask extends ``key_mask``
        and its cache has that many more slots (``init_cache(rows, total, prefix)``). OPT derives positions
        from the whole mask (padded slots at 1, as transformers' generate); T5 has relative positions only;
        ``positions`` is not needed."""
        params = self._params(params)

        def opt_step(m, ids, key_mask, cache, index, context):
            prefix = context["prefix_mask"].shape[1]
            key_mask = jnp.concatenate([context["prefix_mask"].astype(key_mask.dtype), key_mask], 1)
            if isinstance(index, int) and index == 0:
                prompt = context["prompt"] if "prompt" in context else m.language_model.embed(ids)
                embeds, start = jnp.concatenate([context["prefix"], prompt], axis=1), 0
            else:
                embeds, start = m.language_model.embed(ids), index + prefix
            logits, _, cache, _ = m.language_model(embeds, key_mask, start, cache, pad_position=1)
            return logits[:, -1].astype(jnp.float32), cache

        def t5_step(m, ids, key_mask, cache, index, context):
            logits, _, cache, _, _ = m.language_model.decode(ids, key_mask, context["cross_kv"],
                                                             context["encoder_mask"], index, cache)
            return logits[:, -1].astype(jnp.float32), cache

        fn = opt_step if self.is_decoder_only else t5_step

        def step(ids, positions, key_mask, cache, index, context):
            return self._apply(params, ids, key_mask, cache, index, context, method=fn)
        return step

    def generate(self, pixel_values, input_ids=None, attention_mask=None, inputs_embeds=None,
                 interpolate_pos_encoding: bool = False, **generate_kwargs):
        """Ids (B * num_return_sequences, L); options as transformers' generate (max_new_tokens, num_beams,
        do_sample, temperature, top_k, top_p, repetition_penalty, length_penalty, ...), plus ``seed`` or
        ``prng_key`` for sampling, ``decoder_start_token_id`` for T5 and ``params``. One compiled program per
        shape and plan: numeric settings are traced."""
        kwargs = dict(generate_kwargs)
        params = self._params(kwargs.pop("params", None))
        key = kwargs.pop("prng_key", None)
        if kwargs.pop("generator", None) is not None:
            raise ValueError("generator is a torch option; pass prng_key (a jax PRNG key) or seed to the JAX backend")
        kwargs.pop("use_cache", None)
        pv, ids, embeds, mask = self._prompt(pixel_values, input_ids, attention_mask, inputs_embeds,
                                             interpolate_pos_encoding, params)
        if self.is_decoder_only:   # embeddings alone: as transformers, the output holds the new tokens only
            prompt, prompt_mask = (ids, mask) if ids is not None else (jnp.zeros((mask.shape[0], 0), jnp.int32),) * 2
            settings = rules.generation_settings(self.config, prompt.shape[1], **kwargs)
        else:
            start = rules.decoder_start_token_id(self.config, kwargs.pop("decoder_start_token_id", None))
            settings = rules.generation_settings(self.config, 1, **kwargs)
            prompt = jnp.full((mask.shape[0], 1), start, jnp.int32)
            prompt_mask = jnp.ones_like(prompt)
        batch = mask.shape[0]
        plan, numbers, padded = decoding.bucketed_plan(settings, self.config.text_config.vocab_size, batch,
                                                       self._new_tokens_limit(prompt.shape[1], ids, embeds))
        args = ((params,) + pad_batch((pv, ids, embeds, mask, prompt, prompt_mask), batch, padded)
                + (sampling_key(settings, key), traced_numbers(numbers)))
        static = dict(plan=plan, interpolate=bool(interpolate_pos_encoding))
        return result(settings, *self._program("generate", "_generate_program", args, **static)(*args, **static),
                      batch=batch)

    def _new_tokens_limit(self, prompt_length: int, ids, embeds):
        """The most new tokens OPT's position table holds after the prompt (and what sits in front of its
        token buffer); None for T5, whose positions are relative."""
        if not self.is_decoder_only:
            return None
        tc = self.config.text_config
        if ids is None:
            front = embeds.shape[1] + (0 if rules.uses_placeholders(self.config) else self.config.num_query_tokens)
        else:
            front = 0 if rules.uses_placeholders(self.config) else self.config.num_query_tokens
        return tc.max_position_embeddings - front - prompt_length

    def _generate_program(self, params, pv, ids, embeds, mask, prompt, prompt_mask, key, numbers, plan, interpolate):
        """Towers and language-model prefix once, then the decoding loop: one XLA program."""
        context = self._context(params, pv, ids, embeds, mask, interpolate)
        prefix = context["prefix_mask"].shape[1] if self.is_decoder_only else 0

        def init_cache(rows, total):
            return self.init_cache(rows, total, prefix)
        return decode(self.decoding_step(params), init_cache, context, prompt, prompt_mask, key, plan, numbers)
