"""The BLIP task models in Flax linen: BlipModel, captioning, retrieval and VQA, with losses and generate.

Each public class holds a linen module whose submodule names are those of transformers
(``vision_model``, ``text_model``, ``text_encoder``, ``text_decoder``, ...), so its param paths are the
weight table's jax paths. Forward passes are jitted once per model (static flags as static arguments);
``generate`` compiles vision tower, question encoder, cross-attention K/V and the decoding loop into one
program (see ``generation.py``).

Deliberate difference from transformers 4.57 PyTorch: the cross-attention mask is applied. It matters only
for VQA over a padded question, where the decoder (forward and generate) now ignores the question's padding
(transformers attends to it, and its generate passes an all-ones mask).

Example::

    model = BlipForConditionalGeneration.from_pretrained("hf_dir")
    ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=20)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip_core import decoding
from blip_core.configs import BlipConfig
from blip_core.generation import blip_caption_prompt, check_label_ids, resolve_blip_generation
from blip_core.numerics import NORM_EPS
from blip_core.outputs import (BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions,
                               BlipForConditionalGenerationModelOutput, BlipImageTextMatchingModelOutput, BlipOutput,
                               BlipTextVisionModelOutput)

from ._base import JaxModel, cast, is_concrete, token_ids
from .generation import decode, pad_batch, result, sampling_key, traced_numbers
from .text import (TextLMHeadModel, TextModel, cross_attention_bias, decoder_bias, encode_text, lm_loss,
                   text_inputs)
from .text import init_cache as init_text_cache
from .vision import VisionTransformer, vision_inputs


# -- modules -------------------------------------------------------------------------------------------
class BlipModelModule(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.text_model = TextModel(c.text_config, add_pooling_layer=True)
        self.vision_model = VisionTransformer(c.vision_config)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.zeros, ())


class CaptioningModule(nn.Module):
    config: Any

    def setup(self):
        self.vision_model = VisionTransformer(self.config.vision_config)
        self.text_decoder = TextLMHeadModel(self.config.text_config)


class RetrievalModule(nn.Module):
    config: Any

    def setup(self):
        c = self.config
        self.vision_model = VisionTransformer(c.vision_config)
        self.text_encoder = TextModel(c.text_config, add_pooling_layer=False)
        self.vision_proj = nn.Dense(c.image_text_hidden_size)
        self.text_proj = nn.Dense(c.image_text_hidden_size)
        self.itm_head = nn.Dense(2)


class QuestionAnsweringModule(nn.Module):
    config: Any

    def setup(self):
        self.vision_model = VisionTransformer(self.config.vision_config)
        self.text_encoder = TextModel(self.config.text_config, add_pooling_layer=False)
        self.text_decoder = TextLMHeadModel(self.config.text_config)


def _vision(m, pv, interpolate, hidden_flag, attn_flag):
    """Vision tower inside a task module: ``(last, pooled, hidden_states or None, attentions or None)``."""
    last, pooled, hidden, attentions = m.vision_model.full(pv, interpolate)
    return last, pooled, hidden if hidden_flag else None, attentions if attn_flag else None


_FLAGS = ("output_hidden_states", "output_attentions")


def _normalize(x):
    """L2 normalisation by the spec layer's rule (``blip_core.numerics.NORM_EPS``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def _contrastive(logits):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.diagonal(logp))


