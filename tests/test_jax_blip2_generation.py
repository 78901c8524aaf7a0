"""JAX/Flax BLIP-2 decoding against transformers 4.57 and the torch backend, on tiny random models.

The model side of the engine contract (``init_cache``, ``decoding_step``, ``decoding_context``) is checked
without the engine: greedy steps written out here must give, step by step, the logits of a full forward over
the grown sequence (torch backend). ``generate`` (the shared ``lax.while_loop`` engine) must give transformers'
and torch's greedy and beam ids for OPT with placeholders (left and right padded batches, per-step scores),
OPT concatenating the queries, and T5; seeded sampling repeats; a second call with the same shapes and plan
does not trace again.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_utils import require

torch = require("torch")
transformers = require("transformers")

import backends.torch as TB  # noqa: E402
from test_jax_blip2 import CASES, Q, _case_inputs, _pixels, _prompt, close, make_built, make_fixed, t  # noqa: E402


@pytest.fixture(autouse=True)
def strict_numerics():
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_built(tmp_path_factory)


@pytest.fixture(scope="module")
def fixed():
    return make_fixed()


# -- decoding ---------------------------------------------------------------------------------------------
def _model_and_prompt(fixed, built, case):
    """``(transformers reference, jax model, torch-backend model, pixels, ids, mask, reference ids and mask)``."""
    if case == "opt_placeholders":
        model, inputs, _, d = fixed("Blip2ForConditionalGeneration")
        ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
        px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        return ref, model, TB.Blip2ForConditionalGeneration.from_pretrained(d), px, ids, mask, ids, mask
    ref, model, torch_model, _ = built(case)
    px = _pixels(batch=3, seed=4)
    full_ids, full_mask = _prompt([5, 2, 4], 5, seed=5)           # batched prompts, left padding
    placeholders = CASES[case].get("image_token_index") is not None
    ids, mask = (full_ids, full_mask) if placeholders else (full_ids[:, Q:], full_mask[:, Q:])
    return ref, model, torch_model, px, ids, mask, full_ids, full_mask


def _steps_by_hand(model, px, ids, mask, n):
    """Greedy decoding written out with the model's ``init_cache`` / ``decoding_step``: ``(logits (B, n, V),
    tokens (B, n))``."""
    ctx = model.decoding_context(pixel_values=px, input_ids=ids, attention_mask=mask)
    step = model.decoding_step()
    b = ids.shape[0]
    prompt, pmask = (ids, mask) if model.is_decoder_only else (np.zeros((b, 1), np.int32), np.ones((b, 1), np.int32))
    p = prompt.shape[1]
    key_mask = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(jnp.asarray(pmask, jnp.int32))
    prefill = jax.jit(lambda i, km, c, x: step(i, None, km, c, 0, x))
    one = jax.jit(lambda i, km, c, index, x: step(i, None, km, c, index, x))
    prefix = ctx["prefix_mask"].shape[1] if model.is_decoder_only else 0      # the queries of the concat path
    logits, cache = prefill(jnp.asarray(prompt, jnp.int32), key_mask, model.init_cache(b, p + n, prefix), ctx)
    all_logits, tokens = [logits], [jnp.argmax(logits, -1)]
    for k in range(n - 1):
        key_mask = key_mask.at[:, p + k].set(1)
        logits, cache = one(tokens[-1][:, None].astype(jnp.int32), key_mask, cache, jnp.int32(p + k), ctx)
        all_logits.append(logits)
        tokens.append(jnp.argmax(logits, -1))
    return jnp.stack(all_logits, 1), np.asarray(jnp.stack(tokens, 1))


@pytest.mark.parametrize("case", ["opt_placeholders", pytest.param("opt_concat", marks=pytest.mark.slow), pytest.param("t5_placeholders", marks=pytest.mark.slow)])
def test_cached_steps_reproduce_the_full_forward(fixed, built, case):
    _, model, torch_model, px, ids, mask, _, _ = _model_and_prompt(fixed, built, case)
    n = 4
    logits, tokens = _steps_by_hand(model, px, ids, mask, n)
    assert logits.dtype == jnp.float32 and logits.shape[:2] == (ids.shape[0], n)
    with torch.no_grad():    # the full forward over the grown sequence, by the torch backend
        if model.is_decoder_only:
            full = torch_model(pixel_values=px, input_ids=np.concatenate([ids, tokens], 1),
                               attention_mask=np.concatenate([mask, np.ones_like(tokens)], 1)).logits[:, -(n + 1):-1]
        else:
            dec = np.concatenate([np.zeros((ids.shape[0], 1), np.int64), tokens[:, :-1]], 1)
            full = torch_model(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    close(logits, full)


def test_sampling_is_seeded(built):
    _, model, _, _ = built("t5_placeholders")
    px, ids, mask, _, _, _ = _case_inputs("t5_placeholders")
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, do_sample=True, top_k=5, max_new_tokens=4)
    a, b = model.generate(seed=11, **kw), model.generate(seed=11, **kw)
    c = model.generate(prng_key=jax.random.key(11), **kw)
    _same(a, b)
    _same(a, c)
    assert (np.asarray(a)[:, 0] == 0).all() and np.asarray(a).max() < 99


def _same(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and (ours == ref).all(), (ours.tolist(), ref.tolist())


@pytest.mark.parametrize("case", ["opt_placeholders", pytest.param("opt_concat", marks=pytest.mark.slow),
                                  pytest.param("t5_placeholders", marks=pytest.mark.slow)])  # T5: test_parity_generation
def test_generate_ids_match_transformers_and_torch(fixed, built, case):
    ref, model, torch_model, px, ids, mask, full_ids, full_mask = _model_and_prompt(fixed, built, case)
    drop = Q if case == "opt_concat" else 0      # the concatenation path returns the given ids + new tokens
    beam = dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)
    for opts in (dict(), beam) if case != "opt_concat" else (dict(),):     # the prefix is the same for beams
        with torch.no_grad():
            want = ref.generate(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask),
                                max_new_tokens=5, **opts)[:, drop:]
            tb = torch_model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=5, **opts)
        got = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=5, **opts)
        _same(got, want)
        _same(got, tb)
    if case == "t5_placeholders":
        with torch.no_grad():
            embeds = torch_model.get_input_embeddings()(t(ids)).numpy()
        _same(model.generate(pixel_values=px, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5),
              model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=5))
    if case == "opt_placeholders":
        with pytest.raises(ValueError, match="placeholder"):
            model.generate(pixel_values=px, inputs_embeds=np.zeros(ids.shape + (32,), np.float32))
        _same(model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=5),
              fixed("Blip2ForConditionalGeneration")[2]["greedy_ids"])
    # the same shapes and plan with other pixels and numbers: no second trace
    traced = model.trace_count("generate")
    model.generate(pixel_values=px[::-1].copy(), input_ids=ids, attention_mask=mask, max_new_tokens=5,
                   **(dict(beam, length_penalty=1.5) if case != "opt_concat" else {}))
    assert model.trace_count("generate") == traced


@pytest.mark.parametrize("opts", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
def test_concat_opt_generate_matches_transformers_and_torch(built, opts):
    """OPT concatenating the queries in front of the ids: every decoding step sits after the queries and the
    prompt, so the new ids and every step's scores are transformers' (its placeholder path on the same weights),
    and the ids the torch backend's."""
    ref, model, torch_model, _ = built("opt_concat")
    px = _pixels(batch=2, seed=8)
    full_ids, full_mask = _prompt([4, 2], 4, seed=9)
    ids, mask = full_ids[:, Q:], full_mask[:, Q:]
    kw = dict(max_new_tokens=4, return_dict_in_generate=True, output_scores=True, **opts)
    with torch.no_grad():
        want = ref.generate(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask), **kw)
        tb = torch_model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=4, **opts)
    got = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    _same(got.sequences, want.sequences[:, Q:])
    _same(got.sequences, tb)
    assert len(got.scores) == len(want.scores) == 4
    for ours, theirs in zip(got.scores, want.scores):
        finite = torch.isfinite(theirs).numpy()
        assert (np.isfinite(np.asarray(ours)) == finite).all()
        close(np.asarray(ours)[finite], theirs.numpy()[finite])


