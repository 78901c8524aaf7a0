"""Seeded init is drawn once in the spec layer: every backend gives the same weights for a seed.

Cases are every class with every config variant of ``tests/fixtures/models`` (a tower class also
gets the tower configs inside the composite ones). Weights are compared through each backend's
own export (``save_pretrained``), read back as canonical numpy arrays.
"""
import glob
import json
import math
import os

import numpy as np
import pytest

import backends.jax
import backends.tf
import backends.torch
from backends.jax._base import flatten as jax_flatten
from blip_core.checkpoint import load_state_dict
from blip_core.configs import config_from_dict
from blip_core.pretrained import config_for
from blip_core.weights import ARCHITECTURES, init_rules, random_weights, weight_table
from hf_configs import OPT_TEXT, blip2_config, blip_config

MODELS_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "models")
FIXTURES = sorted(glob.glob(os.path.join(MODELS_DIR, "*")))
MODULES = {"torch": backends.torch, "jax": backends.jax, "tf": backends.tf}


def _variants():
    """(id, class, config) for every class and every distinct config the fixtures hold for it."""
    out = []
    for arch in ARCHITECTURES:
        seen = set()
        for d in FIXTURES:
            try:
                cfg = config_for(arch, d)
            except ValueError:
                continue
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append((f"{arch}-{os.path.basename(d)}", arch, cfg))
    return out


VARIANTS = _variants()


def _fixture_config(arch):
    return config_for(arch, os.path.join(MODELS_DIR, arch))


def _backends_of(arch):
    """Backends implementing ``arch``; BLIP classes must exist in all three."""
    names = [b for b, m in MODULES.items() if hasattr(m, arch)]
    assert names[0] == "torch" and (arch.startswith("Blip2") or len(names) == 3), (arch, names)
    return names


def _exported(model, path):
    model.save_pretrained(str(path))
    return load_state_dict(str(path))


def test_every_class_has_a_variant_and_blip2_has_both_language_models():
    assert {v[1] for v in VARIANTS} == set(ARCHITECTURES)
    lms = {type(cfg.text_config).__name__ for _, arch, cfg in VARIANTS if arch == "Blip2Model"}
    assert lms == {"OPTConfig", "T5Config"}


@pytest.mark.parametrize("arch, cfg", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_same_seed_same_weights_in_every_backend(arch, cfg, tmp_path):
    table = weight_table(arch, cfg)
    want = {s: random_weights(arch, cfg, s) for s in (0, 1)}
    models = {b: getattr(MODULES[b], arch)(cfg, seed=0) for b in _backends_of(arch)}
    for backend, model in models.items():
        got = _exported(model, tmp_path / backend)
        assert sorted(got) == sorted(want[0]), backend
        for name, value in want[0].items():
            assert got[name].dtype == np.float32 and np.array_equal(got[name], value), (backend, name)
    # a different seed changes every drawn row, and only the constant rows stay
    for name, rule in init_rules(arch, cfg).items():
        same = np.array_equal(want[0][name], want[1][name])
        assert same == (rule.dist == "constant"), name
    # tied rows in torch share their target's tensor
    state = models["torch"].state_dict(keep_vars=True)
    for name, spec in table.items():
        if spec.tied_to is not None:
            assert state[name] is state[spec.tied_to], name


@pytest.mark.parametrize("backend", list(MODULES))
def test_seed_is_reproducible_and_matters_in_each_backend(backend):
    cfg = _fixture_config("BlipForQuestionAnswering")
    cls = MODULES[backend].BlipForQuestionAnswering
    a, b, c = (cls(cfg, seed=s) for s in (5, 5, 6))
    export = {"torch": lambda m: {k: v.numpy() for k, v in m.state_dict().items()},
              "jax": lambda m: {"/".join(k): v for k, v in jax_flatten(m.params).items()},
              "tf": lambda m: {k: v.numpy() for k, v in m.params.items()}}[backend]
    ea, eb, ec = export(a), export(b), export(c)
    assert all(np.array_equal(ea[k], eb[k]) for k in ea)
    key = next(k for k in ea if "query" in k and ("weight" in k or "kernel" in k))
    assert not np.array_equal(ea[key], ec[key])


def test_bfloat16_init_is_the_float32_draw_rounded_the_same_everywhere(tmp_path):
    import ml_dtypes
    cfg = _fixture_config("BlipForConditionalGeneration")
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_weights("BlipForConditionalGeneration", cfg, 0).items()}
    for backend, module in MODULES.items():
        got = _exported(module.BlipForConditionalGeneration(cfg, seed=0, dtype="bfloat16"), tmp_path / backend)
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name].view(np.uint16),
                                                                     value.view(np.uint16)), (backend, name)