# -- shared plumbing of the composite classes ----------------------------------------------------------
class _BlipBase(JaxModel):
    config_class = BlipConfig

    def _pixels(self, pixel_values, interpolate):
        return vision_inputs(self.config.vision_config, pixel_values, interpolate, self.dtype)

    def _text(self, input_ids, attention_mask, name="input_ids"):
        if input_ids is None:
            raise ValueError(f"{name} are required")
        return text_inputs(self.config.text_config, input_ids, attention_mask)

    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _positions(self, position_ids, shape):
        if position_ids is None:
            return None
        pos = token_ids(position_ids, "position_ids", self.config.text_config.max_position_embeddings)
        if tuple(pos.shape) != tuple(shape):
            raise ValueError(f"position_ids shape {tuple(pos.shape)} does not match input_ids shape {tuple(shape)}")
        return pos

    def _check_batch(self, pv, ids):
        if pv.shape[0] != ids.shape[0]:
            raise ValueError(f"pixel_values has batch {pv.shape[0]} but input_ids has batch {ids.shape[0]}")

    # -- generation ---------------------------------------------------------------------------------------
    def _generate(self, pv, prompt, prompt_mask, question, question_mask, interpolate, kwargs):
        tc = self.config.text_config
        kwargs = dict(kwargs)
        params = self._params(kwargs.pop("params", None))
        key = kwargs.pop("prng_key", None)
        if kwargs.pop("generator", None) is not None:
            raise ValueError("generator is a torch option; pass prng_key (a jax PRNG key) or seed to the JAX backend")
        kwargs.pop("use_cache", None)
        settings = resolve_blip_generation(tc, prompt.shape[1], **kwargs)
        batch = pv.shape[0]
        plan, numbers, padded = decoding.bucketed_plan(settings, tc.vocab_size, batch,
                                                       tc.max_position_embeddings + 1 - prompt.shape[1])
        if prompt_mask is None:       # transformers infers the mask from pad tokens in the prompt
            prompt_mask = decoding.infer_prompt_mask(prompt, settings)
        pv, prompt, prompt_mask, question, question_mask = pad_batch(
            (pv, cast(np.asarray(prompt), np.int32), cast(np.asarray(prompt_mask), np.int32), question, question_mask),
            batch, padded)
        args = (params, pv, prompt, prompt_mask, question, question_mask, sampling_key(settings, key),
                traced_numbers(numbers))
        fn = self._program("generate", "_generate_program", args, plan=plan, interpolate=interpolate)
        return result(settings, *fn(*args, plan=plan, interpolate=interpolate), batch=batch)

    def _generate_program(self, params, pv, prompt, prompt_mask, question, question_mask, key, numbers, plan,
                          interpolate):
        """Vision tower (+ question encoder), cross K/V once, then the decoding loop: one XLA program."""
        tc, dt = self.config.text_config, self.dtype
        image, _ = self._apply(params, pv, interpolate, method=lambda m, x, i: m.vision_model(x, i))
        if question is None:
            states, states_mask = image, jnp.ones(image.shape[:2], jnp.int32)
        else:
            states, _, _ = self._apply(params, question, question_mask, image,
                                       method=lambda m, q, qm, img: encode_text(m.text_encoder, q, qm, False,
                                                                                context=img, dtype=dt))
            states_mask = question_mask
        cross_kv = self._apply(params, states, method=lambda m, c: m.text_decoder.cross_kv(c))

        def init_cache(rows, total):
            return init_text_cache(tc, rows, total, dt)

        def step(ids, positions, key_mask, cache, index, context):
            kv, cross_bias = context
            bias = decoder_bias(key_mask, index, ids.shape[1], dt)
            logits, _, cache = self._apply(params, ids, positions, bias, None, cross_bias, kv, cache, index,
                                           method=lambda m, *a: m.text_decoder(*a))
            return logits[:, -1], cache

        return decode(step, init_cache, (cross_kv, cross_attention_bias(states_mask, dt)), prompt, prompt_mask,
                      key, plan, numbers, context_per_input=True)


