"""BLIP-2 in PyTorch: vision tower -> Q-Former over learned queries -> OPT or T5 language model.

Classes (transformers 4.57 names, arguments and outputs): ``Blip2VisionModel``, ``Blip2QFormerModel``
(from ``qformer.py``), ``Blip2Model``, ``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``,
``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``.

Image-query fusion: with ``config.image_token_index`` set, the projected queries replace the
embeddings of the Q placeholder tokens that ``Blip2Processor`` puts in ``input_ids`` (ids without
exactly Q placeholders per row raise ``ValueError``; transformers silently ignores the image).
Without it (older configs), the queries are concatenated in front of the text embeddings.

Half precision follows transformers' ``_keep_in_fp32_modules``: in float16 the Q-Former and the
query tokens stay float32 (transformers 4.57 applies that rule to float16 only; in bfloat16 the
whole model is bfloat16). Activations are cast at each boundary, so no dtype mismatch arises.

>>> model = Blip2ForConditionalGeneration.from_pretrained("dir", dtype="bfloat16")
>>> ids = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=20)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from blip_core import blip2 as rules
from blip_core import decoding
from blip_core.configs import OPTConfig
from blip_core.generation import check_label_ids, check_token_ids
from blip_core.numerics import NORM_EPS
from blip_core.outputs import (Blip2ForConditionalGenerationModelOutput, Blip2ImageTextMatchingModelOutput,
                               Blip2TextModelOutput, Blip2VisionModelOutput)

from . import generation as engine
from ._base import PreTrainedModel, as_tensor, resolve_dtype
from .opt import OPTForCausalLM, causal_lm_loss
from .qformer import Blip2QFormerModel, Blip2TextEmbeddings
from .t5 import T5ForConditionalGeneration
from .vision import BlipVisionModel, BlipVisionTransformer
from .layout import Linear, prepare_decoding

__all__ = ["Blip2VisionModel", "Blip2QFormerModel", "Blip2Model", "Blip2ForConditionalGeneration",
           "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"]


class Blip2VisionModel(BlipVisionModel):
    """The BLIP-2 ViT (``Blip2VisionConfig``: q/v ``qkv`` bias, eps 1e-6)."""

    architecture = "Blip2VisionModel"


def _ids(x, name: str, vocab_size: int, device) -> Optional[torch.Tensor]:
    t = as_tensor(x, name, kind="int", device=device, ndim=2)
    if t is not None:
        check_token_ids(t.cpu().numpy(), vocab_size, name)
    return t


def _mask(x, name: str, shape, device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    t = as_tensor(x, name, kind="mask", device=device, ndim=2).long()
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids shape {tuple(shape)}")
    return t


class _Blip2PreTrained(PreTrainedModel):
    """Shared plumbing: float16 keep-in-float32 rule, the image -> queries path."""

    _keep_in_fp32_modules = rules.KEEP_FLOAT32_MODULES

    def post_init(self, seed=0, dtype=None) -> None:
        super().post_init(seed, None)
        self._set_dtype(resolve_dtype(dtype))

    def _set_dtype(self, dtype) -> None:
        if dtype is not None:
            super()._set_dtype(dtype)

    @classmethod
    def _float32_modules(cls, dtype) -> tuple:
        # from_pretrained reads these as float32 straight from the file: they never pass through float16
        return cls._keep_in_fp32_modules if rules.keeps_float32(str(dtype).replace("torch.", "")) else ()

    def _build_front(self, config, vision: bool = True) -> None:
        if vision:
            self.vision_model = BlipVisionTransformer(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))

    def _image_queries(self, pixel_values, interpolate_pos_encoding=False, output_attentions=False,
                       output_hidden_states=False):
        """pixels -> (vision outputs, Q-Former outputs over the query tokens)."""
        vision = self.vision_model(pixel_values, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states,
                                   interpolate_pos_encoding=interpolate_pos_encoding)
        image = vision.last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        qformer = self.qformer(query_embeds=queries, encoder_hidden_states=image,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return vision, qformer


class _Blip2WithLanguageModel(_Blip2PreTrained):
    """Blip2Model / Blip2ForConditionalGeneration: queries -> ``language_projection`` -> OPT or T5."""

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self._build_front(config)
        self.qformer = Blip2QFormerModel(config.qformer_config, seed=None)
        self.language_projection = Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        tc = config.text_config
        self.language_model = OPTForCausalLM(tc) if isinstance(tc, OPTConfig) else T5ForConditionalGeneration(tc)
        self.post_init(seed, dtype)

    @property
    def is_decoder_only(self) -> bool:
        return rules.is_decoder_only(self.config)

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def _language_inputs(self, pixel_values, interpolate_pos_encoding=False, output_attentions=False,
                         output_hidden_states=False):
        vision, qformer = self._image_queries(pixel_values, interpolate_pos_encoding, output_attentions,
                                              output_hidden_states)
        # The Q-Former may be float32 inside a float16 model: come back to the tower's dtype.
        query_output = qformer.last_hidden_state.to(vision.last_hidden_state.dtype)
        return self.language_projection(query_output), vision, qformer

    def _fuse(self, lm_inputs, input_ids, attention_mask, inputs_embeds):
        """Place the projected queries into the text embeddings; returns (embeds, mask)."""
        cfg = self.config
        dev = lm_inputs.device
        ids = _ids(input_ids, "input_ids", cfg.text_config.vocab_size, dev)
        if ids is None and inputs_embeds is None:
            raise ValueError("input_ids (or inputs_embeds) is required")
        embeds = self.get_input_embeddings()(ids) if inputs_embeds is None else \
            as_tensor(inputs_embeds, "inputs_embeds", kind="float", device=dev, ndim=3)
        b, n = embeds.shape[:2]
        if b != lm_inputs.shape[0]:
            raise ValueError(f"the text batch ({b}) and the image batch ({lm_inputs.shape[0]}) differ")
        mask = _mask(attention_mask, "attention_mask", (b, n), dev)
        mask = torch.ones(b, n, dtype=torch.long, device=dev) if mask is None else mask
        lm_inputs = lm_inputs.to(embeds.dtype)
        q = cfg.num_query_tokens
        if cfg.image_token_index is None:
            ones = torch.ones(b, q, dtype=mask.dtype, device=dev)
            return torch.cat([lm_inputs, embeds], dim=1), torch.cat([ones, mask], dim=1)
        if ids is not None:
            slots = torch.from_numpy(rules.image_slots(ids.cpu().numpy(), cfg)).to(dev)
        else:
            ref = self.get_input_embeddings().weight[cfg.image_token_index].to(embeds.dtype)
            slots = (embeds == ref).all(-1)
            rules.check_image_slots(slots.sum(1).cpu().numpy(), cfg)
        return embeds.masked_scatter(slots[..., None].expand_as(embeds), lm_inputs), mask

    def _run_language_model(self, embeds, mask, decoder_input_ids, decoder_attention_mask, labels,
                            output_attentions, output_hidden_states, loss_convention="transformers"):
        lm = self.language_model
        tc = self.config.text_config
        if labels is not None:      # checked before the language model runs
            labels = as_tensor(labels, "labels", kind="int", device=embeds.device, ndim=2)
            check_label_ids(labels.cpu().numpy(), tc.vocab_size)
        if self.is_decoder_only:
            out = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states)
            loss, logits = None, out.logits
            if labels is not None:
                labels = as_tensor(labels, "labels", kind="int", device=embeds.device, ndim=2)
                # Only the text positions carry labels: align on the right, then shift by one. As in
                # transformers, the returned logits are then the labelled positions only.
                window, ignored = rules.loss_window(logits.shape[1], labels.shape[1], loss_convention)
                scored = labels if not ignored else F.pad(labels, (ignored, 0), value=-100)
                loss = causal_lm_loss(logits[:, -window:], scored)
                logits = logits[:, -labels.shape[1]:]
            return out, loss, logits
        dec_ids = _ids(decoder_input_ids, "decoder_input_ids", tc.vocab_size, embeds.device)
        dec_mask = None if decoder_attention_mask is None else \
            as_tensor(decoder_attention_mask, "decoder_attention_mask", kind="mask", device=embeds.device, ndim=2)
        rules.check_loss_convention(loss_convention)     # T5's loss is the same under both
        labels = as_tensor(labels, "labels", kind="int", device=embeds.device, ndim=2)
        if dec_ids is None and labels is None:
            raise ValueError("a T5 language model needs decoder_input_ids or labels")
        if dec_ids is None:
            rules.label_shift_ids(self.config)           # the ids it embeds lie in the vocabulary
        out = lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_ids,
                 decoder_attention_mask=dec_mask, labels=labels, output_attentions=output_attentions,
                 output_hidden_states=output_hidden_states)
        return out, out.loss, out.logits

    def forward(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, inputs_embeds=None, labels=None, interpolate_pos_encoding=False,
                output_attentions=False, output_hidden_states=False, return_dict=True,
                loss_convention: str = "transformers"):
        """``loss_convention``: "transformers" (default) or "lavis" (LAVIS's OPT captioning loss also
        scores the first text token from the last query position; see ``blip_core.blip2.loss_window``)."""
        lm_inputs, vision, qformer = self._language_inputs(pixel_values, interpolate_pos_encoding,
                                                           output_attentions, output_hidden_states)
        embeds, mask = self._fuse(lm_inputs, input_ids, attention_mask, inputs_embeds)
        out, loss, logits = self._run_language_model(embeds, mask, decoder_input_ids, decoder_attention_mask,
                                                     labels, output_attentions, output_hidden_states,
                                                     loss_convention)
        result = Blip2ForConditionalGenerationModelOutput(loss=loss, logits=logits, vision_outputs=vision,
                                                          qformer_outputs=qformer, language_model_outputs=out)
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, labels=None, interpolate_pos_encoding=False, **_):
        lm_inputs, vision, qformer = self._language_inputs(pixel_values, interpolate_pos_encoding)
        embeds, mask = self._fuse(lm_inputs, input_ids, attention_mask, None)
        out, loss, logits = self._run_language_model(embeds, mask, decoder_input_ids, decoder_attention_mask,
                                                     labels, False, True)
        hidden = out.hidden_states if self.is_decoder_only else out.decoder_hidden_states
        st = {"vision": vision.last_hidden_state, "vision_pooled": vision.pooler_output,
              "qformer": qformer.last_hidden_state, "projection": lm_inputs, "lm_hidden": hidden[-1],
              "logits": logits}
        if loss is not None:
            st["loss"] = loss
        return st


class Blip2Model(_Blip2WithLanguageModel):
    """Vision + Q-Former + language model, with feature getters for each part."""

    architecture = "Blip2Model"

    def forward(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, interpolate_pos_encoding=False, inputs_embeds=None,
                output_attentions=False, output_hidden_states=False, return_dict=True,
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
        dev = self.device
        tc = self.config.text_config
        ids = _ids(input_ids, "input_ids", tc.vocab_size, dev)
        mask = _mask(attention_mask, "attention_mask", ids.shape, dev)
        if self.is_decoder_only:
            out = self.language_model(input_ids=ids, attention_mask=mask)
        else:
            out = self._run_language_model(self.get_input_embeddings()(ids), mask, decoder_input_ids,
                                           decoder_attention_mask, labels, False, False)[0]
        return out if legacy_output else out.logits

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False, legacy_output: bool = True):
        """Vision tower outputs, or its ``pooler_output`` with ``legacy_output=False``."""
        out = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return out if legacy_output else out.pooler_output

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                             legacy_output: bool = True):
        """Q-Former outputs over the image, or their ``last_hidden_state`` with ``legacy_output=False``."""
        _, qformer = self._image_queries(pixel_values, interpolate_pos_encoding)
        return qformer if legacy_output else qformer.last_hidden_state


def _prepare_decoding(lm, rows: int) -> None:
    """On a generation's first step: later steps feed one token per row, so the parts of the language model a
    step runs get the decoding layouts for ``rows`` rows (``layout.prepare_decoding``)."""
    for part in lm.decoding_parts():
        prepare_decoding(part, rows)


class Blip2ForConditionalGeneration(_Blip2WithLanguageModel):
    """Image (+ prompt) -> text. ``forward`` gives logits (and the loss with ``labels``).

    ``generate`` returns, as transformers 4.57: for OPT the given ids (placeholders + bos + prompt)
    followed by the new tokens; for T5 the decoder ids, starting with ``decoder_start_token_id``.
    With the concatenation path (no ``image_token_index``) OPT returns the given ids + new tokens.
    """

    architecture = "Blip2ForConditionalGeneration"

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False, return_dict: bool = False):
        lm_inputs, vision, qformer = self._language_inputs(pixel_values, interpolate_pos_encoding)
        return (lm_inputs, vision, qformer) if return_dict else lm_inputs

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, inputs_embeds=None,
                 interpolate_pos_encoding: bool = False, **generate_kwargs):
        generator = generate_kwargs.pop("generator", None)   # torch-only: a torch.Generator for sampling
        cfg = self.config
        lm_inputs, _, _ = self._language_inputs(pixel_values, interpolate_pos_encoding)
        b, dev = lm_inputs.shape[0], lm_inputs.device
        if input_ids is None and inputs_embeds is None:
            input_ids = torch.from_numpy(rules.default_prompt(cfg, b)).to(dev)
        embeds, full_mask = self._fuse(lm_inputs, input_ids, attention_mask, inputs_embeds)
        if self.is_decoder_only:
            return self._generate_decoder_only(input_ids, embeds, full_mask, generator, generate_kwargs)
        return self._generate_seq2seq(embeds, full_mask, b, generator, generate_kwargs)

    def _settings(self, prompt_length: int, kwargs: dict):
        return rules.generation_settings(self.config, prompt_length, **kwargs)

    def _generate_decoder_only(self, input_ids, embeds, full_mask, generator, kwargs):
        if input_ids is None:      # embeddings only: as transformers, the output holds the new tokens alone
            ids = torch.zeros((embeds.shape[0], 0), dtype=torch.long, device=embeds.device)
        else:
            ids = _ids(input_ids, "input_ids", self.config.text_config.vocab_size, embeds.device)
        prefix = full_mask.shape[1] - ids.shape[1]       # embeddings without ids: the concatenated queries, or all
        settings = self._settings(ids.shape[1], kwargs)
        lm = self.language_model

        def step(step_ids, _positions, key_mask, cache, index, context):
            # Embeddings without ids sit in front of the token buffer: positions come from the whole
            # mask, padded slots at 1 (transformers' rule for generation).
            prompt_embeds, prefix_mask = context
            mask = torch.cat([prefix_mask, key_mask[:, : index + step_ids.shape[1]]], 1)
            positions = decoding.prefill_positions(torch, mask)
            if cache is None:
                _prepare_decoding(lm, step_ids.shape[0])
                out = lm(inputs_embeds=prompt_embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            else:
                out = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions[:, -1:],
                         past_key_values=cache, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        return engine.generate(step, ids, settings, vocab_size=self.config.text_config.vocab_size,
                               attention_mask=full_mask[:, prefix:], context=(embeds, full_mask[:, :prefix]),
                               reorder_cache=lm.reorder_cache, generator=generator)

    def _generate_seq2seq(self, embeds, enc_mask, b, generator, kwargs):
        start_id = rules.decoder_start_token_id(self.config, kwargs.pop("decoder_start_token_id", None))
        settings = self._settings(1, kwargs)
        lm = self.language_model
        enc = lm.encode(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state

        def step(step_ids, _positions, key_mask, cache, index, context):
            states, states_mask = context
            if cache is None:
                _prepare_decoding(lm, step_ids.shape[0])
            dec, _ = lm.decoder(input_ids=step_ids, attention_mask=key_mask[:, : index + step_ids.shape[1]],
                                encoder_hidden_states=states, encoder_attention_mask=states_mask,
                                past_key_values=cache, use_cache=True)
            return lm.decode_logits(dec.last_hidden_state[:, -1]), dec.past_key_values

        start = torch.full((b, 1), int(start_id), dtype=torch.long, device=embeds.device)
        return engine.generate(step, start, settings, vocab_size=self.config.text_config.vocab_size,
                               attention_mask=torch.ones_like(start), context=(enc, enc_mask),
                               reorder_cache=lm.reorder_cache, generator=generator)


class Blip2ForImageTextRetrieval(_Blip2PreTrained):
    """ITC (default): max over queries of cosine(query, text [CLS]); ITM: 2-way head averaged over queries."""

    architecture = "Blip2ForImageTextRetrieval"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self._build_front(config)
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel(config.qformer_config, seed=None)
        h, e = config.qformer_config.hidden_size, config.image_text_hidden_size
        self.vision_projection = Linear(h, e)
        self.text_projection = Linear(h, e)
        self.itm_head = Linear(h, 2)
        self.post_init(seed, dtype)

    def _strip_placeholders(self, ids, mask):
        """Drop the Q placeholders Blip2Processor prepends (the Q-Former's queries take their place)."""
        kept, stripped = rules.strip_placeholders(ids.cpu().numpy(), self.config)
        return (ids[:, ids.shape[1] - kept.shape[1]:] if stripped else ids), mask, stripped

    def forward(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head: bool = False,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True):
        dev = self.device
        vocab = self.config.qformer_config.vocab_size
        raw = as_tensor(input_ids, "input_ids", kind="int", device=dev, ndim=2)
        mask = _mask(attention_mask, "attention_mask", raw.shape, dev)
        ids, mask, stripped = self._strip_placeholders(raw, mask)
        check_token_ids(ids.cpu().numpy(), vocab, "input_ids")
        q = self.config.num_query_tokens
        if use_image_text_matching_head:
            vision = self.vision_model(pixel_values, output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states)
            image = vision.last_hidden_state
            queries = self.query_tokens.expand(image.shape[0], -1, -1)
            if mask is None:
                mask = torch.ones(raw.shape if stripped else ids.shape, dtype=torch.long, device=dev)
            if not stripped:     # the queries attend and are attended: extend the mask over them
                mask = torch.cat([torch.ones(ids.shape[0], q, dtype=mask.dtype, device=dev), mask], dim=1)
            text = self.qformer(query_embeds=self.embeddings(ids, query_embeds=queries), query_length=q,
                                attention_mask=mask, encoder_hidden_states=image,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states)
            states = text.last_hidden_state.to(self.itm_head.weight.dtype)
            logits_per_image = self.itm_head(states[:, :q]).mean(dim=1)
            text_embeds, image_embeds = states, image
        else:
            vision, qformer = self._image_queries(pixel_values, False, output_attentions, output_hidden_states)
            if stripped and mask is not None:
                mask = mask[:, q:]
            text = self.qformer(query_embeds=self.embeddings(ids), query_length=0, attention_mask=mask,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states)
            image_embeds = F.normalize(self.vision_projection(
                qformer.last_hidden_state.to(self.vision_projection.weight.dtype)), dim=-1, eps=NORM_EPS)
            text_embeds = F.normalize(self.text_projection(
                text.last_hidden_state[:, 0].to(self.text_projection.weight.dtype)), dim=-1, eps=NORM_EPS)
            # (B_img, Q, B_txt) similarities, best query per pair
            logits_per_image = torch.matmul(image_embeds, text_embeds.t()).max(dim=1)[0]
        result = Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits_per_image, logits_per_text=logits_per_image.t(), text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=text, vision_model_output=vision)
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False, **_):
        out = self.forward(pixel_values, input_ids, attention_mask, use_image_text_matching_head)
        return rules.retrieval_stages(out, use_image_text_matching_head)


