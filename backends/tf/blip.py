"""BLIP task models in TensorFlow: contrastive, captioning, retrieval and question answering.

Each class mirrors the transformers 4.57 class of the same name (arguments, output fields,
``generate`` conventions); parameters live in ``model.params`` under the weight table's tf paths.

Example::

    model = BlipForConditionalGeneration.from_pretrained("hf_dir")
    ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=20)   # tf.int64 (B, L)
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from blip_core import decoding
from blip_core.generation import blip_caption_prompt, resolve_blip_generation
from blip_core.numerics import NORM_EPS
from blip_core.outputs import (BlipOutput, BlipForConditionalGenerationModelOutput, BlipImageTextMatchingModelOutput,
                               BlipTextVisionModelOutput)

from ._base import BlipTFModel, Dense, Recorder, padding_bias, as_float, as_ids, as_mask, as_positions, cross_entropy, flag, same_dim
from .generation import bucketed_inputs, compiled, decode, pad_batch, result
from .text import TextLMHeadModel, TextTower, check_length, run_text, text_output
from .vision import VisionTower, vision_output


def _normalize(x):
    """L2 normalisation by the spec layer's rule (``blip_core.numerics.NORM_EPS``)."""
    return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), NORM_EPS)


def _np_ids(x):
    if x is None:
        return None
    return x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else np.asarray(x)


class _BlipBase(BlipTFModel):
    """Input preparation shared by the composite models."""

    def _recorder(self, output_hidden_states, output_attentions):
        """A fresh ``Recorder`` (None on the default path) for one tower of this forward."""
        return Recorder.make(flag(output_hidden_states, self.config, "output_hidden_states"),
                             flag(output_attentions, self.config, "output_attentions"))

    def _vision_extras(self, rec):
        """The ``hidden_states`` / ``attentions`` fields task outputs copy from the vision tower."""
        if rec is None:
            return {}
        return {"hidden_states": Recorder.tup(rec.hidden), "attentions": Recorder.tup(rec.attn)}

    def _pixels(self, pixel_values, interpolate_pos_encoding):
        px = as_float(pixel_values, self.dtype, "pixel_values")
        self.vision_model.check(px, interpolate_pos_encoding)
        return px

    def _text(self, input_ids, attention_mask, batch=None, name="input_ids", required=True):
        tc = self.config.text_config
        if input_ids is None:
            if required:
                raise ValueError(f"{name} is required")
            return None, None
        ids = as_ids(input_ids, tc.vocab_size, name)
        check_length(ids, tc, name)
        if batch is not None and not same_dim(ids.shape[0], batch):
            raise ValueError(f"{name} has batch {ids.shape[0]} but pixel_values has batch {batch}")
        return ids, as_mask(attention_mask, tuple(ids.shape), "attention_mask" if name == "input_ids"
                            else name.replace("input_ids", "attention_mask"))


