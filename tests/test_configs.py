"""Configs read and write Hugging Face config.json unchanged and reject invalid values by field name."""
import json

import pytest
import transformers

from blip_core.configs import (Blip2Config, BlipConfig, BlipTextConfig, BlipVisionConfig, OPTConfig, T5Config,
                               config_from_dict, load_config)
from hf_configs import OPT_TEXT, T5_TEXT, blip2_config, blip_config

CASES = {
    "blip_default": lambda: transformers.BlipConfig(),
    "blip_tiny": lambda: blip_config(),
    "blip2_opt_default": lambda: transformers.Blip2Config(),
    "blip2_opt_tiny": lambda: blip2_config(image_token_index=98),
    "blip2_t5": lambda: blip2_config(text=T5_TEXT, qformer=dict(use_qformer_text_input=True)),
    "blip2_flan_t5": lambda: blip2_config(text=dict(T5_TEXT, dense_act_fn="gelu")),
    "blip2_t5_legacy_gated": lambda: blip2_config(text=dict(T5_TEXT, feed_forward_proj="gated-gelu", tie_word_embeddings=True)),
    "vision": lambda: transformers.BlipVisionConfig(image_size=64, patch_size=16),
    "text": lambda: transformers.BlipTextConfig(num_attention_heads=12),
    "opt": lambda: transformers.OPTConfig(word_embed_proj_dim=512),
    "t5": lambda: transformers.T5Config(feed_forward_proj="gated-silu"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_transformers(name, tmp_path):
    hf = CASES[name]()
    hf.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = load_config(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours")
    assert back.to_dict() == hf.to_dict()
    # Keys we do not model (transformers_version, architectures, ...) survive verbatim.
    ours_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key, value in written.items():
        if not isinstance(value, dict):
            assert ours_json[key] == value, key


def test_fields_follow_transformers():
    cfg = BlipConfig.from_dict(transformers.BlipConfig(vision_config={"hidden_size": 48, "num_attention_heads": 4}).to_dict())
    assert cfg.text_config.encoder_hidden_size == 48          # text cross-attends vision width
    assert cfg.text_config.num_attention_heads == 8           # class default; hub configs say 12
    b2 = Blip2Config.from_dict(blip2_config(text=T5_TEXT).to_dict())
    assert isinstance(b2.text_config, T5Config) and not b2.use_decoder_only_language_model
    assert b2.qformer_config.encoder_hidden_size == b2.vision_config.hidden_size
    assert isinstance(Blip2Config().text_config, OPTConfig)
    assert T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert T5Config(feed_forward_proj="gated-gelu").is_gated_act
    flan = T5Config.from_dict(transformers.T5Config(feed_forward_proj="gated-gelu", dense_act_fn="gelu").to_dict())
    assert flan.dense_act_fn == "gelu" and flan.is_gated_act          # explicit value wins, as in transformers
    assert OPTConfig(hidden_size=64, num_attention_heads=4).word_embed_proj_dim == 64


@pytest.mark.parametrize("cls, kwargs, field", [
    (BlipVisionConfig, dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
    (BlipVisionConfig, dict(image_size=30, patch_size=16), "image_size"),
    (BlipVisionConfig, dict(hidden_act="gelu_fancy"), "hidden_act"),
    (BlipTextConfig, dict(vocab_size=0), "vocab_size"),
    (BlipTextConfig, dict(num_hidden_layers=True), "num_hidden_layers"),        # a bool is no count
    (BlipTextConfig, dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (T5Config, dict(feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
    (OPTConfig, dict(activation_function="nope"), "activation_function"),
])
def test_invalid_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=repr(field)):
        cls(**kwargs)


def test_bad_files_and_types(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type"):
        config_from_dict({"model_type": "bert"})
    with pytest.raises(ValueError, match="model_type"):
        BlipVisionConfig.from_dict({"model_type": "blip_text_model"})
    with pytest.raises(ValueError, match="text_config.model_type"):
        Blip2Config(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="image_token_index"):
        Blip2Config(image_token_index=10 ** 6)


def test_question_answering_needs_equal_tower_widths():
    """VQA's answer decoder cross-attends question states through weights sized for image states."""
    from blip_core.weights import weight_table
    narrow = dict(text_config=dict(hidden_size=24, num_attention_heads=2),
                  vision_config=dict(hidden_size=48, num_attention_heads=4))
    cfg = BlipConfig(**narrow)                                  # fine for every other class
    for arch in ("BlipModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval"):
        cfg.validate_for(arch)
        assert weight_table(arch, cfg)
    message = r"'text_config.hidden_size'.*\(24\) == vision_config.hidden_size \(48\)"
    with pytest.raises(ValueError, match=message):
        cfg.validate_for("BlipForQuestionAnswering")
    with pytest.raises(ValueError, match=message):              # every backend builds through the table
        weight_table("BlipForQuestionAnswering", cfg)
    with pytest.raises(ValueError, match=message):              # a config.json declaring VQA fails on reading
        BlipConfig.from_dict(dict(BlipConfig(**narrow).to_dict(), architectures=["BlipForQuestionAnswering"]))
    equal = BlipConfig(text_config=dict(hidden_size=48, num_attention_heads=4), vision_config=narrow["vision_config"])
    equal.validate_for("BlipForQuestionAnswering")
    assert weight_table("BlipForQuestionAnswering", equal)


@pytest.mark.parametrize("name, overrides", [
    ("BlipForConditionalGeneration", {"projection_dim": 12, "logit_scale_init_value": 1.5}),
    ("Blip2ForConditionalGeneration", {"num_query_tokens": 8, "image_token_index": 5}),
])
def test_auto_config_keyword_overrides_match_transformers(name, overrides):
    """``AutoConfig.from_pretrained(dir, field=value)`` sets those fields on the config read from the directory,
    as transformers' ``AutoConfig`` does."""
    from blip_core.processing import AutoConfig
    from fixture_utils import fixture
    d = fixture(name)[0]
    ours, ref = AutoConfig.from_pretrained(d, **overrides), transformers.AutoConfig.from_pretrained(d, **overrides)
    assert type(ours).__name__ == type(ref).__name__
    for key, value in overrides.items():
        assert getattr(ours, key) == getattr(ref, key) == value, key
    plain = transformers.AutoConfig.from_pretrained(d)
    assert all(getattr(plain, key) != value for key, value in overrides.items())   # the overrides change something