# -- public classes ------------------------------------------------------------------------------------
class BlipModel(_BlipBase):
    """CLIP-style contrastive model: ``logits_per_image`` (B_img, B_txt) = exp(logit_scale) * cosine."""

    def _module(self):
        return BlipModelModule(self.config)

    def _forward(self, params, pv, ids, mask, position_ids, interpolate, return_loss, output_hidden_states=False,
                 output_attentions=False):
        dt, hs, at = self.dtype, output_hidden_states, output_attentions

        def run(m, pv, ids, mask):
            last, pooled, vh, va = _vision(m, pv, interpolate, hs, at)
            h, tpooled, _, th, ta, _ = encode_text(m.text_model, ids, mask, False, position_ids=position_ids, dtype=dt,
                                                   full=True)
            image_embeds = m.visual_projection(pooled)
            text_embeds = m.text_projection(tpooled)
            image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
            text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
            logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(m.logit_scale).astype(dt)
            loss = (_contrastive(logits_per_text) + _contrastive(logits_per_text.T)) / 2.0 if return_loss else None
            return dict(loss=loss, logits_per_text=logits_per_text, text_embeds=text_embeds, image_embeds=image_embeds,
                        vision=(last, pooled, vh, va), text=(h, tpooled, th if hs else None, ta if at else None))
        return self._apply(params, pv, ids, mask, method=run)

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                 return_loss=None, interpolate_pos_encoding: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        positions = self._positions(position_ids, ids.shape)
        fn = self._jit("forward", "_forward", ("interpolate", "return_loss") + _FLAGS)
        o = fn(self._params(params), pv, ids, mask, positions, interpolate=bool(interpolate_pos_encoding),
               return_loss=bool(return_loss), output_hidden_states=bool(output_hidden_states),
               output_attentions=bool(output_attentions))
        out = BlipOutput(loss=o["loss"], logits_per_image=o["logits_per_text"].T, logits_per_text=o["logits_per_text"],
                       text_embeds=o["text_embeds"], image_embeds=o["image_embeds"],
                       text_model_output=BaseModelOutputWithPoolingAndCrossAttentions(
                           last_hidden_state=o["text"][0], pooler_output=o["text"][1], hidden_states=o["text"][2],
                           attentions=o["text"][3]),
                       vision_model_output=BaseModelOutputWithPooling(
                           last_hidden_state=o["vision"][0], pooler_output=o["vision"][1],
                           hidden_states=o["vision"][2], attentions=o["vision"][3]))
        return out if return_dict else out.to_tuple()

    def _features(self, params, pv, ids, mask, position_ids, interpolate, which):
        dt = self.dtype

        def run(m, pv, ids, mask):
            if which == "image":
                return m.visual_projection(m.vision_model(pv, interpolate)[1])
            context = None
            if which == "multimodal":
                context = m.vision_model(pv, interpolate)[0]
            return m.text_projection(encode_text(m.text_model, ids, mask, False, context=context,
                                                 position_ids=position_ids, dtype=dt)[1])
        return self._apply(params, pv, ids, mask, method=run)

    def _feature_call(self, which, pixel_values, input_ids, attention_mask, interpolate, params, position_ids=None):
        pv = self._pixels(pixel_values, interpolate) if which != "text" else None
        ids, mask = self._text(input_ids, attention_mask) if which != "image" else (None, None)
        positions = self._positions(position_ids, ids.shape) if ids is not None else None
        fn = self._jit("features", "_features", ("interpolate", "which"))
        return fn(self._params(params), pv, ids, mask, positions, interpolate=bool(interpolate), which=which)

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, params=None):
        """Projected text pooler output (B, projection_dim)."""
        return self._feature_call("text", None, input_ids, attention_mask, False, params, position_ids)

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding: bool = False, params=None):
        """Projected vision pooler output (B, projection_dim)."""
        return self._feature_call("image", pixel_values, None, None, interpolate_pos_encoding, params)

    def get_multimodal_features(self, input_ids=None, pixel_values=None, attention_mask=None,
                                interpolate_pos_encoding: bool = False, params=None):
        """Projected pooler output of the text encoded with cross-attention to the image."""
        return self._feature_call("multimodal", pixel_values, input_ids, attention_mask, interpolate_pos_encoding,
                                  params)

    def stages(self, **inputs) -> dict:
        o = self(**inputs)
        out = {"vision": o.vision_model_output.last_hidden_state, "vision_pooled": o.vision_model_output.pooler_output,
               "text": o.text_model_output.last_hidden_state, "image_embeds": o.image_embeds,
               "text_embeds": o.text_embeds, "logits_per_image": o.logits_per_image}
        if o.loss is not None:
            out["loss"] = o.loss
        return out


