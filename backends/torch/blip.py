"""The BLIP task models: ``BlipModel``, ``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
``BlipForQuestionAnswering`` (the towers ``BlipVisionModel`` / ``BlipTextModel`` live in vision.py / text.py).

Arguments, outputs and ``generate`` conventions follow transformers 4.57; parameter names are
the Hugging Face keys. Example::

    model = BlipForConditionalGeneration.from_pretrained("blip-image-captioning-base")
    ids = model.generate(pixel_values, max_new_tokens=20, num_beams=3)   # (B, L) int64, starts with bos
    out = model(pixel_values, input_ids=ids, labels=ids)                 # out.loss, out.logits (B, L, V)

One deliberate difference: cross-attention masks are applied (transformers 4.57 drops them). For
VQA this means padding in the question is ignored by the answer decoder in ``forward`` and
``generate``; transformers' ``generate`` attends the padded question positions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blip_core.generation import blip_caption_prompt, resolve_blip_generation
from blip_core.numerics import NORM_EPS, to_numpy
from blip_core.outputs import (BlipForConditionalGenerationModelOutput, BlipImageTextMatchingModelOutput, BlipOutput,
                               BlipTextVisionModelOutput)

from . import generation
from ._base import PreTrainedModel, as_tensor
from .text import BlipTextLMHeadModel, BlipTextTransformer, check_ids
from .vision import BlipVisionTransformer
from .layout import Linear


def _tuple(out, return_dict):
    return out if return_dict or return_dict is None else out.to_tuple()


class _BlipBase(PreTrainedModel):
    """Shared: a ``vision_model`` tower and the generation defaults of the text config."""

    def _image(self, pixel_values, interpolate_pos_encoding=False, output_attentions=False,
               output_hidden_states=False):
        return self.vision_model(pixel_values, output_attentions=output_attentions,
                                 output_hidden_states=output_hidden_states,
                                 interpolate_pos_encoding=interpolate_pos_encoding)

    @staticmethod
    def _check_batch(pixel_values, ids, name="input_ids"):
        # (a pixel_values of the wrong rank is reported by the vision tower's own check)
        if ids is not None and len(np.shape(pixel_values)) == 4 and np.shape(pixel_values)[0] != ids.shape[0]:
            raise ValueError(f"{name} has batch {ids.shape[0]} but pixel_values has batch {np.shape(pixel_values)[0]}")

    def _device_ids(self, ids, name="input_ids"):
        """Token ids as a long tensor on the model's device, checked before any tower runs."""
        if ids is None:
            return None
        ids = as_tensor(ids, name, kind="int", device=self.device, ndim=2)
        # labels may hold -100 (ignored positions); any other id must lie in the vocabulary
        check_ids(ids[ids != -100] if name == "labels" else ids, self.config.text_config.vocab_size, name)
        return ids

    def _text_inputs(self, pixel_values, ids, mask=None, labels=None, same_batch=True, name="input_ids"):
        """Validate the token inputs up front (before any tower runs): dtypes, ranges, shapes, batch."""
        ids = self._device_ids(ids, name)
        if ids is None:
            return None, None, None
        if mask is not None:
            mask_name = "attention_mask" if name == "input_ids" else "decoder_attention_mask"
            mask = as_tensor(mask, mask_name, kind="mask", device=self.device, ndim=(2, 3))
            if mask.shape[0] != ids.shape[0] or mask.shape[-1] != ids.shape[1]:
                raise ValueError(f"{mask_name} shape {tuple(mask.shape)} does not match {name} shape "
                                 f"{tuple(ids.shape)}")
        if labels is not None:
            labels = self._device_ids(labels, "labels")
            if labels.shape != ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match {name} shape {tuple(ids.shape)}")
        if same_batch:
            self._check_batch(pixel_values, ids, name)
        return ids, mask, labels


