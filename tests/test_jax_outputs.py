"""JAX/Flax BLIP ``output_hidden_states`` / ``output_attentions`` against transformers 4.57 PyTorch.

Every entry of ``hidden_states``, ``attentions`` and ``cross_attentions`` is compared with the reference
(tiny configs, weights spread with std 0.25 so attention rows are far from uniform), for the towers and for
the task classes, which pass the vision tower's entries through.
"""
import os
import sys

import numpy as np
import pytest
import torch

import backends.jax as B

from fixture_utils import require
transformers = require("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_configs import blip_config, hf_blip_model  # noqa: E402

ATOL = 1e-4
RNG = np.random.default_rng(11)
PIXELS = RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)
IDS = RNG.integers(1, 96, size=(2, 6)).astype(np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int64)
FLAGS = dict(output_hidden_states=True, output_attentions=True)


def _pair(cls_name, tmp_path):
    """(reference model with spread-out random weights, our model loaded from the directory it saved)."""
    cfg = blip_config()
    model = hf_blip_model(cls_name, cfg, seed=0, spread=0.25)
    model.save_pretrained(str(tmp_path))
    return model, getattr(B, cls_name).from_pretrained(str(tmp_path))


def _same(ours, ref, n):
    """Two tuples of n tensors agree entry by entry (shape and values)."""
    assert ours is not None and ref is not None
    assert isinstance(ours, tuple) and len(ours) == len(ref) == n
    for i, (a, b) in enumerate(zip(ours, ref)):
        a, b = np.asarray(a), b.detach().numpy()
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert np.abs(a - b).max() <= ATOL, (i, np.abs(a - b).max())


def _check_vision(ours, ref, layers=2, tokens=17, heads=4):
    _same(ours.hidden_states, ref.hidden_states, layers + 1)
    _same(ours.attentions, ref.attentions, layers)
    assert ours.attentions[0].shape == (2, heads, tokens, tokens)
    np.testing.assert_allclose(np.asarray(ours.attentions[-1]).sum(-1), 1.0, atol=1e-5)   # probabilities
    assert np.abs(np.asarray(ours.attentions[0]) - 1.0 / tokens).max() > 0.05              # not uniform


def test_vision_model(tmp_path):
    hf, model = _pair("BlipVisionModel", tmp_path)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(PIXELS), **FLAGS)
    ours = model(pixel_values=PIXELS, **FLAGS)
    _check_vision(ours, ref)
    # the last entry is the encoder output before post_layernorm, unlike last_hidden_state
    assert np.abs(np.asarray(ours.hidden_states[-1]) - np.asarray(ours.last_hidden_state)).max() > 1e-2
    assert np.abs(np.asarray(ours.last_hidden_state) - ref.last_hidden_state.numpy()).max() <= ATOL
    plain = model(pixel_values=PIXELS)
    assert plain.hidden_states is None and plain.attentions is None
    np.testing.assert_allclose(np.asarray(plain.last_hidden_state), np.asarray(ours.last_hidden_state), atol=1e-5)
    only_h = model(pixel_values=PIXELS, output_hidden_states=True)
    assert only_h.attentions is None and len(only_h.hidden_states) == 3
    only_a = model(pixel_values=PIXELS, output_attentions=True)
    assert only_a.hidden_states is None and len(only_a.attentions) == 2


