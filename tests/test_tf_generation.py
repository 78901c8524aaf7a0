"""TensorFlow BLIP generation against transformers 4.57 PyTorch ``generate``: ids must be identical.

Covers greedy and beam search (with and without a batched, right-padded prompt), repetition
penalty, min/max length, length penalty and early stopping, num_return_sequences, VQA, seeded
sampling, and that a second call with the same shapes reuses the XLA trace. Each distinct
setting compiles once (a few seconds on CPU), so cases are combined where they can share.
"""
import os
import sys

import numpy as np
import pytest
import torch

import backends.tf as B
from backends.tf.generation import trace_count

from fixture_utils import require
transformers = require("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_configs import blip_config  # noqa: E402

BOS, SEP, PAD, CLS = 96, 97, 0, 95
PROMPT = np.array([[CLS, 5, 6, 7, SEP], [CLS, 8, 9, SEP, 0], [CLS, 11, SEP, 0, 0]])   # tokenized, right-padded
PROMPT_MASK = (PROMPT != 0).astype(np.int64)


def tiny_config():
    # a wider init than the default makes captions depend on the image and end at different steps
    return blip_config(vision=dict(initializer_range=0.2), text=dict(initializer_range=0.2), initializer_range=0.2)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.BlipForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        ref.text_decoder.cls.predictions.bias[SEP] += 0.3   # some hypotheses stop early, others run on
    d = str(tmp_path_factory.mktemp("cap"))
    ref.save_pretrained(d)
    return ref, B.BlipForConditionalGeneration.from_pretrained(d)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    torch.manual_seed(1)
    ref = transformers.BlipForQuestionAnswering(tiny_config()).eval()
    d = str(tmp_path_factory.mktemp("vqa"))
    ref.save_pretrained(d)
    return ref, B.BlipForQuestionAnswering.from_pretrained(d)


def pixels(batch=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def hf_generate(ref, **kw):
    with torch.no_grad():
        return ref.generate(**{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}).numpy()


def check_same(ref, ours, **kw):
    want = hf_generate(ref, **kw)
    got = ours.generate(**kw).numpy()
    assert got.dtype == np.int64
    assert got.shape == want.shape and (got == want).all(), f"{kw.keys()}\nours:\n{got}\ntransformers:\n{want}"
    return got


CAPTION_CASES = {
    "greedy": dict(max_new_tokens=12),
    "greedy_prompt_penalty_minlen": dict(max_length=16, min_new_tokens=4, repetition_penalty=1.5, input_ids=PROMPT,
                                         attention_mask=PROMPT_MASK),
    "beam_nrs": dict(max_new_tokens=12, num_beams=3, num_return_sequences=2),
    "beam_prompt_lp_early": dict(max_new_tokens=12, num_beams=3, length_penalty=0.6, early_stopping=True,
                                 input_ids=PROMPT, attention_mask=PROMPT_MASK),
    "beam_prompt_penalty_never": dict(max_new_tokens=10, num_beams=2, repetition_penalty=1.3,
                                      early_stopping="never", input_ids=PROMPT, attention_mask=PROMPT_MASK),
}

# beam + repetition penalty + early_stopping='never': also a row of the torch and jax generation tests; the
# penalty in TF is still covered by greedy_prompt_penalty_minlen (default run)
SLOW_CAPTION_CASES = {"beam_prompt_penalty_never"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CAPTION_CASES else c
                                  for c in CAPTION_CASES])
def test_caption_ids_match_transformers(captioner, case):
    ref, ours = captioner
    got = check_same(ref, ours, pixel_values=pixels(), **CAPTION_CASES[case])
    assert (got[:, 0] == BOS).all()
    if case == "greedy":   # the fixture really exercises eos: finished rows are padded
        assert (got == PAD).any() and (got[:, -1] != PAD).any()


def test_second_call_reuses_the_trace(captioner):
    _, ours = captioner
    kw = CAPTION_CASES["greedy"]
    ours.generate(pixel_values=pixels(), **kw)
    before = trace_count(ours)
    a = ours.generate(pixel_values=pixels(seed=1), **kw).numpy()
    b = ours.generate(pixel_values=pixels(seed=2), **kw).numpy()
    # the first call traced, or read the traced program from a warm store (program_cache): 0 traces then
    assert trace_count(ours) == before and ours._compiled
    assert a.shape[0] == b.shape[0] == 3 and not np.array_equal(a, b)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=8),       # beam: test_parity_generation vqa-padded-beam-tf
                                pytest.param(dict(max_new_tokens=8, num_beams=3), marks=pytest.mark.slow)],
                         ids=["greedy", "beam"])