class BlipModel(_BlipBase):
    """Contrastive BLIP: ``text_model`` (with pooler) and ``vision_model``, projections, ``logit_scale``.

    ``forward(input_ids, pixel_values, attention_mask, return_loss=...)`` -> ``BlipOutput`` with
    ``logits_per_image`` (B_img, B_txt) = exp(logit_scale) * cosine.
    """

    architecture = "BlipModel"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        tc, vc = config.text_config, config.vision_config
        self.text_model = BlipTextTransformer(tc, add_pooling_layer=True)
        self.vision_model = BlipVisionTransformer(vc)
        self.visual_projection = Linear(vc.hidden_size, config.projection_dim, bias=False)
        self.text_projection = Linear(tc.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init(seed, dtype)

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        out = self.text_model(input_ids, attention_mask, position_ids)
        return self.text_projection(out.pooler_output)

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False):
        return self.visual_projection(self._image(pixel_values, interpolate_pos_encoding).pooler_output)

    def get_multimodal_features(self, input_ids=None, pixel_values=None, attention_mask=None,
                                interpolate_pos_encoding=False):
        image = self._image(pixel_values, interpolate_pos_encoding).last_hidden_state
        out = self.text_model(input_ids, attention_mask, encoder_hidden_states=image)
        return self.text_projection(out.pooler_output)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False, output_attentions=False, output_hidden_states=False,
                return_dict=True):
        input_ids, attention_mask, _ = self._text_inputs(pixel_values, input_ids, attention_mask, same_batch=False)
        vision = self._image(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        text = self.text_model(input_ids, attention_mask, position_ids, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states)
        image_embeds = F.normalize(self.visual_projection(vision.pooler_output), dim=-1, eps=NORM_EPS)
        text_embeds = F.normalize(self.text_projection(text.pooler_output), dim=-1, eps=NORM_EPS)
        # transformers divides by the norm (no epsilon); F.normalize's eps only matters for zero vectors.
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        loss = None
        if return_loss:
            target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.t(), target)) / 2.0
        out = BlipOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                         text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text,
                         vision_model_output=vision)
        return _tuple(out, return_dict)

    def stages(self, input_ids, pixel_values, attention_mask=None, **kw):
        out = self.forward(input_ids, pixel_values, attention_mask, **kw)
        return {"vision": out.vision_model_output.last_hidden_state,
                "vision_pooled": out.vision_model_output.pooler_output,
                "text": out.text_model_output.last_hidden_state, "image_embeds": out.image_embeds,
                "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image}


class BlipForConditionalGeneration(_BlipBase):
    """Captioning: ``vision_model`` + ``text_decoder`` (causal, cross-attending the image).

    ``forward(pixel_values, input_ids, attention_mask, labels)`` ->
    ``BlipForConditionalGenerationModelOutput`` (``logits`` (B, L, V), ``loss`` with labels);
    ``generate(pixel_values, input_ids=None, ...)`` -> ids starting with bos, prompt included.
    """

    architecture = "BlipForConditionalGeneration"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self.vision_model = BlipVisionTransformer(config.vision_config)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.post_init(seed, dtype)

    def tie_weights(self):
        self.text_decoder.tie_weights()

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                interpolate_pos_encoding=False, output_attentions=False, output_hidden_states=False,
                return_dict=True):
        if input_ids is None:
            raise ValueError("input_ids (the caption tokens, starting with bos) is required; use generate() to caption")
        input_ids, attention_mask, labels = self._text_inputs(pixel_values, input_ids, attention_mask, labels)
        vision = self._image(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        dec = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=vision.last_hidden_state,
                                labels=labels, output_attentions=output_attentions,
                                output_hidden_states=output_hidden_states, reduction="mean")
        out = BlipForConditionalGenerationModelOutput(
            loss=dec.loss, logits=dec.logits, image_embeds=vision.last_hidden_state,
            last_hidden_state=vision.last_hidden_state, hidden_states=vision.hidden_states,
            attentions=vision.attentions)
        return _tuple(out, return_dict)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, interpolate_pos_encoding=False,
                 **generate_kwargs):
        generator = generate_kwargs.pop("generator", None)   # torch-only: a torch.Generator for sampling
        # Every input and option is checked before the image tower runs.
        pixel_values = self.vision_model.check_pixel_values(pixel_values, interpolate_pos_encoding)
        tc = self.config.text_config
        ids = None if input_ids is None else to_numpy(self._device_ids(input_ids))
        mask = None if attention_mask is None else np.asarray(to_numpy(as_tensor(attention_mask, "attention_mask",
                                                                                  kind="mask", ndim=2)))
        ids, mask = blip_caption_prompt(ids, mask, pixel_values.shape[0], tc.bos_token_id, tc.eos_token_id)
        settings = resolve_blip_generation(self.config.text_config, ids.shape[1], **generate_kwargs)
        image = self._image(pixel_values, interpolate_pos_encoding).last_hidden_state
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = None if mask is None else torch.from_numpy(mask).to(self.device)
        return generation.generate(self.text_decoder.decode_step, ids_t, settings, vocab_size=tc.vocab_size,
                                   attention_mask=mask_t, context=(image, None), generator=generator)

    def stages(self, pixel_values, input_ids, attention_mask=None, labels=None, **kw):
        vision = self._image(pixel_values, kw.get("interpolate_pos_encoding", False))
        dec = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=vision.last_hidden_state,
                                labels=labels, output_hidden_states=True)
        st = {"vision": vision.last_hidden_state, "lm_hidden": dec.hidden_states[-1], "logits": dec.logits}
        if dec.loss is not None:
            st["loss"] = dec.loss
        return st


