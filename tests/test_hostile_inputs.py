"""Hostile inputs to every backend: checked on the host before compiled code runs, one typed error,
nothing clamped or cast; inside a caller's jit, an id outside the table gives NaN, never a real row."""
import json
import shutil

import numpy as np
import pytest

from blip_core import to_numpy
from fixture_utils import fixture, require

NAME = "BlipForConditionalGeneration"


def _cls(backend):
    import importlib
    return getattr(importlib.import_module(f"backends.{backend}"), NAME)


@pytest.fixture(scope="module")
def models():
    d, _, _ = fixture(NAME)
    return {b: _cls(b).from_pretrained(d) for b in ("torch", "tf", "jax")}


@pytest.fixture(scope="module")
def inputs():
    d, _, _ = fixture(NAME)
    cfg = json.load(open(f"{d}/config.json"))
    size = cfg["vision_config"]["image_size"]
    px = np.random.RandomState(0).rand(1, 3, size, size).astype(np.float32)
    return px, cfg["text_config"]


BACKENDS = ["torch", "tf", "jax"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 99, 10**6])
def test_out_of_vocabulary_ids_are_refused(models, inputs, backend, bad):
    px, tc = inputs
    assert tc["vocab_size"] == 99
    ids = np.array([[5, bad, 7]])
    with pytest.raises(ValueError, match=f"input_ids contains token id {bad}|input_ids.*{bad}"):
        models[backend](pixel_values=px, input_ids=ids)
    with pytest.raises(ValueError, match=f"{bad}"):
        models[backend].generate(pixel_values=px, input_ids=ids, max_new_tokens=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw, match", [
    (dict(input_ids=np.array([[1, 0, 1]], bool)), "input_ids"),
    (dict(labels=np.array([["a", "b", "c"]])), "labels"),
    (dict(labels=np.array([[5, 6, 1000]])), "1000"),
    (dict(labels=np.array([[5, 6]])), "labels shape"),
])
def test_bad_ids_and_labels_are_typed_errors(models, inputs, backend, kw, match):
    px, _ = inputs
    kw = dict(kw)
    kw.setdefault("input_ids", np.array([[5, 6, 7]]))
    with pytest.raises(ValueError, match=match):
        models[backend](pixel_values=px, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_integer_or_bool_pixels_are_refused(models, inputs, backend, dtype):
    px, _ = inputs
    with pytest.raises(ValueError, match="pixel_values.*(floating|float)"):
        models[backend].generate(pixel_values=(px * 2).astype(dtype), max_new_tokens=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw, match", [
    (dict(do_sample=True, temperature=float("nan")), "temperature must be finite"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be finite"),
    (dict(max_new_tokens=3.7), "max_new_tokens must be an integer"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(num_beams=2.5), "num_beams must be an integer"),
    (dict(do_sample=True, seed="abc"), "seed must be an integer"),
    (dict(eos_token_id=500), "eos_token_id 500 is outside the vocabulary"),
    (dict(pad_token_id=-3), "pad_token_id -3 is outside the vocabulary"),
])
def test_generate_options_are_checked_up_front(models, inputs, backend, kw, match):
    px, _ = inputs
    kw.setdefault("max_new_tokens", 2)
    with pytest.raises(ValueError, match=match):
        models[backend].generate(pixel_values=px, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_special_ids_outside_the_vocabulary_are_refused(inputs, tmp_path, backend):
    d, _, _ = fixture(NAME)
    shutil.copytree(d, tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg["text_config"]["bos_token_id"] = 500
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = _cls(backend).from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="bos_token_id=500 is outside the vocabulary"):
        model.generate(pixel_values=inputs[0], max_new_tokens=2)


def test_one_position_rule_in_every_backend(models, inputs):
    """The decoder is fed prompt + new - 1 tokens: exactly max_position_embeddings of them is accepted
    (the same ids in every backend), one more is refused before anything runs."""
    import backends.jax._base as jbase
    px, tc = inputs
    limit = tc["max_position_embeddings"]
    ids = np.random.RandomState(1).randint(1, 90, (1, limit - 1))     # prompt = ids[:, :-1]: limit - 2 tokens
    outs = [to_numpy(models[b].generate(pixel_values=px, input_ids=ids, max_new_tokens=3, min_new_tokens=3))
            for b in BACKENDS]
    assert outs[0].shape == (1, limit + 1)
    assert all(np.array_equal(o, outs[0]) for o in outs)
    for b in BACKENDS:
        with pytest.raises(ValueError, match=f"needs {limit + 1} decoder positions.*at most 3 new tokens"):
            models[b].generate(pixel_values=px, input_ids=ids, max_new_tokens=4)
    # The compiled programs went into the bounded caches.
    assert len(models["tf"]._compiled) >= 1 and any(len(v) for v in jbase._VARIANTS.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_length_stops_at_the_position_table(models, inputs, backend):
    """With no length option a long prompt gets 20 new tokens cut to what the position table holds, not a
    refusal: the ids are transformers' (which caps ``max_length`` at ``max_position_embeddings`` the same way)."""
    torch = require("torch")
    transformers = require("transformers")
    px, tc = inputs
    limit = tc["max_position_embeddings"]
    ids = np.random.RandomState(2).randint(1, 90, (1, limit - 10))      # prompt = ids[:, :-1]: 20 new would not fit
    hf = transformers.BlipForConditionalGeneration.from_pretrained(fixture(NAME)[0]).eval()
    with torch.no_grad():
        want = hf.generate(pixel_values=torch.from_numpy(px), input_ids=torch.from_numpy(ids)).numpy()
    assert want.shape[1] <= limit
    assert to_numpy(models[backend].generate(pixel_values=px, input_ids=ids)).tolist() == want.tolist()


def test_empty_batch_has_one_shape_everywhere(models, inputs):
    px, _ = inputs
    outs = [to_numpy(models[b].generate(pixel_values=px[:0], max_new_tokens=3)) for b in BACKENDS]
    assert {o.shape for o in outs} == {(0, 2)}
    assert all(np.issubdtype(o.dtype, np.integer) for o in outs)


def test_jax_ids_inside_a_callers_jit_are_nan_not_another_row(models, inputs):
    import jax
    import jax.numpy as jnp
    px, _ = inputs
    model = models["jax"]
    logits = jax.jit(lambda ids: model(pixel_values=px, input_ids=ids).logits)
    good = np.asarray(logits(jnp.array([[5, 6, 7]])))
    assert np.isfinite(good).all()
    for bad in (-1, 99, 5000):
        out = np.asarray(logits(jnp.array([[5, bad, 7]])))
        assert np.isnan(out[0, 1:]).all(), f"id {bad} under jit gave finite logits"


def test_tf_ids_inside_a_callers_xla_function_are_nan_not_clamped(models, inputs):
    import tensorflow as tf
    px, _ = inputs
    model = models["tf"]
    logits = tf.function(lambda ids: model(pixel_values=px, input_ids=ids).logits, jit_compile=True)
    good = logits(tf.constant([[5, 6, 7]])).numpy()
    assert np.isfinite(good).all()
    for bad in (-1, 99):
        out = logits(tf.constant([[5, bad, 7]])).numpy()
        assert np.isnan(out[0, 1:]).all(), f"id {bad} under XLA gave finite logits"


def test_compiled_generation_programs_are_bounded(models, monkeypatch):
    """Each (plan, shapes) variant is one compiled function in an LRU; making them compiles nothing."""
    import backends.jax._base as jbase
    from backends.tf.generation import compiled
    from blip_core.cache import LRU
    tf_model = models["tf"]
    monkeypatch.setattr(tf_model, "_compiled", LRU(2))
    fns = [compiled(tf_model, ("caption", n), lambda: None, ((1, 3),)) for n in (2, 3, 4)]
    assert len(tf_model._compiled) == 2 and len({id(f) for f in fns}) == 3
    assert compiled(tf_model, ("caption", 4), lambda: None, ((1, 3),)) is fns[2]
    monkeypatch.setattr(jbase, "COMPILE_CACHE_SIZE", 2)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    jax_model = models["jax"]
    fns = [jax_model._jit("generate", "_generate_program", ("plan", "interpolate"), variant=n) for n in (2, 3, 4)]
    assert [len(v) for v in jbase._VARIANTS.values()] == [2] and len({id(f) for f in fns}) == 3


def test_lru_keeps_the_most_recent():
    from blip_core.cache import LRU
    cache, made = LRU(2), []
    for k in ["a", "b", "a", "c", "b"]:
        cache.get(k, lambda k=k: made.append(k) or k.upper())
    assert made == ["a", "b", "c", "b"] and len(cache) == 2 and "a" not in cache
    with pytest.raises(ValueError):
        LRU(0)