def test_generate_right_padded_opt_batch_ids_and_scores(fixed):
    """The prefill's last slot is padding for two rows: its position (1 in transformers' generate) decides the
    first new token. Ids and every step's scores as transformers."""
    model, _, _, d = fixed("Blip2ForConditionalGeneration")
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
    text, text_mask = _prompt([5, 2, 4], 5, seed=7, placeholders=False)
    order = np.argsort(1 - text_mask, axis=1, kind="stable")        # real tokens first, padding after
    text, text_mask = np.take_along_axis(text, order, 1), np.take_along_axis(text_mask, order, 1)
    ids = np.concatenate([np.full((3, Q), model.config.image_token_index), text], 1)
    mask = np.concatenate([np.ones((3, Q), np.int64), text_mask], 1)
    px = _pixels(batch=3, seed=6)
    for opts in (dict(), dict(num_beams=2)):
        kw = dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True, **opts)
        with torch.no_grad():
            want = ref.generate(pixel_values=t(px), input_ids=t(ids), attention_mask=t(mask), **kw)
        got = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
        _same(got.sequences, want.sequences)
        assert len(got.scores) == len(want.scores)
        for ours, theirs in zip(got.scores, want.scores):
            finite = torch.isfinite(theirs).numpy()
            assert (np.isfinite(np.asarray(ours)) == finite).all()
            close(np.asarray(ours)[finite], theirs.numpy()[finite])


