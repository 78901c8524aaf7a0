"""``loss_convention`` in the TF and JAX BLIP-2 backends gives torch's loss (and the same logits).

torch's "lavis" loss is checked against LAVIS's definition in test_torch_lavis_loss.py; here the
other two backends, built from the same seeded weights, must agree with it on both OPT paths
(queries concatenated in front, and placeholders in the prompt), and refuse unknown names.
"""
import numpy as np
import pytest
import torch

import backends.jax as bj
import backends.tf as btf
import backends.torch as bt
from blip_core import to_numpy
from blip_core.configs import load_config
from blip_core.numerics import tolerance
from fixture_utils import MODELS

ATOL = tolerance("default", "float32")[0]
BACKENDS = {"tf": btf, "jax": bj}


def _config(image_token_index):
    cfg = load_config(f"{MODELS}/Blip2ForConditionalGeneration")
    cfg.image_token_index = image_token_index
    return cfg


def _inputs(cfg, placeholders, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision_config.image_size
    pixels = rng.standard_normal((2, 3, s, s)).astype(np.float32)
    ids = rng.integers(3, 90, size=(2, 6))
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    if placeholders:
        q = cfg.num_query_tokens
        ids = np.concatenate([np.full((2, q), cfg.image_token_index, ids.dtype), ids], axis=1)
        mask = np.concatenate([np.ones((2, q), mask.dtype), mask], axis=1)
    labels = np.where(mask == 0, -100, ids)
    if placeholders:
        labels = np.where(ids == cfg.image_token_index, -100, labels)
        labels = labels[:, cfg.num_query_tokens:]   # labels on the text only: the conventions differ
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)


def _run(module, cfg, inputs, convention):
    model = module.Blip2ForConditionalGeneration(cfg, seed=3)
    if module is bt:
        model = model.eval()
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, loss_convention=convention)
    else:
        out = model(**inputs, loss_convention=convention)
    return float(to_numpy(out.loss)), np.asarray(to_numpy(out.logits))


@pytest.mark.parametrize("image_token_index", [pytest.param(None, marks=pytest.mark.slow), 98],
                         ids=["concatenated", "placeholders"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_lavis_loss_matches_torch(backend, image_token_index):
    cfg = _config(image_token_index)
    inputs = _inputs(cfg, placeholders=image_token_index is not None)
    want_lavis, want_logits = _run(bt, cfg, inputs, "lavis")
    want_default, _ = _run(bt, cfg, inputs, "transformers")
    assert abs(want_lavis - want_default) > 1e-3             # the two definitions really differ here
    lavis, logits = _run(BACKENDS[backend], cfg, inputs, "lavis")
    default, default_logits = _run(BACKENDS[backend], cfg, inputs, "transformers")
    assert abs(lavis - want_lavis) <= ATOL, (lavis, want_lavis)
    assert abs(default - want_default) <= ATOL, (default, want_default)
    # the returned logits are the labelled positions under both conventions
    assert logits.shape == want_logits.shape == default_logits.shape
    np.testing.assert_array_equal(logits, default_logits)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_unknown_loss_convention_fails(backend):
    cfg = _config(None)
    model = BACKENDS[backend].Blip2ForConditionalGeneration(cfg, seed=3)
    with pytest.raises(ValueError, match="loss_convention"):
        model(**_inputs(cfg, placeholders=False), loss_convention="blip")
