"""Weight tables agree with transformers' PyTorch state dicts, and every layout transform inverts."""
import numpy as np
import pytest
import transformers

from blip_core.configs import config_from_dict
from blip_core.weights import ARCHITECTURES, BACKENDS, TRANSFORMS, weight_table
from hf_configs import OPT_TEXT, T5_TEXT, blip2_config, blip_config

BLIP_CLASSES = ["BlipModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]
BLIP2_CLASSES = ["Blip2Model", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
                 "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"]
LM_CLASSES = ("Blip2Model", "Blip2ForConditionalGeneration")      # the BLIP-2 classes with the language model


def _cases():
    blips = {
        "tiny": blip_config(),
        "wide": blip_config(vision=dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, image_size=48,
                                        patch_size=16),
                            text=dict(hidden_size=24, num_attention_heads=2, num_hidden_layers=1, vocab_size=57)),
    }
    for key, cfg in blips.items():
        for cls in BLIP_CLASSES:
            if cls == "BlipForQuestionAnswering" and cfg.text_config.hidden_size != cfg.vision_config.hidden_size:
                continue   # no such VQA model: the table refuses it (test_configs); "wide_vqa" below
            yield f"{cls}-{key}", cls, cfg
        yield f"BlipVisionModel-{key}", "BlipVisionModel", cfg.vision_config
        yield f"BlipTextModel-{key}", "BlipTextModel", cfg.text_config
    # VQA at other sizes than "tiny": its answer decoder needs the text width equal to the vision width.
    yield "BlipForQuestionAnswering-wide_vqa", "BlipForQuestionAnswering", blip_config(
        vision=dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, image_size=48, patch_size=16),
        text=dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=1, vocab_size=57))
    texts = {
        "opt": OPT_TEXT,
        "opt_proj": dict(OPT_TEXT, word_embed_proj_dim=16),
        "t5_untied": T5_TEXT,
        "t5_tied_relu": dict(T5_TEXT, feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=3),
    }
    qformers = {"q2": {}, "q1_text": dict(use_qformer_text_input=True, cross_attention_frequency=1, num_hidden_layers=2)}
    for tkey, text in texts.items():
        for qkey, q in qformers.items():
            cfg = blip2_config(text=text, qformer=q, vision=dict(qkv_bias=(qkey == "q2")))
            for cls in BLIP2_CLASSES:
                if tkey == "opt_proj" and cls in LM_CLASSES:
                    continue   # refused: test_projected_opt_is_refused_where_queries_enter_the_lm
                yield f"{cls}-{tkey}-{qkey}", cls, cfg
            yield f"Blip2VisionModel-{tkey}-{qkey}", "Blip2VisionModel", cfg.vision_config
            yield f"Blip2QFormerModel-{tkey}-{qkey}", "Blip2QFormerModel", cfg.qformer_config


CASES = list(_cases())


@pytest.mark.parametrize("cls", LM_CLASSES)
def test_projected_opt_is_refused_where_queries_enter_the_lm(cls):
    """transformers builds these classes over an OPT whose input embeddings are narrower than its hidden size,
    then scatters the wider query rows into them element by element; the table refuses the config instead."""
    cfg = blip2_config(text=dict(OPT_TEXT, word_embed_proj_dim=16))
    getattr(transformers, cls)(cfg)          # transformers accepts it
    ours = config_from_dict(cfg.to_dict())   # the config alone (no class declared) is fine
    with pytest.raises(ValueError, match="word_embed_proj_dim must equal it, got 16"):
        weight_table(cls, ours)
    weight_table("Blip2ForImageTextRetrieval", ours)     # classes without the language model take it


def test_every_architecture_is_covered():
    assert {c[1] for c in CASES} == set(ARCHITECTURES)


@pytest.mark.parametrize("name, cls, hf_cfg", CASES, ids=[c[0] for c in CASES])
def test_names_shapes_order_and_ties_match_transformers(name, cls, hf_cfg):
    model = getattr(transformers, cls)(hf_cfg)
    sd = model.state_dict()
    table = weight_table(cls, config_from_dict(hf_cfg.to_dict()))
    assert list(table) == list(sd)
    assert {k: s.shape for k, s in table.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    # Every declared tie really shares storage in transformers, and every shared storage is declared.
    for k, spec in table.items():
        if spec.tied_to is not None:
            assert sd[k].data_ptr() == sd[spec.tied_to].data_ptr(), k
    groups = {}
    for k, v in sd.items():
        groups.setdefault(v.data_ptr(), []).append(k)
    for keys in groups.values():
        owners = [k for k in keys if table[k].tied_to is None]
        assert len(owners) == 1, keys


@pytest.mark.parametrize("name, cls, hf_cfg", CASES[:6] + CASES[-8:], ids=[c[0] for c in CASES[:6] + CASES[-8:]])
def test_every_row_round_trips_in_every_backend(name, cls, hf_cfg):
    table = weight_table(cls, config_from_dict(hf_cfg.to_dict()))
    rng = np.random.default_rng(0)
    for backend in BACKENDS:
        paths = set()
        for spec in table.values():
            a = rng.standard_normal(spec.shape).astype(np.float32)
            b = spec.to_backend(backend, a)
            assert b.shape == spec.backend_shape(backend)
            np.testing.assert_array_equal(spec.from_backend(backend, b), a)
            path = spec.backend_path(backend)
            assert path not in paths, (backend, path)
            paths.add(path)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_invert(name):
    t = TRANSFORMS[name]
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) if name == "conv2d" else \
        np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(t.inverse(t.forward(a)), a)