class BlipForImageTextRetrieval(_BlipBase):
    """Image-text matching: ITM head over the image-grounded text encoder, or ITC cosine similarity.

    ``forward(input_ids, pixel_values, use_itm_head=True)`` -> ``itm_score`` (B, 2) logits; with
    ``use_itm_head=False`` the cosine similarity (B_img, B_txt) of the normalised projections.
    """

    architecture = "BlipForImageTextRetrieval"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        tc, vc = config.text_config, config.vision_config
        self.vision_model = BlipVisionTransformer(vc)
        self.text_encoder = BlipTextTransformer(tc, add_pooling_layer=False)
        self.vision_proj = Linear(vc.hidden_size, config.image_text_hidden_size)
        self.text_proj = Linear(tc.hidden_size, config.image_text_hidden_size)
        self.itm_head = Linear(tc.hidden_size, 2)
        self.post_init(seed, dtype)

    def forward(self, input_ids=None, pixel_values=None, use_itm_head=True, attention_mask=None,
                interpolate_pos_encoding=False, output_attentions=False, output_hidden_states=False,
                return_dict=True):
        input_ids, attention_mask, _ = self._text_inputs(pixel_values, input_ids, attention_mask,
                                                         same_batch=bool(use_itm_head))
        vision = self._image(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        image = vision.last_hidden_state
        if use_itm_head:
            text = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image).last_hidden_state
            score = self.itm_head(text[:, 0])
        else:
            text = self.text_encoder(input_ids, attention_mask).last_hidden_state
            image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1, eps=NORM_EPS)
            text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1, eps=NORM_EPS)
            score = image_feat @ text_feat.t()
        out = BlipImageTextMatchingModelOutput(itm_score=score, last_hidden_state=image,
                                               hidden_states=vision.hidden_states, attentions=vision.attentions,
                                               question_embeds=text)
        return _tuple(out, return_dict)

    def stages(self, input_ids, pixel_values, attention_mask=None, use_itm_head=True, **kw):
        out = self.forward(input_ids, pixel_values, use_itm_head, attention_mask, **kw)
        return {"vision": out.last_hidden_state, "text": out.question_embeds, "itm_score": out.itm_score}


