"""``loss_convention="lavis"``: BLIP-2 OPT captioning loss as LAVIS defines it (torch backend).

The reference is LAVIS's definition written out here on the model's full logits: targets are the
text labels behind one ignored (-100) entry per query, and the causal LM loss shifts over the
whole sequence, so the last query position scores the first text token. transformers' loss (the
default, checked against transformers itself in test_torch_blip2.py) does not score it.
"""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from backends.torch import Blip2ForConditionalGeneration
from blip_core.configs import load_config
from blip_core.numerics import tolerance
from fixture_utils import MODELS

ATOL = tolerance("default", "float32")[0]


def _model(image_token_index):
    cfg = load_config(f"{MODELS}/Blip2ForConditionalGeneration")
    cfg.image_token_index = image_token_index
    return Blip2ForConditionalGeneration(cfg, seed=3).eval(), cfg


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision_config.image_size
    pixels = torch.from_numpy(rng.standard_normal((2, 3, s, s)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(3, 90, size=(2, 6)))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return pixels, ids, mask, labels


@torch.no_grad()
def test_lavis_loss_scores_the_first_text_token_from_the_last_query():
    model, cfg = _model(None)                      # LAVIS's path: queries concatenated in front
    pixels, ids, mask, labels = _inputs(cfg)
    full = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits      # (B, Q + L, V)
    q = cfg.num_query_tokens
    assert full.shape[1] == q + ids.shape[1]
    targets = torch.cat([torch.full((2, q), -100, dtype=labels.dtype), labels], dim=1)
    want = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100)
    hf_style = F.cross_entropy(full[:, q:-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    lavis = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, loss_convention="lavis")
    default = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(lavis.loss.item() - want.item()) <= ATOL
    assert abs(default.loss.item() - hf_style.item()) <= ATOL
    assert abs(lavis.loss.item() - default.loss.item()) > 1e-3          # the two definitions really differ
    # the returned logits are the labelled positions under both conventions
    assert torch.equal(lavis.logits, default.logits) and lavis.logits.shape[1] == ids.shape[1]


@torch.no_grad()
def test_conventions_agree_when_labels_cover_every_position_and_unknown_names_fail():
    model, cfg = _model(98)                        # placeholder path, labels over the whole input
    pixels, ids, mask, _ = _inputs(cfg, seed=1)
    q = cfg.num_query_tokens
    ids = torch.cat([torch.full((2, q), 98, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.ones((2, q), dtype=mask.dtype), mask], dim=1)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == 98, -100)
    a = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, loss_convention="lavis").loss
    b = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="loss_convention"):
        model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, loss_convention="blip")