def test_backend_paths_follow_the_documented_rules():
    cfg = config_from_dict(blip_config().to_dict())
    table = weight_table("BlipForConditionalGeneration", cfg)
    spec = table["vision_model.encoder.layers.1.self_attn.qkv.weight"]
    assert spec.backend_path("torch") == "vision_model.encoder.layers.1.self_attn.qkv.weight"
    assert spec.backend_path("jax") == ("vision_model", "encoder", "layers_1", "self_attn", "qkv", "kernel")
    assert spec.backend_path("tf") == "vision_model/encoder/layers_1/self_attn/qkv/kernel"
    ln = table["vision_model.post_layernorm.bias"]
    assert ln.backend_path("tf").endswith("post_layernorm/beta") and ln.backend_path("jax")[-1] == "bias"
    emb = table["text_decoder.bert.embeddings.word_embeddings.weight"]
    assert emb.backend_path("jax")[-1] == "embedding" and emb.backend_path("tf").endswith("embeddings")
    assert table["text_decoder.cls.predictions.decoder.weight"].tied_to == emb.name


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        weight_table("BlipForEverything", None)


OPT_FINAL_NORM_VARIANTS = {"post_norm": dict(OPT_TEXT, do_layer_norm_before=False),
                           "final_norm_removed": dict(OPT_TEXT, _remove_final_layer_norm=True)}


@pytest.mark.parametrize("variant", sorted(OPT_FINAL_NORM_VARIANTS))
@pytest.mark.parametrize("cls", LM_CLASSES)
def test_opt_without_a_final_layer_norm_matches_transformers(cls, variant):
    """An OPT decoder has ``final_layer_norm`` only when it is pre-norm and the config does not remove it
    (OPT-350m is post-norm): the table's names and shapes are transformers' state dict's."""
    hf_cfg = blip2_config(text=OPT_FINAL_NORM_VARIANTS[variant])
    sd = getattr(transformers, cls)(hf_cfg).state_dict()
    table = weight_table(cls, config_from_dict(hf_cfg.to_dict()))
    assert "language_model.model.decoder.final_layer_norm.weight" not in sd
    assert list(table) == list(sd)
    assert {k: s.shape for k, s in table.items()} == {k: tuple(v.shape) for k, v in sd.items()}


OPT_OPTION_VARIANTS = {"untied": dict(OPT_TEXT, tie_word_embeddings=False),
                       "no_bias": dict(OPT_TEXT, enable_bias=False)}


@pytest.mark.parametrize("variant", sorted(OPT_OPTION_VARIANTS))
@pytest.mark.parametrize("cls", LM_CLASSES)
def test_opt_tying_and_bias_options_match_transformers(cls, variant):
    """``tie_word_embeddings=False`` gives OPT's ``lm_head`` a weight of its own and ``enable_bias=False`` leaves out
    the attention and FFN biases: the table's names, shapes and ties are those of transformers' state dict."""
    hf_cfg = blip2_config(text=OPT_OPTION_VARIANTS[variant])
    sd = getattr(transformers, cls)(hf_cfg).state_dict()
    table = weight_table(cls, config_from_dict(hf_cfg.to_dict()))
    assert list(table) == list(sd)
    assert {k: s.shape for k, s in table.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    groups = {}
    for k, v in sd.items():
        groups.setdefault(v.data_ptr(), []).append(k)
    shared = {k for keys in groups.values() if len(keys) > 1 for k in keys}     # names sharing storage in transformers
    declared = {k for k, s in table.items() if s.tied_to} | {s.tied_to for s in table.values() if s.tied_to}
    assert declared == shared
    head = "language_model.lm_head.weight"
    assert (table[head].tied_to is None) == (variant == "untied")
    assert any(k.endswith("self_attn.q_proj.bias") for k in table) == (variant != "no_bias")
