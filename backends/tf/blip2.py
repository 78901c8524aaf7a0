"""BLIP-2 in TensorFlow: vision tower -> Q-Former over learned queries -> OPT or T5 language model.

Classes (transformers 4.57 names, arguments and outputs): ``Blip2VisionModel``, ``Blip2QFormerModel``
(from ``qformer.py``), ``Blip2Model``, ``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``,
``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``.

Image-query fusion follows ``blip_core.blip2``: with ``config.image_token_index`` the projected
queries replace the Q placeholder embeddings (rows without exactly Q placeholders raise
``ValueError``); without it the queries are concatenated in front of the text embeddings. The
backend runs in float32 or bfloat16 (in bfloat16 the whole model is bfloat16, as transformers 4.57
keeps float32 parts for float16 only). Generation (``generate``, and the ``init_cache`` / ``step``
contract of the decoding engine) lives in ``blip2_generation.py``; the SavedModel captioner in
``blip2_export.py``.

Example::

    model = Blip2ForConditionalGeneration.from_pretrained("dir")
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)   # logits, loss
    ids = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, num_beams=3)
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from blip_core import blip2 as rules
from blip_core.outputs import (Blip2ForConditionalGenerationModelOutput, Blip2ImageTextMatchingModelOutput,
                               Blip2TextModelOutput, Blip2VisionModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput)

from . import blip2_generation as gen
from ._base import (BlipTFModel, Dense, Recorder, _symbolic, as_float, as_ids, as_mask, as_positions, cross_entropy,
                    flag)
from .blip import _normalize as normalize   # the spec layer's L2 rule, as BLIP's heads use it
from .opt import OPTForCausalLM
from .qformer import Blip2QFormerModel, QFormerTextEmbeddings, QFormerTower, qformer_output
from .t5 import T5ForConditionalGeneration
from .vision import BlipVisionModel, VisionTower, vision_output

__all__ = ["Blip2VisionModel", "Blip2QFormerModel", "Blip2Model", "Blip2ForConditionalGeneration",
           "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"]


class Blip2VisionModel(BlipVisionModel):
    """The BLIP-2 ViT (``Blip2VisionConfig``: q/v ``qkv`` bias, eps 1e-6)."""

    architecture = "Blip2VisionModel"


def _numpy(x):
    return x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else np.asarray(x)


class _Blip2Base(BlipTFModel):
    """Shared plumbing: the vision tower, the query tokens, the Q-Former over the image."""

    def _front(self, vision: bool = True):
        c = self.config
        if vision:
            self.vision_model = VisionTower(self.params, "vision_model", c.vision_config)
        self.query_tokens = self.params["query_tokens"]
        self.qformer = QFormerTower(self.params, "qformer", c.qformer_config)

    def _recorder(self, output_hidden_states, output_attentions):
        return Recorder.make(flag(output_hidden_states, self.config, "output_hidden_states"),
                             flag(output_attentions, self.config, "output_attentions"))

    def _pixels(self, pixel_values, interpolate_pos_encoding):
        px = as_float(pixel_values, self.dtype, "pixel_values")
        self.vision_model.check(px, interpolate_pos_encoding)
        return px

    def _queries(self, batch):
        return tf.broadcast_to(self.query_tokens, [batch] + self.query_tokens.shape[1:].as_list())

    def _image_queries(self, px, interpolate_pos_encoding=False, v_rec=None, q_rec=None):
        """pixels -> ((vision last, pooled), Q-Former last hidden state over the query tokens)."""
        last, pooled = self.vision_model(px, interpolate_pos_encoding, v_rec)
        return (last, pooled), self.qformer(self._queries(tf.shape(last)[0]), image=last, rec=q_rec)

    def _ids(self, input_ids, vocab, name="input_ids"):
        ids = as_ids(input_ids, vocab, name)
        if ids is None:
            raise ValueError(f"{name} is required")
        return ids


class _Blip2WithLanguageModel(_Blip2Base):
    """Blip2Model / Blip2ForConditionalGeneration: queries -> ``language_projection`` -> OPT or T5."""

    def _build(self):
        self._front()
        self.language_projection = Dense(self.params, "language_projection")
        tc = self.config.text_config
        lm = OPTForCausalLM if self.is_decoder_only else T5ForConditionalGeneration
        self.language_model = lm(self.params, "language_model", tc)

    @property
    def is_decoder_only(self) -> bool:
        return rules.is_decoder_only(self.config)

    def _language_inputs(self, px, interpolate_pos_encoding=False, v_rec=None, q_rec=None):
        (last, pooled), query = self._image_queries(px, interpolate_pos_encoding, v_rec, q_rec)
        return self.language_projection(query), (last, pooled), query

    def image_slots(self, input_ids):
        """Validated (B, L) bool placeholder mask (None on the concatenation path).

        Numpy / eager ids are checked before any compute (``blip_core.blip2.image_slots``); graph
        ids (a caller's ``tf.function``) get the same check as a graph assertion.
        """
        cfg = self.config
        if not rules.uses_placeholders(cfg):
            return None
        if not _symbolic(input_ids):
            return rules.image_slots(_numpy(input_ids), cfg)
        slots = tf.equal(tf.cast(input_ids, tf.int32), cfg.image_token_index)
        counts = tf.reduce_sum(tf.cast(slots, tf.int32), axis=1)
        check = tf.debugging.assert_equal(counts, cfg.num_query_tokens, message=(
            f"every row of input_ids must hold exactly num_query_tokens={cfg.num_query_tokens} image placeholder "
            f"tokens {cfg.image_token_index} (config.image_token_index is set)"))
        with tf.control_dependencies([check]):
            return tf.identity(slots)

    def _fuse(self, lm_inputs, input_ids, attention_mask, inputs_embeds=None):
        """Place the projected queries into the text embeddings; returns (embeds, mask float32)."""
        cfg = self.config
        lm = self.language_model
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids (or inputs_embeds) is required")
        ids = None if input_ids is None else self._ids(input_ids, cfg.text_config.vocab_size)
        embeds = lm.embed(ids) if ids is not None else as_float(inputs_embeds, self.dtype, "inputs_embeds")
        b, n = embeds.shape[0], embeds.shape[1]
        if b != lm_inputs.shape[0]:
            raise ValueError(f"the text batch ({b}) and the image batch ({lm_inputs.shape[0]}) differ")
        mask = as_mask(attention_mask, (b, n))
        mask = tf.ones([b, n], tf.float32) if mask is None else mask
        if not rules.uses_placeholders(cfg):
            q = cfg.num_query_tokens
            return (tf.concat([tf.cast(lm_inputs, embeds.dtype), embeds], 1),
                    tf.concat([tf.ones([b, q], tf.float32), mask], 1))
        if ids is not None:
            slots = self.image_slots(ids)
        else:
            ref = tf.cast(lm.embed(cfg.image_token_index), embeds.dtype)
            slots = tf.reduce_all(tf.equal(embeds, ref), axis=-1).numpy()
            rules.check_image_slots(slots.sum(1), cfg)
        return gen.fuse_queries(lm_inputs, embeds, slots), mask

    def _run_language_model(self, embeds, mask, decoder_input_ids=None, decoder_attention_mask=None, labels=None,
                            rec=None, enc_rec=None, loss_convention: str = "transformers"):
        """-> (language-model output, loss, logits) as transformers' Blip2ForConditionalGeneration."""
        rules.check_loss_convention(loss_convention)     # T5's loss is the same under both
        lm = self.language_model
        tc = self.config.text_config
        if self.is_decoder_only:
            h, _ = lm.run(embeds, mask, rec=rec)
            full = lm.logits(h)
            logits, loss = full, None
            if labels is not None:
                lab = as_ids(labels, tc.vocab_size, "labels", allow_ignore=True)
                # only the text positions carry labels: align on the right, then shift by one
                window, ignored = rules.loss_window(full.shape[1], lab.shape[1], loss_convention)
                scored = tf.pad(lab, [[0, 0], [ignored, 0]], constant_values=-100) if ignored else lab
                loss = cross_entropy(full[:, -window:][:, :-1], scored[:, 1:])
                logits = full[:, -lab.shape[1]:]
            out = CausalLMOutputWithPast(logits=full, hidden_states=_hidden(rec),
                                         attentions=None if rec is None else Recorder.tup(rec.attn))
            return out, loss, logits
        dec_ids = as_ids(decoder_input_ids, tc.vocab_size, "decoder_input_ids")
        lab = as_ids(labels, tc.vocab_size, "labels", allow_ignore=True)
        if dec_ids is None and lab is None:
            raise ValueError("a T5 language model needs decoder_input_ids or labels")
        if dec_ids is None:
            rules.label_shift_ids(self.config)           # the ids it embeds lie in the vocabulary
            dec_ids = lm.shift_right(lab)
        dec_mask = as_mask(decoder_attention_mask, tuple(dec_ids.shape), "decoder_attention_mask")
        if dec_mask is None:
            dec_mask = tf.ones(tf.shape(dec_ids), tf.float32)
        enc, _ = lm.encoder(embeds, mask, rec=enc_rec)
        h, _ = lm.decoder(lm.embed(dec_ids), dec_mask, lm.decoder.cross_kv(enc), mask, rec=rec)
        logits = lm.logits(h)
        loss = None if lab is None else cross_entropy(logits, lab)
        out = Seq2SeqLMOutput(loss=loss, logits=logits, decoder_hidden_states=_hidden(rec),
                              decoder_attentions=None if rec is None else Recorder.tup(rec.attn),
                              cross_attentions=None if rec is None else Recorder.tup(rec.cross),
                              encoder_last_hidden_state=enc, encoder_hidden_states=_hidden(enc_rec),
                              encoder_attentions=None if enc_rec is None else Recorder.tup(enc_rec.attn))
        return out, loss, logits

    def forward(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, inputs_embeds=None, labels=None, interpolate_pos_encoding: bool = False,
                output_attentions=False, output_hidden_states=False, return_dict: bool = True,
                loss_convention: str = "transformers"):
        """``loss_convention``: "transformers" (default) or "lavis" (LAVIS's OPT captioning loss also
        scores the first text token from the last query position; see ``blip_core.blip2.loss_window``)."""
        rules.check_loss_convention(loss_convention)
        # one recorder per tower: vision, Q-Former, language model (decoder), T5 encoder
        v_rec, q_rec, lm_rec, enc_rec = (self._recorder(output_hidden_states, output_attentions) for _ in range(4))
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        lm_inputs, (last, pooled), query = self._language_inputs(px, interpolate_pos_encoding, v_rec, q_rec)
        embeds, mask = self._fuse(lm_inputs, input_ids, attention_mask, inputs_embeds)
        out, loss, logits = self._run_language_model(embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                                                     lm_rec, enc_rec, loss_convention)
        result = Blip2ForConditionalGenerationModelOutput(
            loss=loss, logits=logits, vision_outputs=vision_output(last, pooled, v_rec),
            qformer_outputs=qformer_output(query, q_rec), language_model_outputs=out)
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, labels=None, interpolate_pos_encoding: bool = False, **_):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        lm_inputs, (last, pooled), query = self._language_inputs(px, interpolate_pos_encoding)
        embeds, mask = self._fuse(lm_inputs, input_ids, attention_mask)
        rec = Recorder(hidden_states=True)
        _, loss, logits = self._run_language_model(embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                                                   rec)
        st = {"vision": last, "vision_pooled": pooled, "qformer": query, "projection": lm_inputs,
              "lm_hidden": rec.hidden[-1], "logits": logits}
        if loss is not None:
            st["loss"] = loss
        return st


