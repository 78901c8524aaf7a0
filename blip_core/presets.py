"""Named presets: the configs of the released BLIP and BLIP-2 checkpoints, for converting the
original Salesforce BLIP / LAVIS ``.pth`` files without writing a ``config.json`` by hand.

Each preset is an architecture plus a config dict. Sizes are those of the released checkpoints
(the original repositories' model configs and the ``config.json`` files Salesforce published on
the Hugging Face hub, which transformers' conversion scripts wrote from the same numbers). The
settings are those under which the converted model computes what the *original* code computes:

* original BLIP ViT: timm-style ``LayerNorm(eps=1e-6)`` (BLIP's ``vit.py``); the hub configs say
  1e-5, which moves base-size vision outputs by up to ~5e-3.
* LAVIS BLIP-2 concatenates the query outputs in front of the text embeddings: no
  ``image_token_index`` (the hub configs set one, for transformers' placeholder path).
* Flan-T5 FFN: gated, exact GELU (``dense_act_fn="gelu"``), untied ``lm_head``.
* BLIP-2 retrieval (LAVIS ``blip2_feature_extractor`` / ``blip2_image_text_matching``): the
  Q-Former has its text input and word embeddings for ``bert-base-uncased`` plus LAVIS's ``[DEC]``
  token (30523).

    >>> arch, cfg = preset_config("blip2-opt-2.7b")
    >>> arch, cfg.text_config.hidden_size, cfg.image_token_index
    ('Blip2ForConditionalGeneration', 2560, None)
    >>> preset_config("blip-base-captioning", {"vision_config.num_hidden_layers": 2})[1].vision_config.num_hidden_layers
    2
"""
from __future__ import annotations

import copy

from .configs import config_from_dict

# -- building blocks -----------------------------------------------------------------------------
# BLIP's ViT-B/16 and ViT-L/16 (BLIP configs/*.yaml: vit 'base' | 'large'; vit.py: eps 1e-6).
_VIT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 patch_size=16, layer_norm_eps=1e-6)
_VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=16, layer_norm_eps=1e-6)
# BLIP's text side: bert-base-uncased (configs/med_config.json) with [DEC] and [ENC] added -> 30524.
_BERT_BASE = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12,
                  bos_token_id=30522, eos_token_id=2, pad_token_id=0, sep_token_id=102)
# EVA ViT-g/14 as LAVIS builds it (eva_vit.py create_eva_vit_g: width 1408, 39 of EVA's 40 blocks,
# 16 heads, mlp_ratio 4.3637 -> 6144, 224 px; ln_vision is a plain LayerNorm, eps 1e-6 in transformers).
_EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
# LAVIS's Q-Former: bert-base-uncased, cross-attention every 2nd layer, 32 queries.
_QFORMER = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, cross_attention_frequency=2, max_position_embeddings=512,
                layer_norm_eps=1e-12)
# facebook/opt-2.7b and opt-6.7b config.json; BLIP-2 stops generation at "\n" (50118), as LAVIS does.
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
            activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=50118,
            word_embed_proj_dim=None, tie_word_embeddings=True)
_OPT_2_7B = dict(_OPT, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240)
_OPT_6_7B = dict(_OPT, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384)
# google/flan-t5-xl and flan-t5-xxl config.json (T5 v1.1 layout).
_FLAN_T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                is_gated_act=True, tie_word_embeddings=False, layer_norm_epsilon=1e-6,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_FLAN_T5_XL = dict(_FLAN_T5, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32)
_FLAN_T5_XXL = dict(_FLAN_T5, d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64)


def _blip(architecture: str, vit: dict, image_size: int, source: str) -> tuple:
    return architecture, {"model_type": "blip", "vision_config": dict(vit, image_size=image_size),
                          "text_config": dict(_BERT_BASE), "projection_dim": 512, "image_text_hidden_size": 256}, source


def _blip2(architecture: str, text: dict | None, source: str, qformer: dict | None = None) -> tuple:
    data = {"model_type": "blip-2", "vision_config": dict(_EVA_VIT_G), "qformer_config": dict(qformer or _QFORMER),
            "num_query_tokens": 32, "image_text_hidden_size": 256, "image_token_index": None}
    if text is not None:
        data["text_config"] = dict(text)
    return architecture, data, source


# name -> (architecture, config dict, where the checkpoint comes from)
PRESETS = {
    # BLIP (github.com/salesforce/BLIP, configs/*.yaml): captioning and retrieval at 384 px, VQA at 480 px.
    "blip-base-captioning": _blip("BlipForConditionalGeneration", _VIT_BASE, 384, "model_base_caption_capfilt_large.pth"),
    "blip-large-captioning": _blip("BlipForConditionalGeneration", _VIT_LARGE, 384, "model_large_caption.pth"),
    "blip-base-vqa": _blip("BlipForQuestionAnswering", _VIT_BASE, 480, "model_base_vqa_capfilt_large.pth"),
    "blip-base-retrieval": _blip("BlipForImageTextRetrieval", _VIT_BASE, 384, "model_base_retrieval_coco.pth"),
    "blip-large-retrieval": _blip("BlipForImageTextRetrieval", _VIT_LARGE, 384, "model_large_retrieval_coco.pth"),
    # BLIP-2 (LAVIS, configs/models/blip2/*.yaml): 224 px, 32 queries.
    "blip2-opt-2.7b": _blip2("Blip2ForConditionalGeneration", _OPT_2_7B, "blip2_pretrained_opt2.7b.pth"),
    "blip2-opt-6.7b": _blip2("Blip2ForConditionalGeneration", _OPT_6_7B, "blip2_pretrained_opt6.7b.pth"),
    "blip2-flan-t5-xl": _blip2("Blip2ForConditionalGeneration", _FLAN_T5_XL, "blip2_pretrained_flant5xl.pth"),
    "blip2-flan-t5-xxl": _blip2("Blip2ForConditionalGeneration", _FLAN_T5_XXL, "blip2_pretrained_flant5xxl.pth"),
    "blip2-itm-vit-g": _blip2("Blip2ForImageTextRetrieval", None, "blip2_pretrained.pth",
                              qformer=dict(_QFORMER, vocab_size=30523, use_qformer_text_input=True)),
}


def preset_names() -> list:
    return sorted(PRESETS)


def set_field(data: dict, dotted: str, value) -> None:
    """``data["a"]["b"] = value`` for ``dotted="a.b"``; an unknown nested section is an error."""
    *path, last = dotted.split(".")
    node = data
    for part in path:
        if not isinstance(node.get(part), dict):
            raise ValueError(f"invalid config field {dotted!r}: no section {part!r}")
        node = node[part]
    node[last] = value


def preset_dict(name: str) -> tuple:
    """``(architecture, config dict)`` of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    architecture, data, _ = PRESETS[name]
    return architecture, copy.deepcopy(data)


def preset_config(name: str, overrides: dict | None = None) -> tuple:
    """``(architecture, config)`` of preset ``name``, with ``{"section.field": value}`` overrides
    applied before the config checks itself (e.g. small sizes with the preset's settings)."""
    architecture, data = preset_dict(name)
    for dotted, value in (overrides or {}).items():
        set_field(data, dotted, value)
    cfg = config_from_dict(data)
    cfg.extra["architectures"] = [architecture]
    cfg.validate_for(architecture)
    return architecture, cfg
