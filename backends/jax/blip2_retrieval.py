"""BLIP-2 retrieval and projection classes in Flax linen: ``Blip2ForImageTextRetrieval`` (ITC and ITM),
``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``.

They reuse ``blip2.py``'s ``Blip2Module`` with the parts each class owns; the Q-Former's text embeddings
(``embeddings``) have no LayerNorm of their own. With ``config.image_token_index`` the Q placeholders that
``Blip2Processor`` puts in front of the text are checked and dropped (``blip_core.blip2.strip_placeholders``).

Example::

    model = Blip2ForImageTextRetrieval.from_pretrained("dir")
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    out.logits_per_image.shape    # (B, 2)
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from blip_core import blip2 as rules
from blip_core.outputs import Blip2ImageTextMatchingModelOutput, Blip2TextModelOutput, Blip2VisionModelOutput

from ._base import as_input, token_ids
from .blip import _normalize
from .blip2 import _FLAGS, _Blip2Base, _qformer_output, _vision_output

__all__ = ["Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"]


class Blip2ForImageTextRetrieval(_Blip2Base):
    """ITC (default): max over queries of cosine(query, text [CLS]); ITM: 2-way head averaged over queries."""

    parts = ("vision_model", "embeddings", "vision_projection", "text_projection", "itm_head")

    def _forward(self, params, pv, ids, mask, stripped, itm, output_hidden_states=False, output_attentions=False):
        qdt, dt, q = self.qformer_dtype, self.dtype, self.config.num_query_tokens

        def run(m, pv, ids, mask):
            if itm:
                vision = m.vision_model.full(pv, False)
                queries = jnp.broadcast_to(m.query_tokens, (pv.shape[0],) + m.query_tokens.shape[1:])
                full = mask if stripped else jnp.concatenate([jnp.ones((ids.shape[0], q), jnp.int32), mask], 1)
                text = m.qformer(m.embeddings(ids, query_embeds=queries), full, vision[0], None, q, qdt)
                states = text[0].astype(dt)
                logits = jnp.mean(m.itm_head(states[:, :q]), axis=1)
                return dict(logits=logits, text_embeds=states, image_embeds=vision[0], text=text, vision=vision)
            vision, image = m.image_queries(pv, False, qdt)
            text = m.qformer(m.embeddings(ids), mask[:, q:] if stripped else mask, None, None, 0, qdt)
            image_embeds = _normalize(m.vision_projection(image[0].astype(dt)))
            text_embeds = _normalize(m.text_projection(text[0][:, 0].astype(dt)))
            logits = jnp.max(jnp.einsum("bqe,te->bqt", image_embeds, text_embeds), axis=1)
            return dict(logits=logits, text_embeds=text_embeds, image_embeds=image_embeds, text=text, vision=vision)
        return self._apply(params, pv, ids, mask, method=run)

    def _run(self, pixel_values, input_ids, attention_mask, itm, params, hs=False, at=False):
        pv = self._pixels(pixel_values, False)
        raw = as_input(input_ids, "input_ids", "iu", ndim=2)   # values: after the placeholders are dropped
        if raw is None:
            raise ValueError("input_ids is required")
        mask = self._mask(attention_mask, raw.shape)
        kept, stripped = rules.strip_placeholders(np.asarray(raw), self.config)
        ids = token_ids(kept, "input_ids", self.config.qformer_config.vocab_size)
        if itm and ids.shape[0] != pv.shape[0]:
            raise ValueError(f"the text batch ({ids.shape[0]}) and the image batch ({pv.shape[0]}) differ")
        fn = self._jit("forward", "_forward", ("stripped", "itm") + _FLAGS)
        return fn(self._params(params), pv, ids, mask, stripped=stripped, itm=bool(itm),
                  output_hidden_states=hs, output_attentions=at)

    def __call__(self, pixel_values, input_ids, attention_mask=None,
                 use_image_text_matching_head: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        hs, at = bool(output_hidden_states), bool(output_attentions)
        o = self._run(pixel_values, input_ids, attention_mask, use_image_text_matching_head, params, hs, at)
        out = Blip2ImageTextMatchingModelOutput(
            logits_per_image=o["logits"], logits_per_text=o["logits"].T, text_embeds=o["text_embeds"],
            image_embeds=o["image_embeds"], text_model_output=_qformer_output(o["text"], hs, at),
            vision_model_output=_vision_output(o["vision"], hs, at))
        return out if return_dict else out.to_tuple()

    def stages(self, pixel_values=None, input_ids=None, attention_mask=None, use_image_text_matching_head=False,
               params=None, **_) -> dict:
        o = self._run(pixel_values, input_ids, attention_mask, use_image_text_matching_head, params)
        st = {"vision": o["vision"][0], "text": o["text"][0]}
        if use_image_text_matching_head:
            st["itm_score"] = o["logits"]
        else:
            st.update(image_embeds=o["image_embeds"], text_embeds=o["text_embeds"], logits_per_image=o["logits"])
        return st


class Blip2TextModelWithProjection(_Blip2Base):
    """Q-Former text encoder -> normalised ``text_projection`` of every token (B, L, E)."""

    parts = ("embeddings", "text_projection")

    def _forward(self, params, ids, mask, position_ids):
        qdt, dt = self.qformer_dtype, self.dtype

        def run(m, ids, mask, position_ids):
            text = m.qformer(m.embeddings(ids, position_ids), mask, None, None, 0, qdt)
            return _normalize(m.text_projection(text[0].astype(dt))), text
        return self._apply(params, ids, mask, position_ids, method=run)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True, params=None):
        qc = self.config.qformer_config
        ids = token_ids(input_ids, "input_ids", qc.vocab_size, qc.max_position_embeddings)
        if ids is None:
            raise ValueError("input_ids is required")
        pos = token_ids(position_ids, "position_ids", qc.max_position_embeddings)
        embeds, text = self._jit("forward", "_forward")(self._params(params), ids, self._mask(attention_mask, ids.shape),
                                                        pos)
        out = Blip2TextModelOutput(text_embeds=embeds, last_hidden_state=text[0],
                                 hidden_states=text[1] if output_hidden_states else None,
                                 attentions=text[2] if output_attentions else None)
        return out if return_dict else out.to_tuple()

    def stages(self, input_ids=None, attention_mask=None, params=None, **_) -> dict:
        out = self(input_ids=input_ids, attention_mask=attention_mask, params=params)
        return {"text": out.last_hidden_state, "text_embeds": out.text_embeds}


class Blip2VisionModelWithProjection(_Blip2Base):
    """Vision + Q-Former -> normalised ``vision_projection`` of every query (B, Q, E)."""

    parts = ("vision_model", "vision_projection")

    def _forward(self, params, pv, interpolate):
        qdt, dt = self.qformer_dtype, self.dtype

        def run(m, pv):
            vision, qformer = m.image_queries(pv, interpolate, qdt)
            return _normalize(m.vision_projection(qformer[0].astype(dt))), vision, qformer[0]
        return self._apply(params, pv, method=run)

    def __call__(self, pixel_values=None, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = True, interpolate_pos_encoding: bool = False, params=None):
        out = self._outputs(pixel_values, interpolate_pos_encoding, params, output_hidden_states,
                          output_attentions)[0]
        return out if return_dict else out.to_tuple()

    def _outputs(self, pixel_values, interpolate, params, hs=False, at=False):
        fn = self._jit("forward", "_forward", ("interpolate",))
        embeds, vision, qformer = fn(self._params(params), self._pixels(pixel_values, interpolate),
                                     interpolate=bool(interpolate))
        return Blip2VisionModelOutput(image_embeds=embeds, last_hidden_state=vision[0],
                                      hidden_states=vision[2] if hs else None,
                                      attentions=vision[3] if at else None), qformer

    def stages(self, pixel_values=None, interpolate_pos_encoding=False, params=None, **_) -> dict:
        out, qformer = self._outputs(pixel_values, interpolate_pos_encoding, params)
        return {"vision": out.last_hidden_state, "qformer": qformer, "image_embeds": out.image_embeds}