def test_distributions_follow_each_sub_config():
    """Big tensors: each weight's std is its own sub-config's range; biases 0, norms 1, constants exact."""
    cfg = blip_config(vision=dict(hidden_size=128, intermediate_size=256, initializer_range=0.05),
                      text=dict(hidden_size=128, intermediate_size=256, vocab_size=300, initializer_range=0.03),
                      projection_dim=128, logit_scale_init_value=1.5).to_dict()
    cfg = config_from_dict(dict(cfg, initializer_range=0.04))   # transformers' BlipConfig pins it to 0.02
    w = random_weights("BlipModel", cfg, 0)

    def close(name, std):
        assert w[name].size >= 16_000 and abs(w[name].std() / std - 1) < 0.03 and abs(w[name].mean()) < std / 20, name

    close("vision_model.encoder.layers.0.mlp.fc1.weight", 0.05)
    close("text_model.encoder.layer.0.intermediate.dense.weight", 0.03)
    close("text_model.embeddings.word_embeddings.weight", 0.03)
    close("visual_projection.weight", 0.04)
    class_pos = np.concatenate([w["vision_model.embeddings.class_embedding"].ravel(),
                                w["vision_model.embeddings.position_embedding"].ravel()])
    assert abs(class_pos.std() / 0.05 - 1) < 0.1 and np.abs(class_pos).max() <= 2.0
    assert float(w["logit_scale"]) == np.float32(1.5)
    table = weight_table("BlipModel", cfg)
    for name, spec in table.items():
        if spec.kind == "bias":
            assert not w[name].any(), name
        elif spec.kind == "norm_weight":
            assert (w[name] == 1.0).all(), name

    cfg2 = blip2_config(text=dict(OPT_TEXT, hidden_size=64, vocab_size=300, init_std=0.07), num_query_tokens=64,
                        qformer=dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=1)).to_dict()
    cfg2 = config_from_dict(dict(cfg2, initializer_range=0.04))
    w2 = random_weights("Blip2ForConditionalGeneration", cfg2, 0)
    queries = w2["query_tokens"]                     # drawn on purpose; transformers zero-fills them
    assert abs(queries.std() / 0.04 - 1) < 0.03
    emb = w2["language_model.model.decoder.embed_tokens.weight"]
    pad = cfg2.text_config.pad_token_id
    assert not emb[pad].any() and abs(np.delete(emb, pad, 0).std() / 0.07 - 1) < 0.03


def test_a_row_draw_depends_on_its_name_not_on_the_table():
    cfg = _fixture_config("BlipForQuestionAnswering")
    vqa = random_weights("BlipForQuestionAnswering", cfg, 3)
    cap = random_weights("BlipForConditionalGeneration", cfg, 3)
    shared = set(vqa) & set(cap)
    assert len(shared) > 50 and all(np.array_equal(vqa[k], cap[k]) for k in shared)


def test_bad_seeds_are_refused():
    cfg = _fixture_config("BlipVisionModel")
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            random_weights("BlipVisionModel", cfg, seed)


def test_torch_seed_none_draws_nothing(monkeypatch, tmp_path):
    """``seed=None`` (what from_pretrained uses) skips the draw entirely."""
    import backends.torch._base as base
    d = os.path.join(MODELS_DIR, "BlipForConditionalGeneration")

    def refuse(*args, **kwargs):
        raise AssertionError("random init ran")
    monkeypatch.setattr(base, "iter_random_weights", refuse)
    backends.torch.BlipForConditionalGeneration(config_for("BlipForConditionalGeneration", d), seed=None)
    loaded = backends.torch.BlipForConditionalGeneration.from_pretrained(d)
    assert np.array_equal(loaded.state_dict()["text_decoder.cls.predictions.bias"].numpy(),
                          load_state_dict(d)["text_decoder.cls.predictions.bias"])