def _hidden(rec):
    """The hidden states a ``Recorder`` collected (None when they were not asked for)."""
    return None if rec is None or rec.hidden is None else tuple(rec.hidden)


class Blip2Model(_Blip2WithLanguageModel):
    """Vision + Q-Former + language model, with feature getters for each part."""

    architecture = "Blip2Model"

    def forward(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, interpolate_pos_encoding: bool = False, inputs_embeds=None,
                output_attentions=False, output_hidden_states=False, return_dict: bool = True,
                loss_convention: str = "transformers"):
        """As ``Blip2ForConditionalGeneration``; ``inputs_embeds`` comes after transformers' parameters, which
        have no ``inputs_embeds`` here, so that positional calls mean what they mean there."""
        return super().forward(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                               inputs_embeds=inputs_embeds, labels=labels,
                               interpolate_pos_encoding=interpolate_pos_encoding,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, loss_convention=loss_convention)

    def get_text_features(self, input_ids, attention_mask=None, decoder_input_ids=None,
                          decoder_attention_mask=None, labels=None, legacy_output: bool = True):
        """Language model on text alone: its output object, or its logits with ``legacy_output=False``."""
        ids = self._ids(input_ids, self.config.text_config.vocab_size)
        mask = as_mask(attention_mask, tuple(ids.shape))
        mask = tf.ones(tf.shape(ids), tf.float32) if mask is None else mask
        out = self._run_language_model(self.language_model.embed(ids), mask, decoder_input_ids,
                                       decoder_attention_mask, labels)[0]
        return out if legacy_output else out.logits

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                           legacy_output: bool = True):
        """Vision tower outputs, or its ``pooler_output`` with ``legacy_output=False``."""
        last, pooled = self.vision_model(self._pixels(pixel_values, interpolate_pos_encoding), interpolate_pos_encoding)
        return vision_output(last, pooled) if legacy_output else pooled

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                             legacy_output: bool = True):
        """Q-Former outputs over the image, or their ``last_hidden_state`` with ``legacy_output=False``."""
        _, query = self._image_queries(self._pixels(pixel_values, interpolate_pos_encoding), interpolate_pos_encoding)
        return qformer_output(query) if legacy_output else query