class BlipModel(_BlipBase):
    """Image-text contrastive model: ``logits_per_image`` (B_img, B_txt) = exp(logit_scale) * cosine."""

    architecture = "BlipModel"

    def _build(self):
        c = self.config
        self.vision_model = VisionTower(self.params, "vision_model", c.vision_config)
        self.text_model = TextTower(self.params, "text_model", c.text_config, pooler=True)
        self.visual_projection = Dense(self.params, "visual_projection", bias=False)
        self.text_projection = Dense(self.params, "text_projection", bias=False)
        self.logit_scale = self.params["logit_scale"]

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding: bool = False):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        return self.visual_projection(self.vision_model(px, interpolate_pos_encoding)[1])

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        ids, mask = self._text(input_ids, attention_mask)
        pos = None if position_ids is None else as_positions(position_ids, self.config.text_config.max_position_embeddings)
        return self.text_projection(run_text(self.text_model, ids, mask, None, None, False, pos)[1])

    def get_multimodal_features(self, input_ids=None, pixel_values=None, attention_mask=None,
                                interpolate_pos_encoding: bool = False):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask, px.shape[0])
        img = self.vision_model(px, interpolate_pos_encoding)[0]
        return self.text_projection(run_text(self.text_model, ids, mask, img, None, False)[1])

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                return_loss=None, interpolate_pos_encoding: bool = False, output_attentions=False,
                output_hidden_states=False, return_dict: bool = True):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask)
        pos = None if position_ids is None else as_positions(position_ids, self.config.text_config.max_position_embeddings)
        v_rec = self._recorder(output_hidden_states, output_attentions)
        t_rec = self._recorder(output_hidden_states, output_attentions)
        v_last, v_pooled = self.vision_model(px, interpolate_pos_encoding, v_rec)
        t_last, t_pooled = run_text(self.text_model, ids, mask, None, None, False, pos, rec=t_rec)
        image_embeds = _normalize(self.visual_projection(v_pooled))
        text_embeds = _normalize(self.text_projection(t_pooled))
        logits_per_text = tf.matmul(text_embeds, image_embeds, transpose_b=True) * tf.exp(self.logit_scale)
        logits_per_image = tf.transpose(logits_per_text)
        loss = None
        if return_loss:
            if not same_dim(ids.shape[0], px.shape[0]):
                raise ValueError("return_loss needs as many texts as images (matching pairs)")
            target = tf.range(ids.shape[0])
            loss = (cross_entropy(logits_per_text, target) + cross_entropy(logits_per_image, target)) / 2.0
        out = BlipOutput(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                         text_embeds=text_embeds, image_embeds=image_embeds,
                         text_model_output=text_output(t_last, t_pooled, t_rec),
                         vision_model_output=vision_output(v_last, v_pooled, v_rec))
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs):
        out = self.forward(**inputs)
        st = {"vision": out.vision_model_output.last_hidden_state,
              "vision_pooled": out.vision_model_output.pooler_output,
              "text": out.text_model_output.last_hidden_state, "image_embeds": out.image_embeds,
              "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image}
        if out.loss is not None:
            st["loss"] = out.loss
        return st


class BlipForConditionalGeneration(_BlipBase):
    """Captioning: the text decoder cross-attends the vision ``last_hidden_state``.

    ``model(pixel_values, input_ids, labels=ids)`` -> ``logits`` (B, L, V) and the shifted LM ``loss``;
    ``model.generate(pixel_values, input_ids=prompt)`` -> ids starting with bos, prompt included.
    """

    architecture = "BlipForConditionalGeneration"

    def _build(self):
        c = self.config
        self.vision_model = VisionTower(self.params, "vision_model", c.vision_config)
        self.text_decoder = TextLMHeadModel(self.params, "text_decoder", c.text_config)

    def _run(self, pixel_values, input_ids, attention_mask, labels, interpolate_pos_encoding, rec=None):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask, px.shape[0])
        lab = None
        if labels is not None:
            lab = as_ids(labels, self.config.text_config.vocab_size, "labels", allow_ignore=True)
            if not lab.shape.is_compatible_with(ids.shape):
                raise ValueError(f"labels shape {tuple(lab.shape)} differs from input_ids shape {tuple(ids.shape)}")
        img, _ = self.vision_model(px, interpolate_pos_encoding, rec)
        logits, hidden, loss = self.text_decoder(ids, mask, img, None, lab)
        return img, hidden, logits, loss

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                interpolate_pos_encoding: bool = False, output_attentions=False, output_hidden_states=False,
                return_dict: bool = True):
        # transformers returns the vision tower's hidden states / attentions here (not the decoder's)
        rec = self._recorder(output_hidden_states, output_attentions)
        img, _, logits, loss = self._run(pixel_values, input_ids, attention_mask, labels, interpolate_pos_encoding,
                                         rec)
        out = BlipForConditionalGenerationModelOutput(loss=loss, logits=logits, image_embeds=img,
                                                      last_hidden_state=img, **self._vision_extras(rec))
        return out if return_dict else out.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
               interpolate_pos_encoding: bool = False):
        img, hidden, logits, loss = self._run(pixel_values, input_ids, attention_mask, labels,
                                              interpolate_pos_encoding)
        st = {"vision": img, "lm_hidden": hidden, "logits": logits}
        if loss is not None:
            st["loss"] = loss
        return st

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, interpolate_pos_encoding: bool = False,
                 **generate_kwargs):
        tc = self.config.text_config
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids = _np_ids(input_ids)
        if ids is not None:
            as_ids(ids, tc.vocab_size)   # validates dtype, rank and range
        prompt, pmask = blip_caption_prompt(ids, _np_ids(attention_mask), px.shape[0], tc.bos_token_id,
                                            tc.sep_token_id)
        s = resolve_blip_generation(tc, prompt.shape[1], **generate_kwargs)

        def encode(pixels):
            return self.vision_model(pixels, interpolate_pos_encoding)[0], None

        return _run_generate(self, ("caption", interpolate_pos_encoding), encode, (px,), prompt, pmask, s)


