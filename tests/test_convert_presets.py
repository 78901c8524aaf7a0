"""Converting original checkpoints as people have them: presets, configs inferred from the state
dict, towers from other files, any language-model layout, CLI errors in flag terms.

Original-layout checkpoints are built here from small random models (``lavis_layout``: the
documented renaming, inverted). The preset numbers below are the released checkpoints'
(Salesforce's hub configs and the original repositories' yaml files), typed in independently.
"""
import os

import numpy as np
import pytest

from blip_core import checkpoint
from blip_core.configs import load_config
from blip_core.presets import PRESETS, preset_config
from blip_core.weights import weight_table
from blip_core.weights.init import random_weights
from converters import convert
from converters.cli import main as cli_main
from fixture_utils import MODELS
from lavis_layout import to_original, torch_save, zero_k_bias

SMALL_VISION = {"vision_config.hidden_size": 32, "vision_config.intermediate_size": 37,
                "vision_config.num_hidden_layers": 2, "vision_config.num_attention_heads": 4,
                "vision_config.image_size": 32, "vision_config.patch_size": 8}
SMALL_QFORMER = {"qformer_config.hidden_size": 32, "qformer_config.intermediate_size": 37,
                 "qformer_config.num_hidden_layers": 3, "qformer_config.num_attention_heads": 4,
                 "num_query_tokens": 4}
HEADS = {"vision_config.num_attention_heads": 4, "qformer_config.num_attention_heads": 4}
SMALL_T5 = {"text_config.vocab_size": 99, "text_config.d_model": 32, "text_config.d_kv": 8, "text_config.d_ff": 37,
            "text_config.num_layers": 2, "text_config.num_decoder_layers": 2, "text_config.num_heads": 4}


def state(path):
    return checkpoint.load_state_dict(path)


def small(name, extra=None, seed=0):
    """(architecture, config, canonical random weights) of preset ``name`` at test size."""
    arch, cfg = preset_config(name, dict(SMALL_VISION, **(extra or {})))
    return arch, cfg, random_weights(arch, cfg, seed)


def same_bytes(a, b):
    with open(os.path.join(a, "model.safetensors"), "rb") as fa, open(os.path.join(b, "model.safetensors"), "rb") as fb:
        return fa.read() == fb.read()


# -- presets -----------------------------------------------------------------------------------------------
def test_presets_carry_the_released_sizes_and_the_original_codes_settings():
    expect = {  # name: (architecture, {dotted field: released value})
        "blip-base-captioning": ("BlipForConditionalGeneration", {"vision_config.hidden_size": 768,
                                 "vision_config.image_size": 384, "vision_config.layer_norm_eps": 1e-6,
                                 "text_config.vocab_size": 30524, "text_config.num_attention_heads": 12}),
        "blip-large-captioning": ("BlipForConditionalGeneration", {"vision_config.hidden_size": 1024,
                                  "vision_config.num_hidden_layers": 24, "text_config.encoder_hidden_size": 1024}),
        "blip-base-vqa": ("BlipForQuestionAnswering", {"vision_config.image_size": 480}),
        "blip-base-retrieval": ("BlipForImageTextRetrieval", {"vision_config.image_size": 384,
                                "image_text_hidden_size": 256}),
        "blip-large-retrieval": ("BlipForImageTextRetrieval", {"vision_config.num_attention_heads": 16}),
        "blip2-opt-2.7b": ("Blip2ForConditionalGeneration", {"image_token_index": None,
                           "text_config.hidden_size": 2560, "text_config.ffn_dim": 10240,
                           "text_config.eos_token_id": 50118, "vision_config.num_hidden_layers": 39,
                           "vision_config.hidden_size": 1408, "qformer_config.encoder_hidden_size": 1408}),
        "blip2-opt-6.7b": ("Blip2ForConditionalGeneration", {"text_config.hidden_size": 4096,
                           "text_config.num_hidden_layers": 32}),
        "blip2-flan-t5-xl": ("Blip2ForConditionalGeneration", {"text_config.d_model": 2048,
                             "text_config.dense_act_fn": "gelu", "text_config.is_gated_act": True,
                             "text_config.tie_word_embeddings": False, "image_token_index": None}),
        "blip2-flan-t5-xxl": ("Blip2ForConditionalGeneration", {"text_config.d_model": 4096,
                              "text_config.num_heads": 64, "text_config.d_ff": 10240}),
        "blip2-itm-vit-g": ("Blip2ForImageTextRetrieval", {"qformer_config.use_qformer_text_input": True,
                            "qformer_config.vocab_size": 30523, "num_query_tokens": 32}),
    }
    assert set(expect) == set(PRESETS)
    for name, (arch, fields) in expect.items():
        got_arch, cfg = preset_config(name)
        assert got_arch == arch and cfg.architectures == [arch], name
        for dotted, value in fields.items():
            node = cfg
            for part in dotted.split("."):
                node = getattr(node, part)
            assert node == value, (name, dotted, node)
        assert len(weight_table(arch, cfg)) > 400     # the full-size table builds


