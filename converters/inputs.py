"""Fixed, seeded inputs for each class, built from its config (what the parity harness feeds).

Argument names are transformers 4.57's forward arguments, so the same dict drives every backend
and the transformers reference. Text has right padding on the second sample (last two tokens),
except for VQA: transformers 4.57 never applies the cross-attention mask, so a padded question
would make the reference differ for a reason that is not ours (see REFERENCE.md).
"""
from __future__ import annotations

import numpy as np

from blip_core.configs import Blip2Config, Blip2QFormerConfig, BlipConfig, BlipTextConfig, T5Config

BATCH, TEXT_LEN, ANSWER_LEN = 2, 7, 5


def _vision_cfg(config):
    return config.vision_config if isinstance(config, (BlipConfig, Blip2Config)) else config


def _pixels(rng, config) -> np.ndarray:
    size = _vision_cfg(config).image_size
    return rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)


def _text(rng, vocab: int, pad: bool = True, avoid: int | None = None, length: int = TEXT_LEN) -> tuple:
    low, high = min(3, vocab - 1), max(min(3, vocab - 1) + 1, vocab - 2)
    ids = rng.integers(low, high, size=(BATCH, length)).astype(np.int64)
    if avoid is not None:
        ids[ids == avoid] = low
    mask = np.ones_like(ids)
    if pad:
        ids[1, -2:], mask[1, -2:] = 0, 0
    return ids, mask


def _placeholders(config, ids, mask) -> tuple:
    """Prepend the num_query_tokens image placeholders Blip2Processor adds when the config has an
    ``image_token_index`` (transformers 4.57's convention)."""
    if config.image_token_index is None:
        return ids, mask
    q = config.num_query_tokens
    ids = np.concatenate([np.full((BATCH, q), config.image_token_index, np.int64), ids], 1)
    return ids, np.concatenate([np.ones((BATCH, q), np.int64), mask], 1)


def make_inputs(architecture: str, config, seed: int = 0) -> dict:
    """``{argument name: numpy array}`` for ``architecture``'s forward / stages."""
    rng = np.random.default_rng(seed)
    if architecture in ("BlipVisionModel", "Blip2VisionModel", "Blip2VisionModelWithProjection"):
        return {"pixel_values": _pixels(rng, config)}
    if architecture == "BlipTextModel":
        c = config.text_config if isinstance(config, BlipConfig) else config
        ids, mask = _text(rng, c.vocab_size)
        out = {"input_ids": ids, "attention_mask": mask}
        if isinstance(c, BlipTextConfig) and c.is_decoder:
            out["encoder_hidden_states"] = rng.standard_normal((BATCH, 5, c.encoder_hidden_size)).astype(np.float32)
        return out
    if architecture.startswith("Blip") and not architecture.startswith("Blip2"):
        ids, mask = _text(rng, config.text_config.vocab_size, pad=architecture != "BlipForQuestionAnswering")
        out = {"input_ids": ids, "pixel_values": _pixels(rng, config), "attention_mask": mask}
        if architecture == "BlipForConditionalGeneration":
            out["labels"] = np.where(mask == 1, ids, -100)
        if architecture == "BlipForQuestionAnswering":
            out["labels"] = _text(rng, config.text_config.vocab_size, pad=False, length=ANSWER_LEN)[0]
        return out
    if architecture == "Blip2QFormerModel":
        c = config.qformer_config if isinstance(config, Blip2Config) else config
        assert isinstance(c, Blip2QFormerConfig)
        return {"query_embeds": rng.standard_normal((BATCH, 4, c.hidden_size)).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((BATCH, 5, c.encoder_hidden_size)).astype(np.float32)}
    if architecture in ("Blip2Model", "Blip2ForConditionalGeneration"):
        lm = config.text_config
        ids, mask = _placeholders(config, *_text(rng, lm.vocab_size, avoid=config.image_token_index))
        out = {"pixel_values": _pixels(rng, config), "input_ids": ids, "attention_mask": mask}
        if isinstance(lm, T5Config):
            out["decoder_input_ids"] = _text(rng, lm.vocab_size, pad=False, length=4)[0]
        return out
    if architecture == "Blip2ForImageTextRetrieval":   # transformers drops the placeholders again
        ids, mask = _placeholders(config, *_text(rng, config.qformer_config.vocab_size))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": _pixels(rng, config)}
    if architecture == "Blip2TextModelWithProjection":
        ids, mask = _text(rng, config.qformer_config.vocab_size)
        return {"input_ids": ids, "attention_mask": mask}
    raise ValueError(f"no parity inputs defined for {architecture}")
