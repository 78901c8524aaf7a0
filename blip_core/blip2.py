"""BLIP-2's framework-neutral rules, shared by every backend's ``blip2`` module.

Everything here works on numpy arrays and configs only: where the image queries go in the text
(placeholder slots or concatenation in front, ``query_layout``), which prompt ``generate`` starts from, the
generation defaults of the language model, how OPT's loss lines labels up with logits, and which
parts stay float32 in a float16 model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .configs import Blip2Config, OPTConfig
from .generation import GenerationSettings, check_special_token_id, fed_positions, resolve_generation

# transformers' ``_keep_in_fp32_modules`` for BLIP-2. In 4.57 the rule applies to float16 only: in
# bfloat16 the whole model is bfloat16.
KEEP_FLOAT32_MODULES = ("query_tokens", "qformer")


def keeps_float32(dtype_name: Optional[str]) -> bool:
    """Whether the Q-Former and the query tokens stay float32 for a model of this dtype."""
    return dtype_name == "float16"


def is_decoder_only(config: Blip2Config) -> bool:
    """OPT (decoder-only, generation starts from embeddings) versus T5 (encoder-decoder)."""
    return isinstance(config.text_config, OPTConfig)


def uses_placeholders(config: Blip2Config) -> bool:
    """True: the queries replace ``image_token_index`` placeholders; False: they are concatenated in front."""
    return config.image_token_index is not None


def check_image_slots(counts, config: Blip2Config) -> None:
    """Every row must hold exactly ``num_query_tokens`` placeholders (``counts``: placeholders per row).

    transformers 4.57 silently ignores the image otherwise; we refuse.
    """
    counts = np.asarray(counts).reshape(-1)
    q = config.num_query_tokens
    if np.any(counts != q):
        raise ValueError(
            f"config.image_token_index={config.image_token_index} is set, so every row of input_ids must hold "
            f"exactly num_query_tokens={q} image placeholder tokens (Blip2Processor adds them); found "
            f"{counts.tolist()}. Prepend {q} ids {config.image_token_index} (and {q} ones to attention_mask).")


def image_slots(input_ids: np.ndarray, config: Blip2Config) -> np.ndarray:
    """Boolean (B, L) mask of the placeholder positions, checked with ``check_image_slots``."""
    slots = np.asarray(input_ids) == config.image_token_index
    check_image_slots(slots.sum(axis=1), config)
    return slots


def query_layout(input_ids: np.ndarray, attention_mask: Optional[np.ndarray], config: Blip2Config):
    """Where the Q projected image queries sit in the language model's input, as index arrays.

    Returns ``(ids, slots, mask, prefix)``: ``ids`` (B, prefix + L) int64 (the given ids, behind
    ``prefix`` zeros), ``slots`` (B, prefix + L) bool (the positions that take a query, in order),
    ``mask`` (B, prefix + L) int64 (all ones where none is given), ``prefix`` = 0 with placeholders
    (the placeholder slots, checked with ``image_slots``), Q without (the queries in front).
    """
    ids = np.asarray(input_ids, np.int64)
    b, n = ids.shape
    mask = np.ones((b, n), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    if uses_placeholders(config):
        return ids, image_slots(ids, config), mask, 0
    q = config.num_query_tokens
    slots = np.concatenate([np.ones((b, q), bool), np.zeros((b, n), bool)], 1)
    return (np.concatenate([np.zeros((b, q), np.int64), ids], 1), slots,
            np.concatenate([np.ones((b, q), np.int64), mask], 1), q)


def place_queries(queries: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(B, prefix + L, E) float array holding ``queries`` (B, Q, E) at ``slots`` in order, zeros elsewhere
    (what ``masked_scatter`` of the queries into the text embeddings writes)."""
    queries = np.asarray(queries)
    out = np.zeros(slots.shape + queries.shape[2:], queries.dtype)
    out[slots] = queries.reshape((-1,) + queries.shape[2:])
    return out


def strip_placeholders(input_ids: np.ndarray, config: Blip2Config):
    """Drop the leading placeholders ``Blip2Processor`` adds for the Q-Former text models.

    Returns ``(ids, stripped)``; without ``image_token_index`` the ids are returned unchanged.
    """
    ids = np.asarray(input_ids)
    if not uses_placeholders(config):
        return ids, False
    q = config.num_query_tokens
    if ids.shape[1] < q or not bool(np.all(ids[:, :q] == config.image_token_index)):
        raise ValueError(f"config.image_token_index={config.image_token_index} is set, so input_ids must start "
                         f"with num_query_tokens={q} placeholder ids (as Blip2Processor makes them)")
    return ids[:, q:], True