class Blip2ForConditionalGeneration(_Blip2WithLanguageModel):
    """Image (+ prompt) -> text. ``forward`` gives logits (and the loss with ``labels``).

    ``generate`` runs the backend's XLA decoding engine through the model contract (``init_cache``,
    ``step``, ``generation_context``; see ``blip2_generation.py``): OPT continues from the fused
    prompt embeddings, T5 decodes from ``decoder_start_token_id`` over encoder states computed once.
    """

    architecture = "Blip2ForConditionalGeneration"

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                           return_dict: bool = False):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        lm_inputs, (last, pooled), query = self._language_inputs(px, interpolate_pos_encoding)
        if not return_dict:
            return lm_inputs
        return lm_inputs, vision_output(last, pooled), qformer_output(query)

    def init_cache(self, rows, total_len: int):
        return gen.init_cache(self, rows, total_len)

    def step(self, ids, positions, key_mask, cache, index, context):
        return gen.step(self, ids, positions, key_mask, cache, index, context)

    def generation_context(self, pixel_values, input_ids, attention_mask, slots=None,
                           interpolate_pos_encoding: bool = False):
        return gen.generation_context(self, pixel_values, input_ids, attention_mask, slots, interpolate_pos_encoding)

    def generate(self, pixel_values, input_ids=None, attention_mask=None, inputs_embeds=None,
                 interpolate_pos_encoding: bool = False, **generate_kwargs):
        """ids as transformers 4.57 (int64): OPT the given ids + new tokens (the new tokens alone for a
        prompt given as ``inputs_embeds`` only), T5 the decoder ids.

        Without ``input_ids`` the prompt is ``blip_core.blip2.default_prompt`` (placeholders, OPT's bos).
        """
        return gen.generate(self, pixel_values, input_ids, attention_mask, inputs_embeds, interpolate_pos_encoding,
                            **generate_kwargs)