def test_generate_from_opt_inputs_embeds_alone(fixed):
    """transformers' documented call: embeddings (placeholders included) without input_ids; the output then
    holds the new tokens only."""
    model, inputs, _, d = fixed("Blip2ForConditionalGeneration")
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        embeds = ref.get_input_embeddings()(t(ids))
        for opts in (dict(), dict(num_beams=2)):
            want = ref.generate(pixel_values=t(px), inputs_embeds=embeds, attention_mask=t(mask), max_new_tokens=5,
                                **opts)
            got = model.generate(pixel_values=px, inputs_embeds=embeds.numpy(), attention_mask=mask,
                                 max_new_tokens=5, **opts)
            _same(got, want)


def test_generate_default_prompt_and_errors(fixed):
    model, inputs, _, d = fixed("Blip2ForConditionalGeneration")
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
    px = inputs["pixel_values"]
    with torch.no_grad():
        want = ref.generate(pixel_values=t(px), max_new_tokens=3)
    got = model.generate(pixel_values=px, max_new_tokens=3)
    _same(got, want)
    assert (np.asarray(got)[:, :Q] == model.config.image_token_index).all()
    for bad in (dict(bogus_option=1), dict(num_beams=2, num_return_sequences=3), dict(generator=object())):
        with pytest.raises(ValueError):
            model.generate(pixel_values=px, max_new_tokens=2, **bad)


def test_beam_scores_keep_a_row_per_beam(fixed):
    """Beam search returning fewer sequences than beams (3 inputs, a padded batch inside): every step's
    scores hold one row per beam (inputs x num_beams), ``sequences_scores`` one per returned sequence,
    as transformers."""
    model, _, _, d = fixed("Blip2ForConditionalGeneration")
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
    text, text_mask = _prompt([5, 2, 4], 5, seed=3, placeholders=False)
    ids = np.concatenate([np.full((3, Q), model.config.image_token_index), text], 1)
    mask = np.concatenate([np.ones((3, Q), np.int64), text_mask], 1)
    px = _pixels(batch=3, seed=2)
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, return_dict_in_generate=True,
              output_scores=True)
    with torch.no_grad():
        want = ref.generate(pixel_values=t(px), input_ids=t(ids), attention_mask=t(mask), **kw)
    got = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    _same(got.sequences, want.sequences)
    assert np.asarray(got.sequences_scores).shape == (6,)
    close(np.asarray(got.sequences_scores), want.sequences_scores.numpy())
    assert len(got.scores) == len(want.scores)
    for ours, theirs in zip(got.scores, want.scores):
        assert np.asarray(ours).shape == tuple(theirs.shape) == (9, model.config.text_config.vocab_size)
        finite = torch.isfinite(theirs).numpy()
        assert (np.isfinite(np.asarray(ours)) == finite).all()
        close(np.asarray(ours)[finite], theirs.numpy()[finite])


def test_an_explicit_prng_key_decides_the_draws(fixed):
    """A given ``prng_key`` is what sampling draws from: the same key repeats the ids, and ``seed=s`` is
    ``prng_key=jax.random.key(s)`` (the documented rule)."""
    model, inputs, _, _ = fixed("Blip2ForConditionalGeneration")
    kw = dict(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
              attention_mask=inputs["attention_mask"], do_sample=True, temperature=2.0, max_new_tokens=8)
    a = model.generate(prng_key=jax.random.key(5), **kw)
    b = model.generate(prng_key=jax.random.key(5), **kw)
    _same(a, b)
    _same(a, model.generate(seed=5, **kw))
