"""The numpy engine of ``blip_runtime`` (the rulebook's vocabulary in numpy) against transformers 4.57.

The table model and decoding cases of ``tests/test_decoding.py``: every case must give
transformers' ids (and scores) through ``blip_runtime.numpy_engine.generate``, as the torch, tf and
jax engines do there.
"""
import numpy as np
import pytest

from blip_core.generation import resolve_generation

from test_decoding import A, B, C, CASES, PROMPT, V, _transformers, reference  # noqa: F401  (fixture)


def _numpy(ids, mask, settings):
    from blip_runtime.numpy_engine import generate

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if cache is None else cache          # prompts have more than one token
        return A[tok[:, -1]] + B[prev[:, 0]] + C[pos[:, -1]], tok[:, -1:]

    out = generate(step, ids, settings, vocab_size=V, attention_mask=mask)
    if hasattr(out, "sequences"):
        return {"sequences": out.sequences, "scores": None if out.scores is None else np.stack(out.scores, 1),
                "sequences_scores": out.sequences_scores}
    return {"sequences": out}


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_engine_matches_transformers(reference, case):  # noqa: F811
    kw = dict(CASES[case])
    ids = kw.pop("prompt", PROMPT)
    mask = (ids != 0).astype(np.int64)
    settings = resolve_generation(ids.shape[1], defaults={"pad_token_id": 0}, **kw)
    ref = _transformers(reference, ids, mask, dict(kw, pad_token_id=0))
    got = _numpy(ids, mask, settings)
    np.testing.assert_array_equal(got["sequences"], ref["sequences"])
    if kw.get("output_scores"):
        finite = np.isfinite(ref["scores"])
        np.testing.assert_array_equal(np.isfinite(got["scores"]), finite)
        np.testing.assert_allclose(got["scores"][finite], ref["scores"][finite], rtol=1e-5, atol=1e-5)
    if ref.get("sequences_scores") is not None:
        np.testing.assert_allclose(got["sequences_scores"], ref["sequences_scores"], rtol=1e-5, atol=1e-5)


def test_numpy_top_k_one_sampling_is_greedy():
    ids, mask = PROMPT, np.ones_like(PROMPT)
    greedy = _numpy(ids, mask, resolve_generation(4, max_new_tokens=8, eos_token_id=4, pad_token_id=0))
    sampled = _numpy(ids, mask, resolve_generation(4, max_new_tokens=8, eos_token_id=4, pad_token_id=0,
                                                   do_sample=True, top_k=1, seed=3))
    np.testing.assert_array_equal(sampled["sequences"], greedy["sequences"])


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5], np.float32)


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


@pytest.mark.parametrize("options", [dict(temperature=0.7, top_k=4), dict(top_p=0.8, top_k=0)])
def test_numpy_sampling_draws_from_the_warped_distribution(options):
    """20,000 rows sample one token from the same logits: the frequencies are the distribution the
    options describe, computed here from their definitions (temperature divides the logits, top-k keeps
    the k largest, top-p the smallest set whose probability reaches p), within 5 standard errors."""
    from blip_runtime.numpy_engine import generate
    n = 20_000
    settings = resolve_generation(1, max_new_tokens=1, do_sample=True, pad_token_id=0, seed=11, **options)
    step = lambda tok, pos, key_mask, cache, index, context: (np.tile(LOGITS, (tok.shape[0], 1)), tok)  # noqa: E731
    ids = generate(step, np.ones((n, 1), np.int64), settings, vocab_size=len(LOGITS),
                   attention_mask=np.ones((n, 1), np.int64))
    freq = np.bincount(ids[:, 1], minlength=len(LOGITS)) / n
    p = _softmax(LOGITS / options.get("temperature", 1.0))
    if options["top_k"]:
        p[options["top_k"]:] = 0                         # LOGITS are sorted: the k largest come first
    else:
        keep = np.cumsum(p) - p < options["top_p"]       # tokens before which the mass is still below p
        p[~keep] = 0
    p /= p.sum()
    assert (freq[p == 0] == 0).all()
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / n))


def test_numpy_sampling_without_replacement():
    """Several draws per row (beam sampling's 2 x beams candidates): distinct tokens, the first
    distributed as softmax, the second as softmax without the first (Gumbel top-k draws the
    sequential sampling without replacement)."""
    from blip_runtime.numpy_engine import NumpyOps
    n = 20_000
    ops = NumpyOps(np.random.default_rng(5))
    draws, _ = ops.sample(None, np.tile(LOGITS, (n, 1)), 2)
    assert (draws[:, 0] != draws[:, 1]).all()
    p = _softmax(LOGITS)
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=6) / n, p, atol=5 * np.sqrt(0.25 / n))
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(6) if i != j) for j in range(6)])
    np.testing.assert_allclose(np.bincount(draws[:, 1], minlength=6) / n, second, atol=5 * np.sqrt(0.25 / n))


@pytest.mark.parametrize("container", [tuple, list, dict])
@pytest.mark.parametrize("case", ["beam", "beam_nrs_length_penalty"])
def test_numpy_beam_search_reorders_a_nested_cache(reference, container, case):  # noqa: F811
    """A step whose cache is a tuple, list or dict of arrays: beam search reorders the rows of every array in
    it (``reorder_rows``), so the ids are transformers' (whose table model needs no cache)."""
    from blip_runtime.numpy_engine import generate
    wrap = {tuple: lambda a: (a,), list: lambda a: [a], dict: lambda a: {"prev": a}}[container]
    unwrap = (lambda c: c["prev"]) if container is dict else (lambda c: c[0])

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if cache is None else unwrap(cache)
        return A[tok[:, -1]] + B[prev[:, 0]] + C[pos[:, -1]], wrap(tok[:, -1:])

    kw = dict(CASES[case])
    ids = kw.pop("prompt", PROMPT)
    mask = (ids != 0).astype(np.int64)
    settings = resolve_generation(ids.shape[1], defaults={"pad_token_id": 0}, **kw)
    ref = _transformers(reference, ids, mask, dict(kw, pad_token_id=0))
    got = generate(step, ids, settings, vocab_size=V, attention_mask=mask)
    np.testing.assert_array_equal(got, ref["sequences"])


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=0.5)])
def test_numpy_context_reaches_each_inputs_beams(options):
    """``context`` has one row per input; the engine repeats it per beam, so each input's beams see that
    input's rows. Reference: transformers on each input alone, with a table model whose token table is
    shifted by that input's bias (the step adds the context row to every logit)."""
    import torch

    from blip_runtime.numpy_engine import generate
    from test_decoding import TableConfig, TableLM
    bias = np.random.default_rng(7).normal(size=(PROMPT.shape[0], V)).astype(np.float32) * 2.0

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if cache is None else cache
        return A[tok[:, -1]] + B[prev[:, 0]] + C[pos[:, -1]] + context[0], tok[:, -1:]

    kw = dict(max_new_tokens=8, **options)
    mask = np.ones_like(PROMPT)
    settings = resolve_generation(PROMPT.shape[1], defaults={"pad_token_id": 0}, **kw)
    got = generate(step, PROMPT, settings, vocab_size=V, attention_mask=mask, context=(bias,))
    want = []
    for i in range(PROMPT.shape[0]):
        shifted = TableLM(TableConfig(vocab_size=V)).eval()
        shifted.a = torch.nn.Parameter(torch.from_numpy(A + bias[i]))     # a table of its own (A stays as it is)
        want.append(_transformers(shifted, PROMPT[i:i + 1], mask[i:i + 1], dict(kw, pad_token_id=0))["sequences"])
    np.testing.assert_array_equal(got, np.concatenate(want))