def test_vqa_ids_match_transformers(vqa, kw):
    ref, ours = vqa
    q = np.array([[CLS, 20, 21, 22, SEP], [CLS, 30, 31, 32, SEP]])
    check_same(ref, ours, input_ids=q, pixel_values=pixels(2, seed=4), **kw)


def test_sampling_is_seeded(captioner):
    _, ours = captioner
    kw = dict(do_sample=True, max_new_tokens=10, top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=2)
    a = ours.generate(pixel_values=pixels(), seed=1, **kw).numpy()
    b = ours.generate(pixel_values=pixels(), seed=1, **kw).numpy()
    c = ours.generate(pixel_values=pixels(), seed=2, **kw).numpy()
    assert a.shape[0] == 6 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < ours.config.text_config.vocab_size


@pytest.mark.slow
def test_top_k_one_sampling_is_greedy(captioner):
    ref, ours = captioner
    got = ours.generate(pixel_values=pixels(), do_sample=True, top_k=1, seed=5, max_new_tokens=12).numpy()
    want = hf_generate(ref, pixel_values=pixels(), max_new_tokens=12)
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_beam_sampling_runs(captioner):
    _, ours = captioner
    out = ours.generate(pixel_values=pixels(2), do_sample=True, num_beams=2, seed=0, max_new_tokens=6).numpy()
    assert out.shape[0] == 2 and (out[:, 0] == BOS).all() and out.shape[1] <= 7


def test_bad_generate_options_raise(captioner):
    _, ours = captioner
    for kw, msg in [(dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                    (dict(top_p=1.5, do_sample=True), "top_p"), (dict(beam_width=2), "unknown"),
                    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=100), "max_position")]:
        with pytest.raises(ValueError, match=msg):
            ours.generate(pixel_values=pixels(), **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        ours.generate(pixel_values=pixels(), input_ids=PROMPT + 200)


@pytest.mark.parametrize("record", [False, True])
def test_cross_attention_shares_an_inputs_keys_among_its_rows(record):
    """Cross-attention of 6 query rows (2 inputs x 3 beams, 2 query positions) over one row of keys/values per
    input, with a per-input padding bias, equals each row attending to its own copy; with probabilities recorded
    too (the per-row shapes)."""
    import tensorflow as tf
    from backends.tf._base import padding_bias
    from backends.tf.text import BertAttention
    from blip_core.configs import BlipTextConfig
    cfg = BlipTextConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=1,
                         vocab_size=50, encoder_hidden_size=32)
    rng = np.random.default_rng(0)
    params = {f"a/{inner}/{name}/{kind}": rng.standard_normal(shape).astype(np.float32) * 0.2
              for inner, names in (("self", ("query", "key", "value")), ("output", ("dense",)))
              for name in names for kind, shape in (("kernel", (32, 32)), ("bias", (32,)))}
    params.update({"a/output/LayerNorm/gamma": np.ones(32, np.float32), "a/output/LayerNorm/beta": np.zeros(32, np.float32)})
    att = BertAttention(params, "a", cfg)
    states = tf.constant(rng.standard_normal((2, 7, 32)).astype(np.float32))
    keep = np.ones((2, 7), np.int32)
    keep[1, 5:] = 0
    h = tf.constant(rng.standard_normal((6, 2, 32)).astype(np.float32))
    k, v = att.kv(states)
    bias = padding_bias(tf.constant(keep))
    probs, want_probs = ([], []) if record else (None, None)
    got = att(h, k, v, bias, probs)
    want = att(h, tf.repeat(k, 3, 0), tf.repeat(v, 3, 0), tf.repeat(bias, 3, 0), want_probs)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    if record:
        assert probs[0].shape == (6, 4, 2, 7)
        np.testing.assert_allclose(probs[0].numpy(), want_probs[0].numpy(), rtol=1e-5, atol=1e-7)