# -- the rules are transformers' own ---------------------------------------------------------------------
def _hf_case(d):
    import transformers
    arch = os.path.basename(d)
    return arch, getattr(transformers, arch)(getattr(transformers, arch).config_class.from_pretrained(d))


def _check_against_transformers(arch, hf, cfg):
    """Per row: transformers' constants exactly, its std within sampling error, its zeroed rows.

    The one planned difference: BLIP-2 ``query_tokens`` (transformers zero-fills them; drawn here at the
    composite config's ``initializer_range``).
    """
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = random_weights(arch, cfg, 0)
    for name, rule in init_rules(arch, cfg).items():
        h, o = ref[name], ours[name]
        tol = 5 / math.sqrt(2 * h.size) + 0.01          # sampling error of a std over h.size values
        if name == "query_tokens":
            assert not h.any() and rule.dist == "normal" and rule.std == np.float32(cfg.initializer_range)
            assert abs(math.log(o.std() / rule.std)) < tol
        elif (h == h.flat[0]).all():
            assert rule.dist == "constant" and (o == h.flat[0]).all(), name
        else:
            assert rule.dist != "constant" and abs(math.log(h.std() / rule.std)) < tol, name
            assert abs(math.log(o.std() / rule.std)) < tol, name
            if h.ndim == 2:
                assert np.array_equal(~h.any(axis=1), ~o.any(axis=1)), name


@pytest.mark.parametrize("d", FIXTURES, ids=[os.path.basename(d) for d in FIXTURES])
def test_rules_match_transformers_init(d):
    import torch
    torch.manual_seed(0)
    arch, hf = _hf_case(d)
    _check_against_transformers(arch, hf, config_for(arch, d))


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_t5_rules_match_transformers_init_where_every_size_differs(factor):
    """T5's Mesh TensorFlow scaling needs sizes the fixtures make equal kept apart: d_model 64, d_kv 24 with
    4 heads (96 wide), d_ff 256, and an ``initializer_factor`` other than 1; the Q-Former, vision tower and
    composite config each get their own range."""
    import torch
    import transformers
    from hf_configs import T5_TEXT
    hf_cfg = blip2_config(text=dict(T5_TEXT, vocab_size=300, d_model=64, d_kv=24, num_heads=4, d_ff=256,
                                    initializer_factor=factor),
                          vision=dict(initializer_range=0.05), qformer=dict(initializer_range=0.03),
                          initializer_range=0.04, num_query_tokens=64)
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(hf_cfg)
    cfg = config_from_dict(hf_cfg.to_dict())
    _check_against_transformers("Blip2ForConditionalGeneration", hf, cfg)


@pytest.mark.parametrize("std", [0.02, 1.5])
def test_truncated_rows_follow_torchs_trunc_normal(std):
    """Vision class and position embeddings: torch's ``trunc_normal_(std=std)``, whose bounds are -2 and 2 in
    absolute terms: compared by quantiles with torch's own draw of as many values."""
    import torch
    cfg = blip_config(vision=dict(hidden_size=256, image_size=384, patch_size=16, initializer_range=std,
                                  num_attention_heads=4, intermediate_size=37))
    w = random_weights("BlipVisionModel", config_from_dict(cfg.to_dict()), 0)
    ours = np.concatenate([w["embeddings.class_embedding"].ravel(), w["embeddings.position_embedding"].ravel()])
    torch.manual_seed(0)
    ref = torch.nn.init.trunc_normal_(torch.empty(ours.size), std=std).numpy()
    assert np.abs(ours).max() <= 2.0
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    np.testing.assert_allclose(np.quantile(ours, qs), np.quantile(ref, qs), rtol=0, atol=0.05 * std)   # ~3.5 s.e. at 1%
