"""The cross-attention mask (``encoder_attention_mask``) from two angles, in every backend.

transformers 4.57 never applies it in PyTorch (REFERENCE.md); we do. That difference is visible only
when the cross-attended sequence is padded, which the parity matrix's inputs avoid, so it is
checked here:

- behaviour: BLIP's text decoder ignores masked encoder positions (changing them changes nothing)
  and gives each row the output it has with the masked positions cut off;
- parity: BlipForQuestionAnswering over a right-padded question batch gives, row by row, the
  stages transformers computes for each question alone without its padding (where the mask
  transformers drops has nothing to hide).
"""
import importlib

import numpy as np
import pytest

from blip_core import to_numpy
from blip_core.numerics import max_abs_diff
from converters.parity import compare
from fixture_utils import fixture, require
from test_parity_matrix import SUPPORT

require("transformers")
CUT = 5          # encoder positions masked at the end of the second row
DECODE = dict(max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True)


def _cls(backend, name):
    return getattr(importlib.import_module(f"backends.{backend}"), name)


@pytest.mark.parametrize("backend", SUPPORT["BlipTextModel"])
def test_text_decoder_ignores_masked_encoder_positions(backend):
    d, inp, _ = fixture("BlipTextModel")
    model = _cls(backend, "BlipTextModel").from_pretrained(d)
    enc = inp["encoder_hidden_states"]
    enc_mask = np.ones(enc.shape[:2], np.int64)
    enc_mask[1, -CUT:] = 0
    garbage = enc.copy()
    garbage[1, -CUT:] = 50.0

    def run(states, mask, rows=slice(None)):
        kw = {} if mask is None else {"encoder_attention_mask": mask[rows]}
        return to_numpy(model(input_ids=inp["input_ids"][rows], attention_mask=inp["attention_mask"][rows],
                              encoder_hidden_states=states[rows], **kw).last_hidden_state)

    masked = run(enc, enc_mask)
    assert max_abs_diff(masked, run(garbage, enc_mask)) == 0.0     # masked positions carry no weight at all
    cut = run(enc[:, :-CUT], None, slice(1, 2))
    assert compare("text", cut, masked[1:], "cut", backend).ok
    unmasked = run(enc, None)
    assert compare("text", unmasked[:1], masked[:1], "unmasked", backend).ok     # the full row is untouched
    assert not compare("text", unmasked[1:], masked[1:], "unmasked", backend).ok  # and the mask matters here


@pytest.fixture(scope="module")
def padded_vqa():
    """The VQA fixture with the second question cut by two tokens and right-padded, and
    transformers' stages of each question alone, without padding, stacked."""
    from blip_reference.transformers_stages import reference_stages
    d, inp, _ = fixture("BlipForQuestionAnswering")
    inp = {k: inp[k] for k in ("pixel_values", "input_ids", "labels")}
    mask = np.ones_like(inp["input_ids"])
    inp["input_ids"] = inp["input_ids"].copy()
    inp["input_ids"][1, -2:], mask[1, -2:] = 0, 0
    inp["attention_mask"] = mask
    rows = []
    for i, n in enumerate(mask.sum(1)):
        alone = {"pixel_values": inp["pixel_values"][i:i + 1], "input_ids": inp["input_ids"][i:i + 1, :n],
                 "attention_mask": mask[i:i + 1, :n], "labels": inp["labels"][i:i + 1]}
        rows.append(reference_stages(d, alone))
    want = {k: np.concatenate([r[k] for r in rows], 0) for k in ("vision", "lm_hidden", "logits")}
    return d, inp, want


@pytest.mark.parametrize("backend", SUPPORT["BlipForQuestionAnswering"])
def test_padded_questions_match_transformers_on_each_question_alone(padded_vqa, backend):
    d, inp, want = padded_vqa
    got = _cls(backend, "BlipForQuestionAnswering").from_pretrained(d).stages(**inp)
    for stage, ref in want.items():
        c = compare(stage, ref, to_numpy(got[stage]), "transformers", backend)
        assert c.ok, (stage, c)


@pytest.mark.parametrize("backend", SUPPORT["BlipForQuestionAnswering"])
def test_padded_questions_decode_as_each_question_alone(padded_vqa, backend):
    """Answer decoding (one query row a step, the backends' fast paths over the cached question keys/values)
    applies the question's mask: each row of a padded batch scores every step as its question alone, unpadded.
    The forward-pass checks above do not reach the decoding steps."""
    d, inp, _ = padded_vqa
    model = _cls(backend, "BlipForQuestionAnswering").from_pretrained(d)
    batch = model.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                           attention_mask=inp["attention_mask"], **DECODE)
    for i, n in enumerate(inp["attention_mask"].sum(1)):
        alone = model.generate(input_ids=inp["input_ids"][i:i + 1, :n], pixel_values=inp["pixel_values"][i:i + 1],
                               attention_mask=inp["attention_mask"][i:i + 1, :n], **DECODE)
        np.testing.assert_array_equal(to_numpy(batch.sequences)[i], to_numpy(alone.sequences)[0])
        assert len(batch.scores) == len(alone.scores) == 5
        for step, (b, a) in enumerate(zip(batch.scores, alone.scores)):
            a, b = to_numpy(a), to_numpy(b)[i:i + 1]
            held = np.isneginf(a)          # the minimum length holds eos back: -inf in both
            np.testing.assert_array_equal(held, np.isneginf(b))
            c = compare("logits", np.where(held, 0, a), np.where(held, 0, b), f"question {i} alone, step {step}",
                        backend)
            assert c.ok, (i, step, c)


@pytest.mark.parametrize("backend", SUPPORT["BlipForQuestionAnswering"])
def test_decoding_gives_padded_question_tokens_no_weight(padded_vqa, backend):
    """Other tokens in the padded positions of a question change nothing in its answer's decoding: not a
    rounding's worth (the masked positions' weights are exactly zero, as in the forward check above)."""
    d, inp, _ = padded_vqa
    model = _cls(backend, "BlipForQuestionAnswering").from_pretrained(d)
    other = inp["input_ids"].copy()
    other[inp["attention_mask"] == 0] = 7
    runs = [model.generate(input_ids=ids, pixel_values=inp["pixel_values"], attention_mask=inp["attention_mask"],
                           **DECODE) for ids in (inp["input_ids"], other)]
    np.testing.assert_array_equal(to_numpy(runs[0].sequences), to_numpy(runs[1].sequences))
    for a, b in zip(runs[0].scores, runs[1].scores):
        a, b = to_numpy(a), to_numpy(b)
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
        assert max_abs_diff(np.where(np.isneginf(a), 0, a), np.where(np.isneginf(b), 0, b)) == 0.0
