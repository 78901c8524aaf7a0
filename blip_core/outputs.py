"""Output containers with the field names of transformers 4.57, shared by every backend.

Fields hold the backend's native arrays. As in transformers, ``out.logits``, ``out["logits"]``
and ``out[i]`` (the i-th field that is not None) all work, and ``to_tuple()`` drops None fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelOutput:
    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def _output(name: str, fields: list, doc: str):
    cls = dataclasses.make_dataclass(name, [(f, Optional[Any], None) for f in fields], bases=(ModelOutput,))
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


# Generic encoder / decoder outputs.
BaseModelOutput = _output("BaseModelOutput", ["last_hidden_state", "hidden_states", "attentions"],
                          "Encoder output without pooling.")
BaseModelOutputWithPooling = _output(
    "BaseModelOutputWithPooling", ["last_hidden_state", "pooler_output", "hidden_states", "attentions"],
    "Vision tower output: ``last_hidden_state`` (B, N+1, D), ``pooler_output`` (B, D).")
BaseModelOutputWithPoolingAndCrossAttentions = _output(
    "BaseModelOutputWithPoolingAndCrossAttentions",
    ["last_hidden_state", "pooler_output", "hidden_states", "past_key_values", "attentions", "cross_attentions"],
    "Text / Q-Former output.")
BaseModelOutputWithPast = _output("BaseModelOutputWithPast",
                                  ["last_hidden_state", "past_key_values", "hidden_states", "attentions"],
                                  "Decoder-only language-model trunk output.")
CausalLMOutputWithCrossAttentions = _output(
    "CausalLMOutputWithCrossAttentions",
    ["loss", "logits", "past_key_values", "hidden_states", "attentions", "cross_attentions"],
    "BLIP text decoder output.")
CausalLMOutputWithPast = _output("CausalLMOutputWithPast",
                                 ["loss", "logits", "past_key_values", "hidden_states", "attentions"],
                                 "OPT language-model output.")
Seq2SeqLMOutput = _output(
    "Seq2SeqLMOutput",
    ["loss", "logits", "past_key_values", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
     "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions"],
    "T5 language-model output.")

# BLIP.
BlipOutput = _output(
    "BlipOutput",
    ["loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
     "vision_model_output"],
    "BlipModel output: ITC logits (B_img, B_txt) and projected embeddings.")
BlipForConditionalGenerationModelOutput = _output(
    "BlipForConditionalGenerationModelOutput",
    ["loss", "logits", "image_embeds", "last_hidden_state", "hidden_states", "attentions"],
    "Captioning output: ``logits`` (B, L, V), ``image_embeds`` = vision last_hidden_state.")
BlipImageTextMatchingModelOutput = _output(
    "BlipImageTextMatchingModelOutput",
    ["itm_score", "loss", "image_embeds", "last_hidden_state", "hidden_states", "vision_pooler_output",
     "attentions", "question_embeds"],
    "Retrieval output: ``itm_score`` (B, 2) with the ITM head, cosine (B_img, B_txt) without.")
BlipTextVisionModelOutput = _output(
    "BlipTextVisionModelOutput", ["loss", "image_embeds", "last_hidden_state", "hidden_states", "attentions"],
    "VQA output.")

# BLIP-2.
Blip2ForConditionalGenerationModelOutput = _output(
    "Blip2ForConditionalGenerationModelOutput",
    ["loss", "logits", "vision_outputs", "qformer_outputs", "language_model_outputs"],
    "BLIP-2 output: language-model ``logits`` plus every stage's outputs.")
Blip2ImageTextMatchingModelOutput = _output(
    "Blip2ImageTextMatchingModelOutput",
    ["loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
     "vision_model_output"],
    "BLIP-2 retrieval output (ITC similarity or ITM logits in ``logits_per_image``).")
Blip2TextModelOutput = _output("Blip2TextModelOutput", ["text_embeds", "last_hidden_state", "hidden_states", "attentions"],
                               "Normalised text projection of every token (B, L, E).")
Blip2VisionModelOutput = _output("Blip2VisionModelOutput",
                                 ["image_embeds", "last_hidden_state", "hidden_states", "attentions"],
                                 "Normalised vision projection of every query (B, Q, E).")



@dataclass
class GenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: transformers' ``GenerateDecoderOnlyOutput`` /
    ``GenerateBeamDecoderOnlyOutput`` fields. ``scores`` (with ``output_scores=True``) is a tuple with
    one (rows, vocab) array per generated step: the processed scores for greedy and sampling, the
    processed log-probabilities of each running beam for beam search. ``sequences_scores`` (beam
    search) holds the length-normalised score of each returned sequence."""

    sequences: Any = None
    scores: Optional[tuple] = None
    sequences_scores: Any = None


__all__ = [n for n, v in list(globals().items()) if isinstance(v, type) and issubclass(v, ModelOutput)]