class Blip2ForImageTextRetrieval(_Blip2Base):
    """ITC (default): max over queries of cosine(query, text [CLS]); ITM: 2-way head averaged over queries."""

    architecture = "Blip2ForImageTextRetrieval"

    def _build(self):
        self._front()
        self.embeddings = QFormerTextEmbeddings(self.params, self.config.qformer_config)
        self.vision_projection = Dense(self.params, "vision_projection")
        self.text_projection = Dense(self.params, "text_projection")
        self.itm_head = Dense(self.params, "itm_head")

    def _strip_placeholders(self, input_ids):
        """-> (ids as given, ids without the Q placeholders Blip2Processor prepends, stripped?).

        The Q-Former's queries take the placeholders' place. Graph ids (a caller's ``tf.function``)
        get ``blip_core.blip2.strip_placeholders``'s check as a graph assertion.
        """
        cfg = self.config
        vocab = cfg.qformer_config.vocab_size
        if not _symbolic(input_ids):
            raw = _numpy(input_ids)
            raw = raw[None] if raw.ndim == 1 else raw
            kept, stripped = rules.strip_placeholders(raw, cfg)
            return raw, self._ids(kept, vocab), stripped
        raw = as_ids(input_ids, vocab)   # graph ids: dtype and rank checks (values are checked when they run)
        if not rules.uses_placeholders(cfg):
            return raw, raw, False
        q = cfg.num_query_tokens
        check = tf.debugging.assert_equal(raw[:, :q], tf.constant(cfg.image_token_index, raw.dtype), message=(
            f"config.image_token_index={cfg.image_token_index} is set, so input_ids must start with "
            f"num_query_tokens={q} placeholder ids (as Blip2Processor makes them)"))
        with tf.control_dependencies([check]):
            return raw, tf.identity(raw[:, q:]), True

    def forward(self, pixel_values, input_ids, attention_mask=None,
                use_image_text_matching_head: bool = False, output_attentions=False, output_hidden_states=False,
                return_dict: bool = True):
        cfg = self.config
        raw, ids, stripped = self._strip_placeholders(input_ids)
        mask = as_mask(attention_mask, raw.shape)
        q = cfg.num_query_tokens
        px = self._pixels(pixel_values, False)
        v_rec, t_rec = (self._recorder(output_hidden_states, output_attentions) for _ in range(2))
        if use_image_text_matching_head:
            last, pooled = self.vision_model(px, False, v_rec)
            if mask is None:
                mask = tf.ones(tf.shape(raw if stripped else ids), tf.float32)
            if not stripped:   # the queries attend and are attended: extend the mask over them
                mask = tf.concat([tf.ones([tf.shape(ids)[0], q], tf.float32), mask], 1)
            emb = self.embeddings(ids, query_embeds=self._queries(tf.shape(ids)[0]))
            text = self.qformer(emb, q, mask, last, rec=t_rec)
            logits_per_image = tf.reduce_mean(self.itm_head(text[:, :q]), axis=1)
            text_embeds, image_embeds = text, last
        else:
            (last, pooled), query = self._image_queries(px, False, v_rec)
            if stripped and mask is not None:
                mask = mask[:, q:]
            text = self.qformer(self.embeddings(ids), 0, mask, rec=t_rec)
            image_embeds = normalize(self.vision_projection(query))
            text_embeds = normalize(self.text_projection(text[:, 0]))
            # (B_img, Q, B_txt) similarities, best query per pair
            logits_per_image = tf.reduce_max(tf.einsum("iqe,te->iqt", image_embeds, text_embeds), axis=1)
        result = Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits_per_image, logits_per_text=tf.transpose(logits_per_image),
            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=qformer_output(text, t_rec),
            vision_model_output=vision_output(last, pooled, v_rec))
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, use_image_text_matching_head=False, **_):
        out = self.forward(pixel_values, input_ids, attention_mask, use_image_text_matching_head)
        return rules.retrieval_stages(out, use_image_text_matching_head)