_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
_BLIP_VISION = {"layer_norm_eps": 1e-6}                  # BLIP's vit.py (timm); the hub configs and class default say 1e-5
_BLIP_TEXT = {"num_attention_heads": 12}                 # the released models; the class default is 8
_BLIP2_T5 = {"use_decoder_only_language_model": False, "is_encoder_decoder": True}
_FLAN = {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "is_gated_act": True, "tie_word_embeddings": False,
         "decoder_start_token_id": 0, "num_layers": 24, "num_decoder_layers": 24}
_OPT_SIZES = {"2.7b": {"hidden_size": 2560, "ffn_dim": 10240, "num_attention_heads": 32},
              "6.7b": {"hidden_size": 4096, "ffn_dim": 16384, "num_attention_heads": 32}}


def _opt(size):
    width = _OPT_SIZES[size]["hidden_size"]
    return dict(_OPT_SIZES[size], num_hidden_layers=32, word_embed_proj_dim=width, eos_token_id=50118)  # LAVIS stops at "\n"


_DIFFERENCES = {  # preset: {section ("" the top level): {field: value where it differs from transformers' default}}
    "blip-base-captioning": {"vision_config": _BLIP_VISION, "text_config": _BLIP_TEXT},
    "blip-base-retrieval": {"vision_config": _BLIP_VISION, "text_config": _BLIP_TEXT},
    "blip-base-vqa": {"vision_config": dict(_BLIP_VISION, image_size=480), "text_config": _BLIP_TEXT},
    "blip-large-captioning": {"vision_config": dict(_BLIP_VISION, **_VIT_L),
                              "text_config": dict(_BLIP_TEXT, encoder_hidden_size=1024)},
    "blip-large-retrieval": {"vision_config": dict(_BLIP_VISION, **_VIT_L),
                             "text_config": dict(_BLIP_TEXT, encoder_hidden_size=1024)},
    "blip2-opt-2.7b": {"text_config": _opt("2.7b")},
    "blip2-opt-6.7b": {"text_config": _opt("6.7b")},
    "blip2-flan-t5-xl": {"": _BLIP2_T5, "text_config": dict(_FLAN, d_model=2048, d_ff=5120, num_heads=32)},
    "blip2-flan-t5-xxl": {"": _BLIP2_T5, "text_config": dict(_FLAN, d_model=4096, d_ff=10240, num_heads=64)},
    "blip2-itm-vit-g": {"qformer_config": {"vocab_size": 30523, "use_qformer_text_input": True}},   # + [DEC]
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_differ_from_transformers_defaults_only_by_the_released_sizes(name):
    """transformers' config defaults describe the base releases (blip-image-captioning-base, blip2-opt-2.7b's
    vision tower and Q-Former; OPT's and T5's shared settings): every preset field equals the default of
    transformers' class for its section except the released sizes and the settings the presets' docstring
    gives reasons for, listed in ``_DIFFERENCES``."""
    import transformers as T

    assert set(_DIFFERENCES) == set(PRESETS)
    data = preset_config(name)[1].to_dict()
    blip2 = name.startswith("blip2")
    refs = {"": T.Blip2Config() if blip2 else T.BlipConfig(),
            "vision_config": T.Blip2VisionConfig() if blip2 else T.BlipVisionConfig(),
            "text_config": T.BlipTextConfig()}
    if blip2:
        refs["qformer_config"] = T.Blip2QFormerConfig()
        refs["text_config"] = T.T5Config() if "t5" in name else T.OPTConfig()
    for section, ref in refs.items():
        ours = data[section] if section else {k: v for k, v in data.items() if not isinstance(v, dict)}
        ref = ref.to_dict()
        diff = {k: v for k, v in ours.items() if k not in ("model_type", "architectures") and k in ref and v != ref[k]}
        assert diff == _DIFFERENCES[name].get(section, {}), (section, diff)


def test_preset_for_an_original_blip_checkpoint_with_sizes_read_from_it(tmp_path, capsys):
    arch, cfg, sd = small("blip-base-captioning", {
        "text_config.hidden_size": 32, "text_config.intermediate_size": 37, "text_config.num_hidden_layers": 2,
        "text_config.num_attention_heads": 4, "text_config.vocab_size": 99, "text_config.max_position_embeddings": 40})
    torch_save(to_original(sd), tmp_path / "model_base_caption.pth")
    argv = ["convert", str(tmp_path / "model_base_caption.pth"), str(tmp_path / "out"), "--to", "torch",
            "--preset", "blip-base-captioning", "--allow-pickle-bin", "--no-progress",
            "--set", "vision_config.num_attention_heads=4", "--set", "text_config.num_attention_heads=4"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "preset 'blip-base-captioning'" in out and "vision_config.hidden_size=32" in out, out
    got = load_config(tmp_path / "out")
    assert got.to_dict() == cfg.to_dict()       # eps 1e-6 and the rest, no config written by hand
    assert got.vision_config.layer_norm_eps == 1e-6
    table = weight_table(arch, cfg)
    want = checkpoint.strip_tied(checkpoint.check_state_dict(sd, table), table)
    got_sd = state(tmp_path / "out")
    assert set(got_sd) == set(want) and all(got_sd[k].tobytes() == want[k].tobytes() for k in want)


def test_architecture_and_sizes_inferred_without_preset(tmp_path):
    _, cfg, sd = small("blip2-itm-vit-g", dict(SMALL_QFORMER, **{"qformer_config.vocab_size": 99}))
    torch_save(to_original(zero_k_bias(sd)), tmp_path / "blip2_retrieval.pth")
    with pytest.raises(ValueError, match="vision_config.num_attention_heads"):   # 32 wide: the preset's 88-wide heads do not fit
        convert(tmp_path / "blip2_retrieval.pth", tmp_path / "x", to="jax", allow_pickle_bin=True)
    report = convert(tmp_path / "blip2_retrieval.pth", tmp_path / "out", to="torch", allow_pickle_bin=True,
                     overrides=HEADS)
    text = str(report)
    assert "inferred architecture Blip2ForImageTextRetrieval" in text and "'blip2-itm-vit-g'" in text
    assert "qformer_config.vocab_size=99" in text and "num_query_tokens=4" in text, text
    got = load_config(tmp_path / "out")
    assert got.to_dict() == cfg.to_dict()
    assert got.qformer_config.use_qformer_text_input and got.image_token_index is None


def test_an_unknown_preset_is_named_as_the_error(tmp_path):
    """A misspelt preset is the error, listing the known ones, for a Hugging Face checkpoint (whose names tell no
    architecture) and an original one alike; it used to be looked up only after inferring the architecture, so a
    Hugging Face checkpoint failed with "cannot tell the architecture" instead."""
    _, _, sd = small("blip2-itm-vit-g", dict(SMALL_QFORMER, **{"qformer_config.vocab_size": 99}))
    torch_save(to_original(zero_k_bias(sd)), tmp_path / "blip2_retrieval.pth")
    for src in (tmp_path / "blip2_retrieval.pth", os.path.join(MODELS, "BlipForConditionalGeneration")):
        with pytest.raises(ValueError, match="unknown preset 'blip2-itm-vit-gg'; known: blip-base-captioning"):
            convert(src, tmp_path / "x", to="torch", allow_pickle_bin=True, preset="blip2-itm-vit-gg")
        assert not os.path.exists(tmp_path / "x")


# -- towers from other checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lavis_opt(tmp_path_factory):
    """A LAVIS-layout BLIP-2 OPT checkpoint (from the committed fixture's weights, k bias zeroed), its
    conversion, and the same checkpoint as LAVIS's trainer saves it with freeze_vit=True."""
    d = tmp_path_factory.mktemp("lavis")
    src = os.path.join(MODELS, "Blip2ForConditionalGeneration")
    lavis = to_original(zero_k_bias(state(src)))
    torch_save(lavis, d / "full.pth")
    convert(d / "full.pth", d / "full", to="torch", config=src, allow_pickle_bin=True)
    partial = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    assert "ln_vision.weight" in partial                 # trained, so saved
    torch_save(partial, d / "partial.pth")
    return d, src, lavis


def test_full_lavis_conversion_gives_back_the_weights_it_was_written_from(lavis_opt):
    """The LAVIS file was written from the fixture's weights (k bias zeroed): converting it back gives them,
    tensor for tensor, the split q_bias / v_bias fused back into [q | 0 | v]."""
    d, src, _ = lavis_opt
    want, got = zero_k_bias(state(src)), state(d / "full")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_partial_lavis_checkpoint_plus_vision_source_matches_the_full_conversion(lavis_opt, tmp_path):
    d, src, lavis = lavis_opt
    with pytest.raises(checkpoint.StateDictMismatchError, match="vision_model.encoder.layers.0"):
        convert(d / "partial.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True)
    # the bare EVA ViT file LAVIS starts from: no prefix, one block more than the model uses, no ln_vision
    eva = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    for k in [k for k in eva if k.startswith("blocks.1.")]:
        eva[k.replace("blocks.1.", "blocks.2.")] = eva[k] + 1
    torch_save(eva, tmp_path / "eva_vit_g.pth", wrap=False)
    r = convert(d / "partial.pth", tmp_path / "eva", to="torch", config=src, allow_pickle_bin=True,
                vision_model=tmp_path / "eva_vit_g.pth")
    assert r.verified and same_bytes(tmp_path / "eva", d / "full")
    assert any("left out its layer(s) 2" in n for n in r.notes), r.notes
    # a Hugging Face BLIP-2 directory (whose own post_layernorm is kept from the checkpoint) ...
    r = convert(d / "partial.pth", tmp_path / "hf", to="torch", config=src, allow_pickle_bin=True,
                vision_model=d / "full")
    assert same_bytes(tmp_path / "hf", d / "full") and any("kept from the main" in n for n in r.notes)
    # ... or a vision tower saved alone (Blip2VisionModel names), through the CLI, to another framework
    tower = {k[len("vision_model."):]: v for k, v in state(d / "full").items() if k.startswith("vision_model.")}
    checkpoint.save_state_dict(tmp_path / "tower", tower)
    assert cli_main(["convert", str(d / "partial.pth"), str(tmp_path / "jax"), "--to", "jax", "--config", src,
                     "--allow-pickle-bin", "--vision-model", str(tmp_path / "tower"), "--no-progress"]) == 0
    convert(tmp_path / "jax", tmp_path / "back", to="torch")
    assert same_bytes(tmp_path / "back", d / "full")


@pytest.mark.parametrize("layout", ["bare-decoder-bin", "sharded-safetensors"])
def test_language_model_from_any_opt_layout(lavis_opt, tmp_path, layout):
    d, src, lavis = lavis_opt
    no_lm = {k: v for k, v in lavis.items() if not k.startswith("opt_model.")}
    torch_save(no_lm, tmp_path / "nolm.pth")
    lm = {k[len("opt_model."):]: v for k, v in lavis.items() if k.startswith("opt_model.")}
    os.makedirs(tmp_path / "opt")
    if layout == "bare-decoder-bin":     # OPTModel names (decoder.*), pickled
        torch_save({k[len("model."):]: v for k, v in lm.items()}, tmp_path / "opt" / "pytorch_model.bin", wrap=False)
        with pytest.raises(checkpoint.CheckpointError, match="allow_pickle_bin=True"):   # opt-in, even for the LM
            convert(tmp_path / "nolm.pth", tmp_path / "x", to="torch", config=src, language_model=tmp_path / "opt")
    else:                                # OPTForCausalLM names, two shards, lm_head stored too
        lm["lm_head.weight"] = lm["model.decoder.embed_tokens.weight"]
        checkpoint.save_state_dict(tmp_path / "opt", lm, max_shard_size="20KB")
        assert os.path.isfile(tmp_path / "opt" / "model.safetensors.index.json")
    r = convert(tmp_path / "nolm.pth", tmp_path / "out", to="torch", config=src, allow_pickle_bin=True,
                language_model=tmp_path / "opt")
    assert r.verified and same_bytes(tmp_path / "out", d / "full")


def test_flan_t5_preset_with_language_model_directory_and_its_config(tmp_path):
    extra = dict(SMALL_QFORMER, **SMALL_T5)
    arch, cfg, sd = small("blip2-flan-t5-xl", extra)
    lavis = to_original(zero_k_bias(sd), lm="t5")
    torch_save({k: v for k, v in lavis.items() if not k.startswith("t5_model.")}, tmp_path / "blip2_t5.pth")
    lm = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    lm["encoder.embed_tokens.weight"] = lm["decoder.embed_tokens.weight"] = lm["shared.weight"]  # as .bin files hold
    os.makedirs(tmp_path / "flan-t5")
    torch_save(lm, tmp_path / "flan-t5" / "pytorch_model.bin", wrap=False)
    cfg.text_config.save_pretrained(str(tmp_path / "flan-t5"))       # the LM's own config.json gives its sizes
    argv = ["convert", str(tmp_path / "blip2_t5.pth"), str(tmp_path / "out"), "--to", "torch", "--no-progress",
            "--preset", "blip2-flan-t5-xl", "--language-model", str(tmp_path / "flan-t5"), "--allow-pickle-bin"]
    argv += [f"--set={k}={v}" for k, v in HEADS.items()]
    assert cli_main(argv) == 0
    got = load_config(tmp_path / "out")
    assert got.to_dict() == cfg.to_dict()
    assert got.text_config.dense_act_fn == "gelu" and got.image_token_index is None
    with pytest.raises(ValueError, match="language model of preset .blip2-opt-2.7b. is OPT; the checkpoint.s is T5"):
        convert(tmp_path / "blip2_t5.pth", tmp_path / "x", to="torch", preset="blip2-opt-2.7b",
                language_model=tmp_path / "flan-t5", allow_pickle_bin=True)
    table = weight_table(arch, cfg)
    want = checkpoint.strip_tied(checkpoint.check_state_dict(zero_k_bias(sd), table), table)
    out = state(tmp_path / "out")
    assert set(out) == set(want) and all(out[k].tobytes() == want[k].tobytes() for k in want)


# -- errors: flags in the CLI, arguments in the API --------------------------------------------------------
def test_errors_name_the_flag_in_the_cli_and_the_argument_in_the_api(lavis_opt, tmp_path, capsys):
    d, src, _ = lavis_opt
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle_bin=True"):
        convert(d / "full.pth", tmp_path / "x", to="torch", config=src)
    assert cli_main(["convert", str(d / "full.pth"), str(tmp_path / "x"), "--to", "torch", "--config", src]) == 1
    err = capsys.readouterr().err
    assert "--allow-pickle-bin" in err and "allow_pickle_bin" not in err, err
    # a .pth whose names say nothing about the model, and no config
    torch_save({"weird.weight": np.zeros(3, np.float32)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="architecture="):
        convert(tmp_path / "odd.pth", tmp_path / "x", to="torch", allow_pickle_bin=True)
    assert cli_main(["convert", str(tmp_path / "odd.pth"), str(tmp_path / "x"), "--to", "torch",
                     "--allow-pickle-bin"]) == 1
    err = capsys.readouterr().err
    assert "--architecture" in err and "architecture=" not in err, err
    with pytest.raises(ValueError, match="config= or preset="):
        convert(d / "full.pth", tmp_path / "x", to="torch", config=src, preset="blip2-opt-2.7b", allow_pickle_bin=True)
    assert cli_main(["convert", str(d / "full.pth"), str(tmp_path / "x"), "--to", "torch", "--config", src,
                     "--preset", "blip2-opt-2.7b", "--allow-pickle-bin"]) == 1
    assert "--config or --preset" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_qformer_from_another_checkpoint_and_strict_component_errors(lavis_opt, tmp_path):
    d, src, lavis = lavis_opt
    no_qformer = {k: v for k, v in lavis.items() if not k.startswith(("Qformer.", "query_tokens"))}
    torch_save(no_qformer, tmp_path / "noq.pth")
    r = convert(tmp_path / "noq.pth", tmp_path / "out", to="torch", config=src, allow_pickle_bin=True,
                qformer=d / "full")
    assert same_bytes(tmp_path / "out", d / "full") and any(n.startswith("qformer:") for n in r.notes)
    # a component that fills nothing, and one with names its tower has no place for: errors, nothing written
    with pytest.raises(ValueError, match="supplies no qformer weight"):
        convert(d / "full.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True, qformer=d / "full")
    odd = {k[len("vision_model."):]: v for k, v in state(d / "full").items() if k.startswith("vision_model.")}
    odd["encoder.layers.0.self_attn.rel_pos_bias"] = np.zeros(3, np.float32)
    checkpoint.save_state_dict(tmp_path / "odd", odd)
    torch_save({k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}, tmp_path / "partial.pth")
    with pytest.raises(checkpoint.StateDictMismatchError, match="rel_pos_bias"):
        convert(tmp_path / "partial.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True,
                vision_model=tmp_path / "odd")
    # a whole model of another class: its other heads are not the vision tower's business
    whole = dict(state(d / "full"), **{"itm_head.weight": np.zeros((2, 32), np.float32)})
    checkpoint.save_state_dict(tmp_path / "whole", whole)
    convert(tmp_path / "partial.pth", tmp_path / "y", to="torch", config=src, allow_pickle_bin=True,
            vision_model=tmp_path / "whole")
    assert same_bytes(tmp_path / "y", d / "full")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_original_layout_is_recognised_as_its_preset(name):
    """Names and shapes only (zero-stride arrays): a released-size original state dict gives back
    the preset's config, architecture and family chosen from the names and widths alone."""
    from converters.presets import resolve_config
    arch, cfg = preset_config(name)
    table = weight_table(arch, cfg)
    sd = {n: np.broadcast_to(np.zeros((), np.float32), s.shape) for n, s in table.items() if s.tied_to is None}
    lm = "t5" if "t5" in name else "opt"
    shapes = {k: v.shape for k, v in to_original(sd, lm=lm).items()}
    got_arch, got, notes = resolve_config(shapes)
    assert got_arch == arch and got.to_dict() == cfg.to_dict(), notes
    assert f"config from preset {name!r} (chosen by the checkpoint's widths)" in notes


def test_preset_takes_the_missing_towers_sizes_from_the_component_config(lavis_opt, tmp_path):
    d, src, lavis = lavis_opt
    torch_save({k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}, tmp_path / "partial.pth")
    fixture_cfg = load_config(src)
    tower = {k[len("vision_model."):]: v for k, v in state(d / "full").items() if k.startswith("vision_model.")}
    checkpoint.save_state_dict(tmp_path / "tower", tower)
    fixture_cfg.vision_config.save_pretrained(str(tmp_path / "tower"))      # Blip2VisionModel's own config.json
    r = convert(tmp_path / "partial.pth", tmp_path / "out", to="torch", allow_pickle_bin=True,
                preset="blip2-opt-2.7b", vision_model=tmp_path / "tower",
                overrides={"qformer_config.num_attention_heads": 4, "text_config.num_attention_heads": 4})
    assert any("vision_config sizes from the config.json" in n for n in r.notes), r.notes
    got = load_config(tmp_path / "out")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "layer_norm_eps"):
        assert getattr(got.vision_config, field) == getattr(fixture_cfg.vision_config, field), field
    assert got.image_token_index is None and got.text_config.eos_token_id == 50118   # the preset's settings
    assert same_bytes(tmp_path / "out", d / "full")


def test_t5_heads_are_read_from_the_relative_bias_and_the_head_error_names_the_flag(tmp_path, capsys):
    arch, cfg, sd = small("blip2-flan-t5-xl", dict(SMALL_QFORMER, **SMALL_T5))
    torch_save(to_original(zero_k_bias(sd), lm="t5"), tmp_path / "t5.pth")
    argv = ["convert", str(tmp_path / "t5.pth"), str(tmp_path / "out"), "--to", "torch", "--allow-pickle-bin",
            "--no-progress", "--set", "vision_config.num_attention_heads=4"]
    assert cli_main(argv) == 1      # the Q-Former's 32 wide: not a multiple of the preset's 64-wide heads
    err = capsys.readouterr().err
    assert "--set (qformer_config.num_attention_heads=N)" in err and "overrides=" not in err, err
    assert cli_main(argv + ["--set", "qformer_config.num_attention_heads=4"]) == 0
    out = capsys.readouterr().out
    assert "text_config.num_heads=4" in out and "text_config.d_kv=8" in out, out
    assert load_config(tmp_path / "out").to_dict() == cfg.to_dict()


# -- which names a tower's checkpoint may fill ---------------------------------------------------------------
def _without(lavis, *prefixes):
    return {k: v for k, v in lavis.items() if not k.startswith(prefixes)}


_HEADS_BUT = {"vision": {"qformer_config.num_attention_heads": 4, "text_config.num_attention_heads": 4},
              "language": HEADS}          # the small fixture's heads, but for the tower whose config.json is read
_TOWER = {"vision": ("vision_model", "vision_config", "visual_encoder."),
          "language": ("language_model", "text_config", "opt_model.")}   # argument, config section, LAVIS prefix


@pytest.mark.parametrize("tower", ["vision", "language"])
def test_component_whole_model_lends_its_config_sections_sizes(lavis_opt, tmp_path, tower):
    """A whole BLIP-2 directory given as one tower: that tower's sizes come from its config.json's section."""
    d, _, lavis = lavis_opt
    arg, section, prefix = _TOWER[tower]
    torch_save(_without(lavis, prefix), tmp_path / "partial.pth")
    r = convert(tmp_path / "partial.pth", tmp_path / "out", to="torch", allow_pickle_bin=True,
                preset="blip2-opt-2.7b", overrides=_HEADS_BUT[tower], **{arg: d / "full"})
    assert any(f"{section} sizes from the config.json" in n for n in r.notes), r.notes
    got = getattr(load_config(tmp_path / "out"), section)
    assert got.hidden_size == getattr(load_config(d / "full"), section).hidden_size
    assert same_bytes(tmp_path / "out", d / "full")


@pytest.mark.parametrize("tower", ["vision", "language"])
def test_component_whole_model_fills_only_its_own_tower(lavis_opt, tmp_path, tower):
    """Given as one tower, a whole model lends nothing to another tower the checkpoint lacks."""
    d, src, lavis = lavis_opt
    arg, _, _ = _TOWER[tower]
    other = "Qformer." if tower == "vision" else "opt_model."
    torch_save(_without(lavis, "visual_encoder.", other), tmp_path / "p.pth")
    with pytest.raises(checkpoint.StateDictMismatchError, match="qformer" if tower == "vision" else "vision_model"):
        convert(tmp_path / "p.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True, **{arg: d / "full"})
    assert not os.path.exists(tmp_path / "x")


def test_component_name_in_a_layer_the_model_has_is_not_a_deeper_layer(lavis_opt, tmp_path):
    d, src, lavis = lavis_opt
    torch_save(_without(lavis, "opt_model."), tmp_path / "nolm.pth")
    lm = {k[len("opt_model."):]: v for k, v in lavis.items() if k.startswith("opt_model.")}
    lm["model.decoder.layers.0.self_attn.rotary_inv_freq"] = np.zeros(4, np.float32)
    checkpoint.save_state_dict(tmp_path / "opt", lm)
    with pytest.raises(checkpoint.StateDictMismatchError, match="rotary_inv_freq"):
        convert(tmp_path / "nolm.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True,
                language_model=tmp_path / "opt")
    assert not os.path.exists(tmp_path / "x")


def test_component_for_a_tower_the_checkpoint_has_whole_supplies_nothing(lavis_opt, tmp_path):
    d, src, _ = lavis_opt
    with pytest.raises(ValueError, match="supplies no vision_model weight"):
        convert(d / "full.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True, vision_model=d / "full")
    assert not os.path.exists(tmp_path / "x")


def test_component_bare_eva_file_through_the_command_line(lavis_opt, tmp_path):
    d, src, lavis = lavis_opt
    torch_save(_without(lavis, "visual_encoder."), tmp_path / "partial.pth")
    eva = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    torch_save(eva, tmp_path / "eva_vit_g.pth", wrap=False)
    assert cli_main(["convert", str(tmp_path / "partial.pth"), str(tmp_path / "out"), "--to", "torch",
                     "--config", src, "--allow-pickle-bin", "--vision-model", str(tmp_path / "eva_vit_g.pth"),
                     "--no-progress"]) == 0
    assert same_bytes(tmp_path / "out", d / "full")


# -- options that cannot apply are refused, not ignored ------------------------------------------------------
def test_overrides_with_a_given_config_are_refused_in_the_api_and_the_cli(lavis_opt, tmp_path, capsys):
    """``overrides=`` (``--set``) edit a preset or a config read from an original .pth; with ``config=`` (``--config``)
    the config is the user's own, so they are refused rather than silently dropped, and nothing is written."""
    d, src, _ = lavis_opt
    with pytest.raises(ValueError, match="overrides= apply to preset="):
        convert(d / "full.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True,
                overrides={"vision_config.num_attention_heads": 2})
    assert cli_main(["convert", str(d / "full.pth"), str(tmp_path / "x"), "--to", "torch", "--config", src,
                     "--allow-pickle-bin", "--no-progress", "--set", "vision_config.num_attention_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "--set" in err and "overrides=" not in err, err
    assert not os.path.exists(tmp_path / "x")


def test_overrides_with_the_checkpoints_own_config_json_are_refused(tmp_path):
    """An original .pth with a config.json beside it converts by that config; ``overrides=`` are refused there too."""
    import shutil
    src = os.path.join(MODELS, "BlipForConditionalGeneration")
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    torch_save(to_original(state(src)), tmp_path / "model_base_caption.pth")
    with pytest.raises(ValueError, match="not to config= or config.json"):
        convert(tmp_path / "model_base_caption.pth", tmp_path / "x", to="torch", allow_pickle_bin=True,
                overrides={"text_config.num_attention_heads": 2})
    assert not os.path.exists(tmp_path / "x")


class _Terminal:
    """A text stream that says it is a terminal (``isatty``), keeping what is written."""

    def __init__(self):
        import io
        self.buffer = io.StringIO()

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_option_wins_over_the_terminal_test(enabled):
    """``Progress(enabled=...)`` (``progress=`` / ``--no-progress``) decides whether the bar is drawn, on a terminal
    and in a pipe alike; only ``enabled=None`` asks the stream whether it is a terminal."""
    import io

    from converters.progress import Progress
    for stream in (_Terminal(), io.StringIO()):
        bar = Progress(2048, "converting", enabled=enabled, stream=stream)
        bar.update(2048)
        bar.close()
        text = stream.buffer.getvalue() if isinstance(stream, _Terminal) else stream.getvalue()
        assert ("100%" in text and "converting" in text) if enabled else text == "", (type(stream).__name__, text)