class BlipForImageTextRetrieval(_BlipBase):
    """Image-text matching: ``itm_score`` (B, 2) from the ITM head, or cosine (B_img, B_txt) without it."""

    architecture = "BlipForImageTextRetrieval"

    def _build(self):
        c = self.config
        self.vision_model = VisionTower(self.params, "vision_model", c.vision_config)
        self.text_encoder = TextTower(self.params, "text_encoder", c.text_config, pooler=False)
        self.vision_proj = Dense(self.params, "vision_proj")
        self.text_proj = Dense(self.params, "text_proj")
        self.itm_head = Dense(self.params, "itm_head")

    def forward(self, input_ids=None, pixel_values=None, use_itm_head: bool = True, attention_mask=None,
                interpolate_pos_encoding: bool = False, output_attentions=False, output_hidden_states=False,
                return_dict: bool = True):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask, px.shape[0] if use_itm_head else None)
        rec = self._recorder(output_hidden_states, output_attentions)   # vision tower only, as transformers
        img, _ = self.vision_model(px, interpolate_pos_encoding, rec)
        if use_itm_head:
            text, _ = run_text(self.text_encoder, ids, mask, img, None, False)
            score = self.itm_head(text[:, 0])
        else:
            text, _ = run_text(self.text_encoder, ids, mask, None, None, False)
            image_feat = _normalize(self.vision_proj(img[:, 0]))
            text_feat = _normalize(self.text_proj(text[:, 0]))
            score = tf.matmul(image_feat, text_feat, transpose_b=True)
        out = BlipImageTextMatchingModelOutput(itm_score=score, last_hidden_state=img, question_embeds=text,
                                               **self._vision_extras(rec))
        return out if return_dict else out.to_tuple()

    def stages(self, **inputs):
        out = self.forward(**inputs)
        return {"vision": out.last_hidden_state, "text": out.question_embeds, "itm_score": out.itm_score}