class BlipForConditionalGeneration(_BlipBase):
    """Image captioning: vision tower + causal text decoder cross-attending the image."""

    def _module(self):
        return CaptioningModule(self.config)

    def _forward(self, params, pv, ids, mask, labels, interpolate, output_hidden_states=False,
                 output_attentions=False):
        dt, smoothing = self.dtype, self.config.text_config.label_smoothing

        def run(m, pv, ids, mask, labels):
            image, _, vh, va = _vision(m, pv, interpolate, output_hidden_states, output_attentions)
            logits, h, _ = encode_text(m.text_decoder, ids, mask, True, context=image, dtype=dt)
            loss = lm_loss(logits, labels, smoothing) if labels is not None else None
            return dict(loss=loss, logits=logits, image_embeds=image, lm_hidden=h, hidden_states=vh, attentions=va)
        return self._apply(params, pv, ids, mask, labels, method=run)

    def _run(self, pixel_values, input_ids, attention_mask, labels, interpolate_pos_encoding, params,
             output_hidden_states=False, output_attentions=False):
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        self._check_batch(pv, ids)
        if labels is not None:
            labels = _labels(labels, ids.shape, self.config.text_config.vocab_size)
        fn = self._jit("forward", "_forward", ("interpolate",) + _FLAGS)
        return fn(self._params(params), pv, ids, mask, labels, interpolate=bool(interpolate_pos_encoding),
                  output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions))

    def __call__(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                 interpolate_pos_encoding: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        """``hidden_states`` / ``attentions`` are the vision tower's, as in transformers."""
        o = self._run(pixel_values, input_ids, attention_mask, labels, interpolate_pos_encoding, params,
                      output_hidden_states, output_attentions)
        image = o["image_embeds"]
        out = BlipForConditionalGenerationModelOutput(loss=o["loss"], logits=o["logits"], image_embeds=image,
                                                    last_hidden_state=image, hidden_states=o["hidden_states"],
                                                    attentions=o["attentions"])
        return out if return_dict else out.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
               interpolate_pos_encoding: bool = False, params=None) -> dict:
        o = self._run(pixel_values, input_ids, attention_mask, labels, interpolate_pos_encoding, params)
        out = {"vision": o["image_embeds"], "lm_hidden": o["lm_hidden"], "logits": o["logits"]}
        if o["loss"] is not None:
            out["loss"] = o["loss"]
        return out

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, interpolate_pos_encoding: bool = False,
                 **generate_kwargs):
        """Caption ids (B * num_return_sequences, L) starting with bos and including the prompt.

        Options as transformers' generate (max_new_tokens / max_length, min_new_tokens / min_length, num_beams,
        do_sample, temperature, top_k, top_p, repetition_penalty, length_penalty, early_stopping,
        num_return_sequences, eos_token_id, pad_token_id), plus ``seed`` or ``prng_key`` for sampling and
        ``params`` to decode with other weights. One compiled program per shape and structure.
        """
        tc = self.config.text_config
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        if input_ids is not None:
            input_ids = np.asarray(token_ids(input_ids if np.ndim(input_ids) == 2 else np.asarray(input_ids)[None],
                                             "input_ids", tc.vocab_size))
        ids, mask = blip_caption_prompt(input_ids, attention_mask, pv.shape[0], tc.bos_token_id, tc.eos_token_id)
        return self._generate(pv, ids, mask, None, None, bool(interpolate_pos_encoding), generate_kwargs)