class Blip2TextModelWithProjection(_Blip2PreTrained):
    """Q-Former text encoder -> normalised ``text_projection`` of every token (B, L, E)."""

    architecture = "Blip2TextModelWithProjection"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self._build_front(config, vision=False)
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel(config.qformer_config, seed=None)
        self.text_projection = Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.post_init(seed, dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True):
        dev = self.device
        ids = _ids(input_ids, "input_ids", self.config.qformer_config.vocab_size, dev)
        if ids is None:
            raise ValueError("input_ids is required")
        mask = _mask(attention_mask, "attention_mask", ids.shape, dev)
        pos = as_tensor(position_ids, "position_ids", kind="int", device=dev, ndim=2)
        text = self.qformer(query_embeds=self.embeddings(ids, position_ids=pos), query_length=0, attention_mask=mask,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        embeds = self.text_projection(text.last_hidden_state.to(self.text_projection.weight.dtype))
        result = Blip2TextModelOutput(text_embeds=F.normalize(embeds, dim=-1, eps=NORM_EPS),
                                      last_hidden_state=text.last_hidden_state, hidden_states=text.hidden_states,
                                      attentions=text.attentions)
        return result if return_dict else result.to_tuple()

    def stages(self, input_ids, attention_mask=None, **_):
        out = self.forward(input_ids, attention_mask)
        return {"text": out.last_hidden_state, "text_embeds": out.text_embeds}


class Blip2VisionModelWithProjection(_Blip2PreTrained):
    """Vision + Q-Former -> normalised ``vision_projection`` of every query (B, Q, E)."""

    architecture = "Blip2VisionModelWithProjection"

    def __init__(self, config, seed=0, dtype=None):
        super().__init__(config)
        self._build_front(config)
        self.qformer = Blip2QFormerModel(config.qformer_config, seed=None)
        self.vision_projection = Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.post_init(seed, dtype)

    def forward(self, pixel_values=None, output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool = True, interpolate_pos_encoding: bool = False):
        vision, qformer = self._image_queries(pixel_values, interpolate_pos_encoding, output_attentions,
                                              output_hidden_states)
        embeds = self.vision_projection(qformer.last_hidden_state.to(self.vision_projection.weight.dtype))
        result = Blip2VisionModelOutput(image_embeds=F.normalize(embeds, dim=-1, eps=NORM_EPS),
                                        last_hidden_state=vision.last_hidden_state,
                                        hidden_states=vision.hidden_states, attentions=vision.attentions)
        return result if return_dict else result.to_tuple()

    def stages(self, pixel_values, interpolate_pos_encoding=False, **_):
        vision, qformer = self._image_queries(pixel_values, interpolate_pos_encoding)
        embeds = self.vision_projection(qformer.last_hidden_state.to(self.vision_projection.weight.dtype))
        return {"vision": vision.last_hidden_state, "qformer": qformer.last_hidden_state,
                "image_embeds": F.normalize(embeds, dim=-1, eps=NORM_EPS)}