class BlipForQuestionAnswering(_BlipBase):
    """VQA: question encoder over the image, answer decoder over the question states.

    Training: ``labels`` double as ``decoder_input_ids`` (no extra shift) and the loss is the
    decoder's shifted mean LM loss. The decoder's cross-attention masks question padding (the
    question ``attention_mask``), which transformers 4.57 PyTorch silently skips.
    """

    architecture = "BlipForQuestionAnswering"

    def _build(self):
        c = self.config
        self.vision_model = VisionTower(self.params, "vision_model", c.vision_config)
        self.text_encoder = TextTower(self.params, "text_encoder", c.text_config, pooler=False)
        self.text_decoder = TextLMHeadModel(self.params, "text_decoder", c.text_config)

    def _question(self, px, ids, mask, interpolate_pos_encoding, rec=None):
        img, _ = self.vision_model(px, interpolate_pos_encoding, rec)
        return img, run_text(self.text_encoder, ids, mask, img, None, False)[0]

    def _run(self, input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask, labels,
             interpolate_pos_encoding, rec=None):
        if labels is None and decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids (inference) or labels (training) to BlipForQuestionAnswering; "
                             "use generate() to answer a question")
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask, px.shape[0])
        vocab = self.config.text_config.vocab_size
        lab = as_ids(labels, vocab, "labels", allow_ignore=True) if labels is not None else None
        if decoder_input_ids is None:
            if hasattr(lab, "numpy") and (lab.numpy() < 0).any():
                raise ValueError("labels with -100 cannot double as decoder_input_ids; pass decoder_input_ids too")
            dec = lab
        else:
            dec = as_ids(decoder_input_ids, vocab, "decoder_input_ids")
        if not same_dim(dec.shape[0], ids.shape[0]):
            raise ValueError(f"decoder_input_ids batch {dec.shape[0]} differs from input_ids batch {ids.shape[0]}")
        dec_mask = as_mask(decoder_attention_mask, tuple(dec.shape), "decoder_attention_mask")
        img, question = self._question(px, ids, mask, interpolate_pos_encoding, rec)
        logits, hidden, loss = self.text_decoder(dec, dec_mask, question, mask, lab)
        return img, question, hidden, logits, loss

    def forward(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
                attention_mask=None, labels=None, interpolate_pos_encoding: bool = False, output_attentions=False,
                output_hidden_states=False, return_dict: bool = True):
        rec = self._recorder(output_hidden_states, output_attentions)   # vision tower only, as transformers
        img, _, _, _, loss = self._run(input_ids, pixel_values, decoder_input_ids, decoder_attention_mask,
                                       attention_mask, labels, interpolate_pos_encoding, rec)
        out = BlipTextVisionModelOutput(loss=loss, image_embeds=img, last_hidden_state=img,
                                        **self._vision_extras(rec))
        return out if return_dict else out.to_tuple()

    def stages(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
               attention_mask=None, labels=None, interpolate_pos_encoding: bool = False):
        img, question, hidden, logits, loss = self._run(input_ids, pixel_values, decoder_input_ids,
                                                        decoder_attention_mask, attention_mask, labels,
                                                        interpolate_pos_encoding)
        st = {"vision": img, "text": question, "lm_hidden": hidden, "logits": logits}
        if loss is not None:
            st["loss"] = loss
        return st

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, interpolate_pos_encoding: bool = False,
                 **generate_kwargs):
        tc = self.config.text_config
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        ids, mask = self._text(input_ids, attention_mask, px.shape[0])
        if mask is None:
            mask = tf.ones(ids.shape, tf.float32)
        prompt = np.full((px.shape[0], 1), tc.bos_token_id, np.int64)
        s = resolve_blip_generation(tc, 1, **generate_kwargs)

        def encode(pixels, q_ids, q_mask):
            return self._question(pixels, q_ids, q_mask, interpolate_pos_encoding)[1], q_mask

        return _run_generate(self, ("vqa", interpolate_pos_encoding), encode, (px, ids, mask), prompt, None, s)


def _run_generate(model, tag, encode, encode_inputs, prompt: np.ndarray, prompt_mask, settings):
    """Validate, pick or compile the program (encoder + cross keys/values + decoding), run, trim.

    ``encode(*encode_inputs)`` returns the cross-attended states and their mask (or None); it runs
    inside the same compiled function as the search.
    """
    tc = model.config.text_config
    if prompt_mask is None:
        prompt_mask = decoding.infer_prompt_mask(prompt, settings)
    batch = int(encode_inputs[0].shape[0])
    plan, numbers, seed, padded = bucketed_inputs(settings, tc.vocab_size, batch,
                                                  tc.max_position_embeddings + 1 - prompt.shape[1])
    encode_inputs, prompt, prompt_mask = pad_batch((encode_inputs, prompt, np.asarray(prompt_mask)), batch, padded)
    lm = model.text_decoder

    def program(inputs, prompt_ids, prompt_mask, seed, numbers):
        states, mask = encode(*inputs)
        context = (lm.bert.cross_kv(states), None if mask is None else padding_bias(mask))
        return decode(lm.decode_step, context, prompt_ids, prompt_mask, seed, plan, numbers, context_per_input=True)

    shapes = tuple(tuple(x.shape) if x is not None else None for x in encode_inputs) + (prompt.shape,)
    fn = compiled(model, (tag, plan), program, shapes)
    out = fn(encode_inputs, tf.constant(prompt, tf.int32), tf.constant(np.asarray(prompt_mask), tf.int32), seed,
             numbers)
    return result(settings, *out, batch=batch)
