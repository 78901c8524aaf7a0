"""One signature per public method, the same in every backend and compatible with transformers 4.57.

* Every backend exports the same model classes.
* For every public method (forward / ``__call__``, generate, the feature getters, from_pretrained,
  save_pretrained) the parameters (names, order, kinds, defaults) are identical in torch, TF and JAX;
  the only backend-specific parameter is JAX's trailing ``params`` (the weights to run with).
* transformers' explicit parameters of the same method are a prefix of ours, in the same order, so a
  positional call means the same thing; where transformers gives a default other than None, ours is
  that default. ``from_pretrained`` / ``save_pretrained`` take a path here (no hub, no ``*model_args``),
  so only the model-call methods are held to transformers.

A few behaviour checks follow for the parameters that only some backends used to have.
"""
import dataclasses
import inspect

import numpy as np
import pytest
import torch
import transformers

import backends.jax as bj
import backends.tf as btf
import backends.torch as bt
from blip_core import outputs as outputs_mod
from blip_core import to_numpy
from blip_core.configs import load_config
from blip_core.exports import SHARED
from blip_core.numerics import tolerance
from fixture_utils import CLASSES, MODELS, fixture

BACKENDS = {"torch": bt, "tf": btf, "jax": bj}
CALLS = ["forward", "generate", "get_text_features", "get_image_features", "get_multimodal_features",
         "get_qformer_features"]
FILES = ["from_pretrained", "save_pretrained"]
# transformers parameters this library does not take, allowed only at the end of transformers' list:
# cache_position indexes transformers' static KV cache, which no backend here exposes.
UNSUPPORTED_TRAILING = {"cache_position"}
ATOL = tolerance("default", "float32")[0]


def _models(module):
    """The backend's own model classes (not the shared configs / processors, not the TF / Flax aliases)."""
    return {n for n in module.__all__ if n.startswith("Blip") and n not in SHARED}


def _method(module, cls_name, method):
    cls = getattr(module, cls_name)
    if method == "forward" and module is bj:
        return cls.__call__                      # a JAX model is called directly
    return getattr(cls, method, None)


def _params(fn, backend):
    """``[(name, kind, default)]`` without self/cls; JAX's trailing ``params`` is checked and dropped."""
    ps = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    if backend == "jax":
        named = [p for p in ps if p.kind is not p.VAR_KEYWORD]
        if named and named[-1].name == "params":
            assert named[-1].default is None
            ps.remove(named[-1])
    return [(p.name, p.kind, p.default) for p in ps]


def _cases(methods):
    return [(c, m) for c in sorted(_models(bt)) for m in methods if _method(bt, c, m) is not None]


def test_every_backend_exports_the_same_model_classes():
    names = {k: _models(m) for k, m in BACKENDS.items()}
    assert names["torch"] == names["tf"] == names["jax"] == set(CLASSES)
    public = {k: {n for n in m.__all__ if not n.startswith(("TF", "Flax"))} for k, m in BACKENDS.items()}
    assert public["torch"] == public["tf"] == public["jax"] == set(CLASSES) | set(SHARED)
    # and every backend has the same methods on each of them
    for c in CLASSES:
        have = {k: {m for m in CALLS + FILES if _method(M, c, m) is not None} for k, M in BACKENDS.items()}
        assert have["torch"] == have["tf"] == have["jax"], (c, have)


@pytest.mark.parametrize("cls_name,method", _cases(CALLS + FILES))
def test_signature_is_the_same_in_every_backend(cls_name, method):
    sigs = {k: _params(_method(M, cls_name, method), k) for k, M in BACKENDS.items()}
    assert sigs["torch"], (cls_name, method)
    assert sigs["tf"] == sigs["torch"], f"{cls_name}.{method}\n torch {sigs['torch']}\n tf    {sigs['tf']}"
    assert sigs["jax"] == sigs["torch"], f"{cls_name}.{method}\n torch {sigs['torch']}\n jax   {sigs['jax']}"


def test_jax_calls_end_with_params():
    """The one parameter JAX adds is ``params``, last before any ``**kwargs``."""
    for c, m in _cases(CALLS):
        if m == "generate":
            continue
        names = [p.name for p in inspect.signature(_method(bj, c, m)).parameters.values()
                 if p.kind is not p.VAR_KEYWORD]
        assert names[-1] == "params", (c, m, names)


@pytest.mark.parametrize("cls_name,method", [(c, m) for c, m in _cases(CALLS)
                                             if getattr(getattr(transformers, c), m, None) is not None])