class Blip2TextModelWithProjection(_Blip2Base):
    """Q-Former text encoder -> normalised ``text_projection`` of every token (B, L, E)."""

    architecture = "Blip2TextModelWithProjection"

    def _build(self):
        self._front(vision=False)
        self.embeddings = QFormerTextEmbeddings(self.params, self.config.qformer_config)
        self.text_projection = Dense(self.params, "text_projection")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, output_attentions=False,
                output_hidden_states=False, return_dict: bool = True):
        ids = self._ids(input_ids, self.config.qformer_config.vocab_size)
        mask = as_mask(attention_mask, tuple(ids.shape))
        pos = None if position_ids is None else as_positions(position_ids)
        rec = self._recorder(output_hidden_states, output_attentions)
        text = self.qformer(self.embeddings(ids, position_ids=pos), 0, mask, rec=rec)
        result = Blip2TextModelOutput(text_embeds=normalize(self.text_projection(text)), last_hidden_state=text,
                                      hidden_states=_hidden(rec),
                                      attentions=None if rec is None else Recorder.tup(rec.attn))
        return result if return_dict else result.to_tuple()

    def stages(self, input_ids=None, attention_mask=None, **_):
        out = self.forward(input_ids, attention_mask)
        return {"text": out.last_hidden_state, "text_embeds": out.text_embeds}


class Blip2VisionModelWithProjection(_Blip2Base):
    """Vision + Q-Former -> normalised ``vision_projection`` of every query (B, Q, E)."""

    architecture = "Blip2VisionModelWithProjection"

    def _build(self):
        self._front()
        self.vision_projection = Dense(self.params, "vision_projection")

    def _run(self, pixel_values, interpolate_pos_encoding, v_rec=None):
        px = self._pixels(pixel_values, interpolate_pos_encoding)
        (last, pooled), query = self._image_queries(px, interpolate_pos_encoding, v_rec)
        return last, pooled, query, normalize(self.vision_projection(query))

    def forward(self, pixel_values=None, output_attentions=False, output_hidden_states=False, return_dict: bool = True,
                interpolate_pos_encoding: bool = False):
        v_rec = self._recorder(output_hidden_states, output_attentions)
        last, _, _, embeds = self._run(pixel_values, interpolate_pos_encoding, v_rec)
        v = vision_output(last, None, v_rec)
        result = Blip2VisionModelOutput(image_embeds=embeds, last_hidden_state=last, hidden_states=v.hidden_states,
                                        attentions=v.attentions)
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values=None, interpolate_pos_encoding: bool = False, **_):
        last, _, query, embeds = self._run(pixel_values, interpolate_pos_encoding)
        return {"vision": last, "qformer": query, "image_embeds": embeds}
