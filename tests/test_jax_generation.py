"""Compiled ``generate`` of the JAX backend against transformers 4.57 ``generate`` on tiny random models.

Greedy and beam ids must be identical to transformers (captioning with and without batched, padded
prompts; VQA), including finished rows, eos/pad filling and output length. The eos logit of the scrambled
reference models is raised so that rows finish at different steps. A second call with the same shapes and
different numeric settings must not trace again.
"""
import jax
import numpy as np
import pytest

from fixture_utils import require
torch = require("torch")
transformers = require("transformers")

from test_jax_blip import build, inputs, t  # noqa: E402

EOS = 97          # sep_token_id of hf_configs' tiny BLIP: the eos of generate


@pytest.fixture(autouse=True)
def strict_numerics():
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        yield


def _build(name, path, eos_bias):
    hf, _ = build(name, path)
    with torch.no_grad():
        hf.text_decoder.cls.predictions.bias[EOS] = eos_bias   # make eos a real contender
    hf.save_pretrained(path)
    import backends.jax as J
    return hf, getattr(J, name).from_pretrained(path)


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    return _build("BlipForConditionalGeneration", str(tmp_path_factory.mktemp("cap")), 5.0)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return _build("BlipForQuestionAnswering", str(tmp_path_factory.mktemp("vqa")), 5.0)


def same(ours, ref):
    ours, ref = np.asarray(ours), ref.numpy()
    assert ours.shape == ref.shape, (ours.tolist(), ref.tolist())
    np.testing.assert_array_equal(ours, ref)


def _prompts():
    """Three right-padded "[CLS] words [SEP]" prompts, as a BLIP processor pads a batch."""
    ids = np.array([[96, 31, 32, 33, EOS], [96, 41, 42, EOS, 0], [96, 51, EOS, 0, 0]])
    return ids, (ids != 0).astype(np.int64)


def test_greedy_caption(cap):
    hf, ours = cap
    pv, _, _ = inputs(batch=3)
    ref = hf.generate(pixel_values=t(pv), max_new_tokens=12)
    out = ours.generate(pixel_values=pv, max_new_tokens=12)
    same(out, ref)
    assert (ref.numpy() == EOS).any(), "the reference should finish some rows early"


def test_beam_caption_and_no_recompile(cap):
    hf, ours = cap
    pv, _, _ = inputs(batch=3)
    for i, lp in enumerate((1.0, 0.6)):
        before = ours.trace_count("generate")
        kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, length_penalty=lp)
        same(ours.generate(pixel_values=pv, **kw), hf.generate(pixel_values=t(pv), **kw))
        if i:     # same shapes and structure, another length penalty: the compiled program is reused
            assert ours.trace_count("generate") == before


@pytest.mark.slow      # engine options: tests/test_decoding.py; model ids: tests/test_parity_generation.py
def test_prompted_batched_caption(cap):
    hf, ours = cap
    pv, _, _ = inputs(batch=3)
    ids, mask = _prompts()
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=2, early_stopping=True)):
        ref = hf.generate(pixel_values=t(pv), input_ids=t(ids), attention_mask=t(mask), **kw)
        same(ours.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw), ref)


@pytest.mark.slow
def test_penalties_min_length_and_no_recompile(cap):
    hf, ours = cap
    pv, _, _ = inputs(batch=3)
    calls = [dict(repetition_penalty=1.3, min_new_tokens=4), dict(repetition_penalty=2.5, min_new_tokens=2)]
    for i, kw in enumerate(calls):
        before = ours.trace_count("generate")
        same(ours.generate(pixel_values=pv, max_new_tokens=10, **kw),
             hf.generate(pixel_values=t(pv), max_new_tokens=10, **kw))
        if i:
            assert ours.trace_count("generate") == before


def test_vqa_greedy_and_beam(vqa):
    hf, ours = vqa
    pv, ids, _ = inputs(pad_row=False)
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)):
        same(ours.generate(input_ids=ids, pixel_values=pv, **kw),
             hf.generate(input_ids=t(ids), pixel_values=t(pv), **kw))


def test_vqa_ignores_masked_question_tokens(vqa):
    """The question's padding is masked in every attention (transformers skips the cross mask): whatever
    sits in masked slots cannot change the answer."""
    _, ours = vqa
    pv, ids, _ = inputs(pad_row=False)
    mask = np.ones_like(ids)
    mask[:, 5:] = 0
    a, b = ids.copy(), ids.copy()
    a[:, 5:], b[:, 5:] = 0, 77
    ga = ours.generate(input_ids=a, pixel_values=pv, attention_mask=mask, max_new_tokens=6)
    gb = ours.generate(input_ids=b, pixel_values=pv, attention_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))
    answers = np.array([[96, 11, 12, 97], [96, 13, 97, 0]])
    la = ours.stages(input_ids=a, pixel_values=pv, attention_mask=mask, labels=answers)["logits"]
    lb = ours.stages(input_ids=b, pixel_values=pv, attention_mask=mask, labels=answers)["logits"]
    assert float(np.abs(np.asarray(la) - np.asarray(lb)).max()) <= 1e-5


@pytest.mark.slow
def test_sampling(cap):
    _, ours = cap
    pv, _, _ = inputs(batch=3)
    greedy = np.asarray(ours.generate(pixel_values=pv, max_new_tokens=12))
    # top_k=1 leaves one candidate: every sample must reproduce greedy decoding exactly
    kw = dict(max_new_tokens=12, do_sample=True, num_return_sequences=2)
    ones = np.asarray(ours.generate(pixel_values=pv, top_k=1, seed=3, **kw))
    np.testing.assert_array_equal(ones, np.repeat(greedy, 2, axis=0))
    before = ours.trace_count("generate")
    kw.update(top_p=0.9, temperature=1.5)
    a = np.asarray(ours.generate(pixel_values=pv, seed=0, **kw))
    b = np.asarray(ours.generate(pixel_values=pv, prng_key=jax.random.key(0), **kw))
    c = np.asarray(ours.generate(pixel_values=pv, seed=1, **kw))
    assert ours.trace_count("generate") == before      # top_k, top_p, temperature and the key are traced
    assert a.shape[0] == 6 and (a[:, 0] == 96).all()
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    beams = np.asarray(ours.generate(pixel_values=pv, max_new_tokens=8, do_sample=True, num_beams=2, seed=0))
    assert beams.shape[0] == 3 and (beams[:, 0] == 96).all()