def test_transformers_parameters_are_a_prefix_of_ours(cls_name, method):
    ref = inspect.signature(getattr(getattr(transformers, cls_name), method))
    theirs = [p for p in ref.parameters.values() if p.name != "self" and p.kind in
              (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in theirs]
    dropped = [n for n in names if n in UNSUPPORTED_TRAILING]
    assert names[len(names) - len(dropped):] == dropped, f"unsupported parameters not at the end: {names}"
    theirs = theirs[:len(theirs) - len(dropped)]
    ours = _params(_method(bt, cls_name, method), "torch")
    assert [n for n, _, _ in ours[:len(theirs)]] == [p.name for p in theirs], \
        f"{cls_name}.{method}\n transformers {[p.name for p in theirs]}\n ours         {[n for n, _, _ in ours]}"
    for p, (name, kind, default) in zip(theirs, ours):
        assert kind is p.POSITIONAL_OR_KEYWORD or kind is p.kind, (name, kind)
        if p.default is not p.empty and p.default is not None:
            assert default == p.default, f"{cls_name}.{method}({name}): default {default!r}, transformers {p.default!r}"
    # a **kwargs of ours must not swallow an argument transformers names explicitly
    assert all(k is not inspect.Parameter.VAR_POSITIONAL for _, k, _ in ours)


# -- behaviour of the parameters that were added or moved ------------------------------------------------------
def test_jax_return_dict_false_gives_the_tuple():
    d, inputs, _ = fixture("BlipVisionModel")
    model = bj.BlipVisionModel.from_pretrained(d)
    out = model(inputs["pixel_values"])
    tup = model(inputs["pixel_values"], return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple()) == 2
    for a, b in zip(tup, out.to_tuple()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vision_interpolate_pos_encoding_is_second_in_torch():
    d, inputs, _ = fixture("BlipVisionModel")
    model = bt.BlipVisionModel.from_pretrained(d).eval()
    px = torch.from_numpy(np.repeat(np.repeat(inputs["pixel_values"], 2, axis=2), 2, axis=3))   # 64 x 64
    with torch.no_grad():
        positional = model(px, True).last_hidden_state
        keyword = model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
    assert positional.shape[1] == keyword.shape[1] > 17
    assert torch.equal(positional, keyword)


def _text_model(module, d):
    model = module.BlipTextModel.from_pretrained(d)
    return model.eval() if module is bt else model


def _text_run(module, model, **kw):
    if module is bt:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    return model(**kw)


def test_text_model_encoder_embeds_skip_the_embeddings_in_every_backend():
    d, inputs, _ = fixture("BlipTextModel")
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 7, 32)).astype(np.float32)
    got = {}
    for k, M in BACKENDS.items():
        model = _text_model(M, d)
        out = _text_run(M, model, encoder_embeds=embeds, attention_mask=inputs["attention_mask"],
                        encoder_hidden_states=inputs["encoder_hidden_states"])
        got[k] = np.asarray(to_numpy(out.last_hidden_state))
        ids_out = _text_run(M, model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            encoder_hidden_states=inputs["encoder_hidden_states"])
        assert np.abs(np.asarray(to_numpy(ids_out.last_hidden_state)) - got[k]).max() > 1e-2   # really other input
    for k in ("tf", "jax"):
        assert np.abs(got[k] - got["torch"]).max() <= ATOL, k


@pytest.mark.parametrize("backend", ["tf", "jax"])
def test_text_model_refuses_head_mask_and_past_key_values_and_accepts_use_cache(backend):
    d, inputs, _ = fixture("BlipTextModel")
    M = BACKENDS[backend]
    model = _text_model(M, d)
    base = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(NotImplementedError, match="head_mask"):
        model(**base, head_mask=np.ones((2, 4), np.float32))
    with pytest.raises(NotImplementedError, match="generate"):
        model(**base, past_key_values=((np.zeros((2, 4, 1, 8), np.float32),) * 2,) * 2)
    plain = model(**base)
    cached = model(**base, use_cache=True, is_decoder=True)
    assert cached.past_key_values is None                       # no cache is returned
    causal = model(**base, is_decoder=True)
    np.testing.assert_array_equal(np.asarray(to_numpy(cached.last_hidden_state)),
                                  np.asarray(to_numpy(causal.last_hidden_state)))
    assert np.abs(np.asarray(to_numpy(plain.last_hidden_state)) -
                  np.asarray(to_numpy(causal.last_hidden_state))).max() > 1e-3