class BlipForQuestionAnswering(_BlipBase):
    """VQA: image -> ``text_encoder`` over the question (cross-attending the image) -> ``text_decoder``.

    ``forward(input_ids, pixel_values, labels=...)`` -> ``BlipTextVisionModelOutput`` with the
    answer loss (labels double as decoder inputs, no extra shift); ``generate(input_ids,
    pixel_values)`` -> answer ids starting with bos.
    """

    architecture = "BlipForQuestionAnswering"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self.vision_model = BlipVisionTransformer(config.vision_config)
        self.text_encoder = BlipTextTransformer(config.text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.post_init(seed, dtype)

    def tie_weights(self):
        self.text_decoder.tie_weights()

    def _question(self, input_ids, pixel_values, attention_mask, interpolate_pos_encoding, output_attentions=False,
                  output_hidden_states=False):
        if input_ids is None:
            raise ValueError("input_ids (the tokenized question) is required")
        input_ids, attention_mask, _ = self._text_inputs(pixel_values, input_ids, attention_mask)
        vision = self._image(pixel_values, interpolate_pos_encoding, output_attentions, output_hidden_states)
        question = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=vision.last_hidden_state)
        return vision, question.last_hidden_state

    def _answer(self, question, attention_mask, decoder_input_ids, decoder_attention_mask, labels, **kw):
        if decoder_input_ids is None:
            decoder_input_ids = labels      # labels are already shifted right (starts with bos)
        return self.text_decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden_states=question,
                                 encoder_attention_mask=attention_mask, labels=labels, reduction="mean", **kw)

    def forward(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
                attention_mask=None, labels=None, interpolate_pos_encoding=False, output_attentions=False,
                output_hidden_states=False, return_dict=True):
        if labels is None and decoder_input_ids is None:
            raise ValueError("BlipForQuestionAnswering.forward needs labels (training) or decoder_input_ids; "
                             "use generate() to answer")
        self._text_inputs(pixel_values, input_ids, attention_mask)
        if decoder_input_ids is not None:
            decoder_input_ids, decoder_attention_mask, labels = self._text_inputs(
                pixel_values, decoder_input_ids, decoder_attention_mask, labels, name="decoder_input_ids")
        else:     # labels double as the decoder inputs, so they must be valid token ids
            labels, decoder_attention_mask, _ = self._text_inputs(pixel_values, labels, decoder_attention_mask,
                                                                  name="labels (decoder inputs)")
        vision, question = self._question(input_ids, pixel_values, attention_mask, interpolate_pos_encoding,
                                          output_attentions, output_hidden_states)
        dec = self._answer(question, attention_mask, decoder_input_ids, decoder_attention_mask, labels)
        out = BlipTextVisionModelOutput(loss=None if dec.loss is None else dec.loss.mean(),
                                        image_embeds=vision.last_hidden_state,
                                        last_hidden_state=vision.last_hidden_state,
                                        hidden_states=vision.hidden_states, attentions=vision.attentions)
        return _tuple(out, return_dict)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, interpolate_pos_encoding=False,
                 **generate_kwargs):
        generator = generate_kwargs.pop("generator", None)   # torch-only: a torch.Generator for sampling
        settings = resolve_blip_generation(self.config.text_config, 1, **generate_kwargs)
        _, question = self._question(input_ids, pixel_values, attention_mask, interpolate_pos_encoding)
        b = question.shape[0]
        q_mask = None
        if attention_mask is not None:
            q_mask = as_tensor(attention_mask, "attention_mask", kind="mask", device=self.device, ndim=2)
        tc = self.config.text_config
        bos = torch.full((b, 1), tc.bos_token_id, dtype=torch.long, device=self.device)
        return generation.generate(self.text_decoder.decode_step, bos, settings, vocab_size=tc.vocab_size,
                                   context=(question, q_mask), generator=generator)

    def stages(self, input_ids, pixel_values, attention_mask=None, decoder_input_ids=None, labels=None, **kw):
        if decoder_input_ids is None and labels is None:   # score the first answer token by default
            decoder_input_ids = torch.full((np.shape(input_ids)[0], 1), self.config.text_config.bos_token_id)
        vision, question = self._question(input_ids, pixel_values, attention_mask,
                                          kw.get("interpolate_pos_encoding", False))
        dec = self._answer(question, attention_mask, decoder_input_ids, None, labels, output_hidden_states=True)
        st = {"vision": vision.last_hidden_state, "text": question, "lm_hidden": dec.hidden_states[-1],
              "logits": dec.logits}
        if dec.loss is not None:
            st["loss"] = dec.loss
        return st