def default_prompt(config: Blip2Config, batch_size: int) -> np.ndarray:
    """The ids ``generate`` starts from without ``input_ids``: the placeholders (if the config uses
    them), then OPT's bos. T5 gets the placeholders only (its decoder starts on its own)."""
    start = [config.image_token_index] * config.num_query_tokens if uses_placeholders(config) else []
    if is_decoder_only(config) and getattr(config.text_config, "bos_token_id", None) is not None:
        start.append(check_special_token_id(config.text_config.bos_token_id, "text_config.bos_token_id",
                                            config.text_config.vocab_size))
    if not start:
        raise ValueError("pass input_ids: this config has neither image_token_index nor a bos token")
    return np.tile(np.asarray([start], dtype=np.int64), (batch_size, 1))


def decoder_start_token_id(config: Blip2Config, override: Optional[int] = None) -> int:
    """T5's first decoder token (``decoder_start_token_id``, 0 for the hub checkpoints)."""
    start = config.text_config.decoder_start_token_id if override is None else override
    if start is None:
        raise ValueError("text_config.decoder_start_token_id is not set; pass decoder_start_token_id")
    name = "decoder_start_token_id" if override is not None else "text_config.decoder_start_token_id"
    return check_special_token_id(start, name, config.text_config.vocab_size)


def label_shift_ids(config: Blip2Config) -> tuple:
    """T5's decoder inputs made from ``labels``: ``(start id in front, pad id for the -100 slots)``, both
    checked against the vocabulary (they are embedded)."""
    tc = config.text_config
    return decoder_start_token_id(config), check_special_token_id(tc.pad_token_id, "text_config.pad_token_id",
                                                                  tc.vocab_size)


def generation_settings(config: Blip2Config, prompt_length: int, **kwargs) -> GenerationSettings:
    """``resolve_generation`` with the language model's eos/pad and (OPT) its position table.

    ``prompt_length`` counts the decoder tokens the output starts with: the given ids for OPT
    (placeholders + bos + prompt), 1 (the start token) for T5.
    """
    tc = config.text_config
    defaults = {"eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id}
    return resolve_generation(prompt_length, defaults=defaults,
                              max_positions=getattr(tc, "max_position_embeddings", None), **kwargs)


def check_opt_positions(config: Blip2Config, prefix: int, max_length: int) -> None:
    """OPT's learned position table must cover the ``prefix`` (image queries in front of the prompt) plus the
    ``fed_positions`` of the ``max_length`` tokens of the output (prompt and new tokens); checked before anything
    is decoded."""
    needed, limit = prefix + fed_positions(max_length), config.text_config.max_position_embeddings
    if needed > limit:
        raise ValueError(f"the image queries, prompt and new tokens need {needed} positions but OPT has only "
                         f"max_position_embeddings={limit}")


def check_opt_position(max_position: int, limit: int) -> None:
    """A decoder call reaching ``max_position`` must stay inside OPT's table of ``limit`` positions (raised
    when the call happens, as the model raises, so a sequence that stops early never trips it)."""
    if max_position >= limit:
        raise ValueError(f"sequence needs position {max_position} but OPT has only {limit} positions")


def labelled_length(num_logits: int, num_labels: int) -> int:
    """OPT's loss: only the last ``num_labels`` positions (the text) carry labels; the returned
    logits are those positions, and the loss shifts them by one as any causal LM loss does."""
    if num_labels > num_logits:
        raise ValueError(f"labels have {num_labels} positions but the language model sees only {num_logits}")
    return num_labels


LOSS_CONVENTIONS = ("transformers", "lavis")


def check_loss_convention(convention: str) -> None:
    if convention not in LOSS_CONVENTIONS:
        raise ValueError(f"loss_convention must be one of {', '.join(LOSS_CONVENTIONS)}, got {convention!r}")


def loss_window(num_logits: int, num_labels: int, convention: str = "transformers") -> tuple:
    """``(positions, leading ignored labels)`` of the OPT captioning loss under ``convention``.

    * ``"transformers"`` (transformers 4.57, the default): the loss reads the last ``num_labels``
      logits and shifts by one inside them, so the first labelled token is never scored.
    * ``"lavis"`` (LAVIS ``Blip2OPT.forward``): the targets span the whole sequence with the query
      positions ignored, so the last query position also predicts the first text token. Here: one
      more logit position, and the labels get one ignored (-100) column in front.

    When the labels already cover every position (placeholder path with labels over the whole
    input) the two agree. T5 computes its loss on the decoder alone: both conventions are the same.
    """
    check_loss_convention(convention)
    n = labelled_length(num_logits, num_labels)
    if convention == "lavis" and n < num_logits:
        return n + 1, 1
    return n, 0


def retrieval_stages(out, use_image_text_matching_head: bool) -> dict:
    """The named stages of a ``Blip2ForImageTextRetrieval`` output, for the parity harness."""
    st = {"vision": out.vision_model_output.last_hidden_state, "text": out.text_model_output.last_hidden_state}
    if use_image_text_matching_head:
        st["itm_score"] = out.logits_per_image
    else:
        st.update(image_embeds=out.image_embeds, text_embeds=out.text_embeds, logits_per_image=out.logits_per_image)
    return st

