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