def test_blip2_model_positional_call_means_what_it_means_in_transformers():
    """``Blip2Model(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels)``:
    the sixth positional argument is ``labels`` (transformers has no ``inputs_embeds`` there)."""
    d, inputs, _ = fixture("Blip2Model")
    cfg = load_config(d)
    px, ids = inputs["pixel_values"], inputs["input_ids"]
    mask = inputs.get("attention_mask", np.ones_like(ids))
    labels = np.where(mask == 0, -100, ids)
    if cfg.image_token_index is not None:
        labels = np.where(ids == cfg.image_token_index, -100, labels)
    for k, M in BACKENDS.items():
        model = M.Blip2Model.from_pretrained(d)
        if M is bt:
            model = model.eval()
            with torch.no_grad():
                pos = model(*(torch.from_numpy(x) if x is not None else None
                              for x in (px, ids, mask, None, None, labels)))
                kw = model(pixel_values=torch.from_numpy(px), input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
        else:
            pos = model(px, ids, mask, None, None, labels)
            kw = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        assert pos.loss is not None, k
        assert float(to_numpy(pos.loss)) == float(to_numpy(kw.loss)), k


def test_torch_generate_takes_generator_from_its_keywords():
    """``generator`` is no parameter of generate (tf and jax have none) but torch still samples with it."""
    d, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(d).eval()
    px = torch.from_numpy(inputs["pixel_values"])
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)              # the global generator differs; the given one decides
        runs.append(model.generate(px, do_sample=True, max_new_tokens=6,
                                   generator=torch.Generator().manual_seed(0)))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(1)
    unseeded = [model.generate(px, do_sample=True, max_new_tokens=6) for _ in range(4)]
    assert any(not torch.equal(u, unseeded[0]) for u in unseeded[1:])   # sampling does depend on the generator


# -- output containers: transformers' fields, order and dict / tuple behaviour --------------------------------
def _hf_output_class(name):
    from transformers import modeling_outputs
    from transformers.models.blip import modeling_blip
    from transformers.models.blip_2 import modeling_blip_2
    for module in (modeling_blip, modeling_blip_2, modeling_outputs):
        cls = getattr(module, name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls
    raise AssertionError(f"transformers 4.57 has no output class {name}")


OUTPUT_NAMES = [n for n in outputs_mod.__all__ if n not in ("ModelOutput", "GenerateOutput")]


@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_output_classes_have_transformers_fields_in_order(name):
    """Each output class has the fields of transformers' class of the same name, in the same order, so that
    ``out[i]`` and ``to_tuple()`` mean what they mean there."""
    ours = [f.name for f in dataclasses.fields(getattr(outputs_mod, name))]
    assert ours == [f.name for f in dataclasses.fields(_hf_output_class(name))]


def test_output_dict_and_tuple_access_is_transformers():
    """None fields are not keys: ``keys()``, ``len``, ``in``, ``out[i]``, ``to_tuple()`` (nested outputs as
    tuples) and ``out[key]`` (KeyError for a None field) behave as transformers' ``ModelOutput``."""
    logits, embeds, hidden = np.ones((1, 2)), np.zeros((1, 3)), np.full((1, 4), 2.0)
    kw = dict(logits=logits, image_embeds=embeds)
    ours = outputs_mod.BlipForConditionalGenerationModelOutput(**kw)
    ref = _hf_output_class("BlipForConditionalGenerationModelOutput")(**kw)
    assert list(ours.keys()) == list(ref.keys()) == ["logits", "image_embeds"]
    assert len(ours) == len(ref) == 2 and len(ours.to_tuple()) == len(ref.to_tuple()) == 2
    assert ("loss" in ours) == ("loss" in ref) is False and ("logits" in ours) is True
    assert ours[0] is logits and ours[1] is embeds and ours["image_embeds"] is embeds
    with pytest.raises(KeyError):
        ref["loss"]
    with pytest.raises(KeyError):
        ours["loss"]
    inner = outputs_mod.BaseModelOutputWithPooling(last_hidden_state=hidden)
    outer = outputs_mod.BlipOutput(logits_per_image=logits, vision_model_output=inner)
    assert outer.keys() == ["logits_per_image", "vision_model_output"]
    tup = outer.to_tuple()
    assert tup[0] is logits and tup[1] == (hidden,)


@pytest.mark.parametrize("backend", ["torch", "tf", "jax"])
def test_blip_model_tuple_output_is_transformers_order(backend):
    """``return_dict=False`` (and ``out[i]``) of BlipModel: logits_per_image, then logits_per_text, as in
    transformers' tuple (the fixture's reference)."""
    d, inputs, reference = fixture("BlipModel")
    model = getattr(BACKENDS[backend], "BlipModel").from_pretrained(d)
    tup = model(**inputs, return_dict=False)
    out = model(**inputs)
    np.testing.assert_allclose(to_numpy(tup[0]), reference["logits_per_image"], atol=ATOL)
    np.testing.assert_allclose(to_numpy(tup[1]), reference["logits_per_image"].T, atol=ATOL)
    np.testing.assert_allclose(to_numpy(out[0]), reference["logits_per_image"], atol=ATOL)