def test_beam_search_keeps_one_copy_of_the_image_keys(monkeypatch, captioner):
    """The traced beam-search program hands the cross-attention one row of image keys/values per input: 2 images x
    3 beams attend over 2 rows (the ids are checked against transformers' in the cases above)."""
    import backends.tf.text as text
    monkeypatch.setenv("BLIP_COMPILE_CACHE", "0")                       # the plain tf.function, traced here
    seen = []
    real = text.BertAttention.__call__
    monkeypatch.setattr(text.BertAttention, "__call__",
                        lambda self, h, k, v, *a, **kw: seen.append((h.shape[0], k.shape[0])) or real(self, h, k, v,
                                                                                                       *a, **kw))
    ref, ours = captioner
    ids = ours.generate(pixel_values=pixels(2, seed=7), num_beams=3, max_new_tokens=4, min_new_tokens=4).numpy()
    np.testing.assert_array_equal(ids, hf_generate(ref, pixel_values=pixels(2, seed=7), num_beams=3, max_new_tokens=4,
                                                   min_new_tokens=4))
    cross = [s for s in seen if s[0] != s[1]]
    assert cross and all(rows == 3 * inputs for rows, inputs in cross)


SAMPLE_LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5], np.float32)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=4)], ids=["plain", "top_k"])
def test_each_sampling_step_draws_afresh(options):
    """The compiled engine on a step whose logits never change: every step is a new draw from the warped
    softmax, so a token repeats the previous one with probability sum(p ** 2) and each token's frequency is
    p (p from the options' definitions: temperature divides the logits, top-k keeps the k largest), within
    5 standard errors over 384 rows x 12 steps."""
    import tensorflow as tf

    from blip_core.generation import resolve_generation
    from backends.tf import generation
    rows, steps, v = 384, 12, len(SAMPLE_LOGITS)
    settings = resolve_generation(1, max_new_tokens=steps, do_sample=True, pad_token_id=0, seed=3, **options)
    plan, numbers, seed = generation.plan_inputs(settings, v)
    table = tf.constant(SAMPLE_LOGITS)

    def step(tok, pos, key_mask, cache, index, context):
        return tf.tile(table[None], [tf.shape(tok)[0], 1]), tok[:, -1:]

    def run(ids, mask, seed, numbers):
        return generation.decode(step, None, ids, mask, seed, plan, numbers)

    ids = tf.ones((rows, 1), tf.int32)
    out = tf.function(run, jit_compile=True, autograph=False)(ids, tf.ones_like(ids), seed, numbers)
    new = generation.result(settings, *out).numpy()[:, 1:]
    assert new.shape == (rows, steps)
    p = np.exp((SAMPLE_LOGITS - SAMPLE_LOGITS.max()).astype(np.float64) / options.get("temperature", 1.0))
    if options.get("top_k"):
        p[options["top_k"]:] = 0                      # the logits are sorted: the k largest come first
    p /= p.sum()
    freq = np.bincount(new.ravel(), minlength=v) / new.size
    assert (freq[p == 0] == 0).all()
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / new.size))
    repeats = (new[:, 1:] == new[:, :-1]).mean()
    q = float(np.sum(p ** 2))
    assert abs(repeats - q) <= 5 * np.sqrt(q * (1 - q) / new[:, 1:].size), (repeats, q)