class BlipForImageTextRetrieval(_BlipBase):
    """Image-text matching: ``itm_score`` (B, 2) with the ITM head, else cosine similarity (B_img, B_txt)."""

    def _module(self):
        return RetrievalModule(self.config)

    def _forward(self, params, pv, ids, mask, interpolate, use_itm_head, output_hidden_states=False,
                 output_attentions=False):
        dt = self.dtype

        def run(m, pv, ids, mask):
            image, _, vh, va = _vision(m, pv, interpolate, output_hidden_states, output_attentions)
            if use_itm_head:
                h, _, _ = encode_text(m.text_encoder, ids, mask, False, context=image, dtype=dt)
                return dict(itm_score=m.itm_head(h[:, 0]), vision=image, text=h, hidden_states=vh, attentions=va)
            h, _, _ = encode_text(m.text_encoder, ids, mask, False, dtype=dt)
            image_feat = _normalize(m.vision_proj(image[:, 0]))
            text_feat = _normalize(m.text_proj(h[:, 0]))
            return dict(itm_score=image_feat @ text_feat.T, vision=image, text=h, image_embeds=image_feat,
                        text_embeds=text_feat, hidden_states=vh, attentions=va)
        return self._apply(params, pv, ids, mask, method=run)

    def _run(self, input_ids, pixel_values, use_itm_head, attention_mask, interpolate_pos_encoding, params,
             output_hidden_states=False, output_attentions=False):
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        if use_itm_head:
            self._check_batch(pv, ids)
        fn = self._jit("forward", "_forward", ("interpolate", "use_itm_head") + _FLAGS)
        return fn(self._params(params), pv, ids, mask, interpolate=bool(interpolate_pos_encoding),
                  use_itm_head=bool(use_itm_head), output_hidden_states=bool(output_hidden_states),
                  output_attentions=bool(output_attentions))

    def __call__(self, input_ids=None, pixel_values=None, use_itm_head: bool = True, attention_mask=None,
                 interpolate_pos_encoding: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        """``hidden_states`` / ``attentions`` are the vision tower's, as in transformers."""
        o = self._run(input_ids, pixel_values, use_itm_head, attention_mask, interpolate_pos_encoding, params,
                      output_hidden_states, output_attentions)
        out = BlipImageTextMatchingModelOutput(itm_score=o["itm_score"], last_hidden_state=o["vision"],
                                             hidden_states=o["hidden_states"], attentions=o["attentions"],
                                             question_embeds=o["text"])
        return out if return_dict else out.to_tuple()

    def stages(self, input_ids=None, pixel_values=None, use_itm_head=True, attention_mask=None,
               interpolate_pos_encoding=False, params=None) -> dict:
        o = self._run(input_ids, pixel_values, use_itm_head, attention_mask, interpolate_pos_encoding, params)
        out = {"vision": o["vision"], "text": o["text"], "itm_score": o["itm_score"]}
        if not use_itm_head:
            out.update(image_embeds=o["image_embeds"], text_embeds=o["text_embeds"])
        return out


class BlipForQuestionAnswering(_BlipBase):
    """VQA: question encoder cross-attending the image; answer decoder cross-attending the question."""

    def _module(self):
        return QuestionAnsweringModule(self.config)

    def _forward(self, params, pv, ids, mask, dec_ids, dec_mask, labels, interpolate, output_hidden_states=False,
                 output_attentions=False):
        dt, smoothing = self.dtype, self.config.text_config.label_smoothing

        def run(m, pv, ids, mask, dec_ids, dec_mask, labels):
            image, _, vh, va = _vision(m, pv, interpolate, output_hidden_states, output_attentions)
            q, _, _ = encode_text(m.text_encoder, ids, mask, False, context=image, dtype=dt)
            logits, h, _ = encode_text(m.text_decoder, dec_ids, dec_mask, True, context=q, context_mask=mask, dtype=dt)
            loss = lm_loss(logits, labels, smoothing) if labels is not None else None
            return dict(loss=loss, logits=logits, image_embeds=image, question=q, lm_hidden=h, hidden_states=vh,
                        attentions=va)
        return self._apply(params, pv, ids, mask, dec_ids, dec_mask, labels, method=run)

    def _run(self, input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask, labels,
             interpolate_pos_encoding, params, output_hidden_states=False, output_attentions=False):
        if labels is None and decoder_input_ids is None:
            raise ValueError("BlipForQuestionAnswering needs labels (training) or decoder_input_ids (inference); "
                             "use generate() to answer questions")
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        self._check_batch(pv, ids)
        if decoder_input_ids is None:   # transformers feeds the labels themselves to the decoder (no shift)
            dec_ids, dec_mask = self._text(labels, decoder_attention_mask, "labels (used as decoder_input_ids)")
        else:
            dec_ids, dec_mask = self._text(decoder_input_ids, decoder_attention_mask, "decoder_input_ids")
        if labels is not None:
            labels = _labels(labels, dec_ids.shape, self.config.text_config.vocab_size)
        fn = self._jit("forward", "_forward", ("interpolate",) + _FLAGS)
        return fn(self._params(params), pv, ids, mask, dec_ids, dec_mask, labels,
                  interpolate=bool(interpolate_pos_encoding), output_hidden_states=bool(output_hidden_states),
                  output_attentions=bool(output_attentions))

    def __call__(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
                 attention_mask=None, labels=None, interpolate_pos_encoding: bool = False,
                 output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                 params=None):
        """``hidden_states`` / ``attentions`` are the vision tower's, as in transformers."""
        o = self._run(input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask, labels,
                      interpolate_pos_encoding, params, output_hidden_states, output_attentions)
        out = BlipTextVisionModelOutput(loss=o["loss"], image_embeds=o["image_embeds"],
                                      last_hidden_state=o["image_embeds"], hidden_states=o["hidden_states"],
                                      attentions=o["attentions"])
        return out if return_dict else out.to_tuple()

    def stages(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
               attention_mask=None, labels=None, interpolate_pos_encoding=False, params=None) -> dict:
        o = self._run(input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask, labels,
                      interpolate_pos_encoding, params)
        out = {"vision": o["image_embeds"], "text": o["question"], "lm_hidden": o["lm_hidden"], "logits": o["logits"]}
        if o["loss"] is not None:
            out["loss"] = o["loss"]
        return out

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, interpolate_pos_encoding: bool = False,
                 **generate_kwargs):
        """Answer ids (B * num_return_sequences, L) starting with bos; options as the captioning generate.

        The decoder cross-attends the question states under the question's attention mask (transformers
        passes all ones, which makes answers depend on the padding of a batch)."""
        pv = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        self._check_batch(pv, ids)
        bos = np.full((ids.shape[0], 1), self.config.text_config.bos_token_id, np.int64)
        return self._generate(pv, bos, np.ones_like(bos), ids, mask, bool(interpolate_pos_encoding), generate_kwargs)


def _labels(labels, shape, vocab_size):
    """Integer labels of the decoder-input shape: token ids, or -100 for ignored positions."""
    labels = np.asarray(labels) if not isinstance(labels, jax.Array) else labels
    if np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the decoder input shape {tuple(shape)}")
    if is_concrete(labels):
        check_label_ids(np.asarray(labels), vocab_size)
    return cast(labels, np.int32)