@pytest.mark.parametrize("is_decoder", [False, True])
def test_text_model_with_cross_attention(tmp_path, is_decoder):
    hf, model = _pair("BlipTextModel", tmp_path)
    enc = RNG.normal(size=(2, 5, 32)).astype(np.float32)
    kw = dict(FLAGS, is_decoder=is_decoder)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK),
                 encoder_hidden_states=torch.from_numpy(enc), use_cache=False, **kw)
    ours = model(input_ids=IDS, attention_mask=MASK, encoder_hidden_states=enc, **kw)
    _same(ours.hidden_states, ref.hidden_states, 3)
    _same(ours.attentions, ref.attentions, 2)
    _same(ours.cross_attentions, ref.cross_attentions, 2)
    assert ours.attentions[0].shape == (2, 4, 6, 6) and ours.cross_attentions[0].shape == (2, 4, 6, 5)
    # padded keys get no weight; causal rows see no future token when decoding
    assert np.asarray(ours.attentions[0])[1, :, :, 4:].max() < 1e-6
    if is_decoder:
        assert np.asarray(ours.attentions[1])[0, :, 0, 1:].max() < 1e-6
    only_h = model(input_ids=IDS, attention_mask=MASK, encoder_hidden_states=enc, is_decoder=is_decoder,
                   output_hidden_states=True)
    assert only_h.attentions is None and only_h.cross_attentions is None and len(only_h.hidden_states) == 3


def test_text_model_without_encoder_states(tmp_path):
    hf, model = _pair("BlipTextModel", tmp_path)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK), **FLAGS)
    ours = model(input_ids=IDS, attention_mask=MASK, **FLAGS)
    _same(ours.hidden_states, ref.hidden_states, 3)
    _same(ours.attentions, ref.attentions, 2)
    assert ref.cross_attentions is None and ours.cross_attentions is None
    plain = model(input_ids=IDS, attention_mask=MASK)
    assert plain.hidden_states is None and plain.attentions is None and plain.cross_attentions is None


def test_blip_model_towers(tmp_path):
    hf, model = _pair("BlipModel", tmp_path)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(IDS), pixel_values=torch.from_numpy(PIXELS),
                 attention_mask=torch.from_numpy(MASK), **FLAGS)
    ours = model(input_ids=IDS, pixel_values=PIXELS, attention_mask=MASK, **FLAGS)
    _check_vision(ours.vision_model_output, ref.vision_model_output)
    _same(ours.text_model_output.hidden_states, ref.text_model_output.hidden_states, 3)
    _same(ours.text_model_output.attentions, ref.text_model_output.attentions, 2)
    assert ours.text_model_output.cross_attentions is None
    assert np.abs(np.asarray(ours.logits_per_image) - ref.logits_per_image.numpy()).max() <= ATOL
    plain = model(input_ids=IDS, pixel_values=PIXELS, attention_mask=MASK)
    assert plain.vision_model_output.hidden_states is None and plain.text_model_output.attentions is None


def test_task_models_return_vision_entries(tmp_path):
    ids, mask, px = torch.from_numpy(IDS), torch.from_numpy(MASK), torch.from_numpy(PIXELS)
    cases = {
        "BlipForConditionalGeneration": (dict(pixel_values=px, input_ids=ids, attention_mask=mask),
                                         dict(pixel_values=PIXELS, input_ids=IDS, attention_mask=MASK)),
        "BlipForImageTextRetrieval": (dict(input_ids=ids, pixel_values=px, attention_mask=mask),
                                      dict(input_ids=IDS, pixel_values=PIXELS, attention_mask=MASK)),
        "BlipForQuestionAnswering": (dict(input_ids=ids, pixel_values=px, attention_mask=mask,
                                          decoder_input_ids=ids[:, :3]),
                                     dict(input_ids=IDS, pixel_values=PIXELS, attention_mask=MASK,
                                          decoder_input_ids=IDS[:, :3])),
    }
    for name, (ref_in, our_in) in cases.items():
        hf, model = _pair(name, tmp_path / name)
        with torch.no_grad():
            ref = hf(**ref_in, **FLAGS)
        ours = model(**our_in, **FLAGS)
        _check_vision(ours, ref)
        plain = model(**our_in)
        assert plain.hidden_states is None and plain.attentions is None, name
    # the retrieval model without the ITM head passes the same vision entries through
    hf_itc, model = _pair("BlipForImageTextRetrieval", tmp_path / "itc")
    with torch.no_grad():
        ref = hf_itc(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False, **FLAGS)
    _check_vision(model(input_ids=IDS, pixel_values=PIXELS, attention_mask=MASK, use_itm_head=False, **FLAGS), ref)
