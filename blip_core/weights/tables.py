"""Weight tables of every public class, built from a config.

Each ``*_table(config)`` returns an ordered ``dict[name, WeightSpec]`` whose names and order are
those of the transformers 4.57 PyTorch state dict for the same class and config (a test checks
this for every class). Towers are described once and reused under a prefix.
"""
from __future__ import annotations

from ..configs import (Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipConfig, BlipTextConfig,
                       BlipVisionConfig, OPTConfig, T5Config)
from .spec import WeightSpec


class _Builder:
    """Collects rows in state-dict order."""

    def __init__(self):
        self.rows: dict = {}

    def add(self, name, shape, kind, tied_to=None, norm_bias=False):
        if name in self.rows:
            raise AssertionError(f"duplicate weight name {name}")
        self.rows[name] = WeightSpec(name, tuple(int(s) for s in shape), kind, tied_to, norm_bias)

    def linear(self, p, n_in, n_out, bias=True, tied_to=None):
        self.add(f"{p}.weight", (n_out, n_in), "linear_weight", tied_to)
        if bias:
            self.add(f"{p}.bias", (n_out,), "bias")

    def norm(self, p, dim, bias=True):
        self.add(f"{p}.weight", (dim,), "norm_weight")
        if bias:
            self.add(f"{p}.bias", (dim,), "bias", norm_bias=True)

    def embedding(self, p, n, dim, tied_to=None):
        self.add(f"{p}.weight", (n, dim), "embedding", tied_to)

    def param(self, name, shape):
        self.add(name, shape, "param")


# -- towers ------------------------------------------------------------------------------------
def _vision(b: _Builder, p: str, c, qkv_bias: bool = True):
    d = c.hidden_size
    b.param(f"{p}embeddings.class_embedding", (1, 1, d))
    b.param(f"{p}embeddings.position_embedding", (1, c.num_patches + 1, d))
    b.add(f"{p}embeddings.patch_embedding.weight", (d, 3, c.patch_size, c.patch_size), "conv_weight")
    b.add(f"{p}embeddings.patch_embedding.bias", (d,), "bias")
    for i in range(c.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        b.linear(q + "self_attn.qkv", d, 3 * d, bias=qkv_bias)
        b.linear(q + "self_attn.projection", d, d)
        b.norm(q + "layer_norm1", d)
        b.linear(q + "mlp.fc1", d, c.intermediate_size)
        b.linear(q + "mlp.fc2", c.intermediate_size, d)
        b.norm(q + "layer_norm2", d)
    b.norm(f"{p}post_layernorm", d)


def _bert_attention(b, p, d, kv_dim, inner):
    # `inner` is "self" for BLIP text, "attention" for the Q-Former
    b.linear(f"{p}.{inner}.query", d, d)
    b.linear(f"{p}.{inner}.key", kv_dim, d)
    b.linear(f"{p}.{inner}.value", kv_dim, d)
    b.linear(f"{p}.output.dense", d, d)
    b.norm(f"{p}.output.LayerNorm", d)


def _ffn(b, p, d, inner, ffn_name="intermediate", out_name="output"):
    b.linear(f"{p}{ffn_name}.dense", d, inner)
    b.linear(f"{p}{out_name}.dense", inner, d)
    b.norm(f"{p}{out_name}.LayerNorm", d)


def _blip_text(b: _Builder, p: str, c: BlipTextConfig, pooler: bool):
    d = c.hidden_size
    b.embedding(f"{p}embeddings.word_embeddings", c.vocab_size, d)
    b.embedding(f"{p}embeddings.position_embeddings", c.max_position_embeddings, d)
    b.norm(f"{p}embeddings.LayerNorm", d)
    for i in range(c.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        _bert_attention(b, q + "attention", d, d, "self")
        if c.is_decoder:
            _bert_attention(b, q + "crossattention", d, c.encoder_hidden_size, "self")
        _ffn(b, q, d, c.intermediate_size)
    if pooler:
        b.linear(f"{p}pooler.dense", d, d)


def _blip_lm_head(b: _Builder, p: str, c: BlipTextConfig):
    """``BlipTextLMHeadModel``: bert (no pooler) + prediction head tied to the word embeddings."""
    _blip_text(b, f"{p}bert.", c, pooler=False)
    d = c.hidden_size
    b.add(f"{p}cls.predictions.bias", (c.vocab_size,), "bias")
    b.linear(f"{p}cls.predictions.transform.dense", d, d)
    b.norm(f"{p}cls.predictions.transform.LayerNorm", d)
    b.add(f"{p}cls.predictions.decoder.weight", (c.vocab_size, d), "linear_weight",
          tied_to=f"{p}bert.embeddings.word_embeddings.weight")
    b.add(f"{p}cls.predictions.decoder.bias", (c.vocab_size,), "bias", tied_to=f"{p}cls.predictions.bias")


def _qformer(b: _Builder, p: str, c: Blip2QFormerConfig):
    d = c.hidden_size
    b.norm(f"{p}layernorm", d)
    for i in range(c.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        _bert_attention(b, q + "attention", d, d, "attention")
        if i % c.cross_attention_frequency == 0:
            _bert_attention(b, q + "crossattention", d, c.encoder_hidden_size, "attention")
        if c.use_qformer_text_input:
            _ffn(b, q, d, c.intermediate_size)
        _ffn(b, q, d, c.intermediate_size, "intermediate_query", "output_query")


def _qformer_text_embeddings(b: _Builder, c: Blip2QFormerConfig):
    b.embedding("embeddings.word_embeddings", c.vocab_size, c.hidden_size)
    b.embedding("embeddings.position_embeddings", c.max_position_embeddings, c.hidden_size)


def _opt(b: _Builder, p: str, c: OPTConfig):
    d, e = c.hidden_size, c.word_embed_proj_dim
    m = f"{p}model.decoder."
    b.embedding(m + "embed_tokens", c.vocab_size, e)
    b.embedding(m + "embed_positions", c.max_position_embeddings + 2, d)   # offset 2 rows
    if e != d:
        b.linear(m + "project_out", d, e, bias=False)
        b.linear(m + "project_in", e, d, bias=False)
    if c.do_layer_norm_before and not c._remove_final_layer_norm:
        b.norm(m + "final_layer_norm", d, bias=c.layer_norm_elementwise_affine)
    for i in range(c.num_hidden_layers):
        q = f"{m}layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            b.linear(q + "self_attn." + proj, d, d, bias=c.enable_bias)
        b.norm(q + "self_attn_layer_norm", d, bias=c.layer_norm_elementwise_affine)
        b.linear(q + "fc1", d, c.ffn_dim, bias=c.enable_bias)
        b.linear(q + "fc2", c.ffn_dim, d, bias=c.enable_bias)
        b.norm(q + "final_layer_norm", d, bias=c.layer_norm_elementwise_affine)
    b.linear(f"{p}lm_head", e, c.vocab_size, bias=False,
             tied_to=(m + "embed_tokens.weight") if c.tie_word_embeddings else None)


def _t5_stack(b: _Builder, p: str, c: T5Config, n_layers: int, decoder: bool, shared: str):
    d, inner = c.d_model, c.num_heads * c.d_kv
    b.embedding(p + "embed_tokens", c.vocab_size, d, tied_to=shared)
    for i in range(n_layers):
        q = f"{p}block.{i}.layer."
        for proj, n_in, n_out in (("q", d, inner), ("k", d, inner), ("v", d, inner), ("o", inner, d)):
            b.linear(f"{q}0.SelfAttention.{proj}", n_in, n_out, bias=False)
        if i == 0:
            b.embedding(f"{q}0.SelfAttention.relative_attention_bias", c.relative_attention_num_buckets, c.num_heads)
        b.norm(f"{q}0.layer_norm", d, bias=False)
        ff = 1
        if decoder:
            for proj, n_in, n_out in (("q", d, inner), ("k", d, inner), ("v", d, inner), ("o", inner, d)):
                b.linear(f"{q}1.EncDecAttention.{proj}", n_in, n_out, bias=False)
            b.norm(f"{q}1.layer_norm", d, bias=False)
            ff = 2
        if c.is_gated_act:
            b.linear(f"{q}{ff}.DenseReluDense.wi_0", d, c.d_ff, bias=False)
            b.linear(f"{q}{ff}.DenseReluDense.wi_1", d, c.d_ff, bias=False)
        else:
            b.linear(f"{q}{ff}.DenseReluDense.wi", d, c.d_ff, bias=False)
        b.linear(f"{q}{ff}.DenseReluDense.wo", c.d_ff, d, bias=False)
        b.norm(f"{q}{ff}.layer_norm", d, bias=False)
    b.norm(p + "final_layer_norm", d, bias=False)


def _t5(b: _Builder, p: str, c: T5Config):
    shared = f"{p}shared.weight"
    b.embedding(f"{p}shared", c.vocab_size, c.d_model)
    _t5_stack(b, f"{p}encoder.", c, c.num_layers, False, shared)
    _t5_stack(b, f"{p}decoder.", c, c.num_decoder_layers, True, shared)
    b.linear(f"{p}lm_head", c.d_model, c.vocab_size, bias=False, tied_to=shared if c.tie_word_embeddings else None)


def _language_model(b, p, c):
    (_t5 if isinstance(c, T5Config) else _opt)(b, p, c)


# -- public classes ----------------------------------------------------------------------------
def _blip_vision_cfg(config):
    return config.vision_config if isinstance(config, (BlipConfig, Blip2Config)) else config


def blip_vision_model(config):
    b = _Builder()
    _vision(b, "", _blip_vision_cfg(config))
    return b.rows


def blip_text_model(config, add_pooling_layer: bool = True):
    c = config.text_config if isinstance(config, BlipConfig) else config
    b = _Builder()
    _blip_text(b, "", c, pooler=add_pooling_layer)
    return b.rows


def blip_model(config: BlipConfig):
    b = _Builder()
    b.param("logit_scale", ())
    _blip_text(b, "text_model.", config.text_config, pooler=True)
    _vision(b, "vision_model.", config.vision_config)
    b.linear("visual_projection", config.vision_config.hidden_size, config.projection_dim, bias=False)
    b.linear("text_projection", config.text_config.hidden_size, config.projection_dim, bias=False)
    return b.rows


def blip_for_conditional_generation(config: BlipConfig):
    b = _Builder()
    _vision(b, "vision_model.", config.vision_config)
    _blip_lm_head(b, "text_decoder.", config.text_config)
    return b.rows


def blip_for_image_text_retrieval(config: BlipConfig):
    b = _Builder()
    _vision(b, "vision_model.", config.vision_config)
    _blip_text(b, "text_encoder.", config.text_config, pooler=False)
    b.linear("vision_proj", config.vision_config.hidden_size, config.image_text_hidden_size)
    b.linear("text_proj", config.text_config.hidden_size, config.image_text_hidden_size)
    b.linear("itm_head", config.text_config.hidden_size, 2)
    return b.rows


def blip_for_question_answering(config: BlipConfig):
    b = _Builder()
    _vision(b, "vision_model.", config.vision_config)
    _blip_text(b, "text_encoder.", config.text_config, pooler=False)
    _blip_lm_head(b, "text_decoder.", config.text_config)
    return b.rows


def blip2_vision_model(config):
    c = _blip_vision_cfg(config)
    b = _Builder()
    _vision(b, "", c, qkv_bias=c.qkv_bias)
    return b.rows


def blip2_qformer_model(config):
    c = config.qformer_config if isinstance(config, Blip2Config) else config
    b = _Builder()
    _qformer(b, "", c)
    return b.rows


def _blip2_front(b: _Builder, c: Blip2Config, vision=True):
    b.param("query_tokens", (1, c.num_query_tokens, c.qformer_config.hidden_size))
    if vision:
        _vision(b, "vision_model.", c.vision_config, qkv_bias=c.vision_config.qkv_bias)


def blip2_model(config: Blip2Config):
    b = _Builder()
    _blip2_front(b, config)
    _qformer(b, "qformer.", config.qformer_config)
    b.linear("language_projection", config.qformer_config.hidden_size, config.text_config.hidden_size)
    _language_model(b, "language_model.", config.text_config)
    return b.rows


blip2_for_conditional_generation = blip2_model


def blip2_for_image_text_retrieval(config: Blip2Config):
    b = _Builder()
    _blip2_front(b, config)
    _qformer_text_embeddings(b, config.qformer_config)
    _qformer(b, "qformer.", config.qformer_config)
    h, e = config.qformer_config.hidden_size, config.image_text_hidden_size
    b.linear("vision_projection", h, e)
    b.linear("text_projection", h, e)
    b.linear("itm_head", h, 2)
    return b.rows


def blip2_text_model_with_projection(config: Blip2Config):
    b = _Builder()
    _blip2_front(b, config, vision=False)
    _qformer_text_embeddings(b, config.qformer_config)
    _qformer(b, "qformer.", config.qformer_config)
    b.linear("text_projection", config.qformer_config.hidden_size, config.image_text_hidden_size)
    return b.rows


def blip2_vision_model_with_projection(config: Blip2Config):
    b = _Builder()
    _blip2_front(b, config)
    _qformer(b, "qformer.", config.qformer_config)
    b.linear("vision_projection", config.qformer_config.hidden_size, config.image_text_hidden_size)
    return b.rows


# Class name -> (config class the checkpoint's config.json holds, table function).
TABLES = {
    "BlipVisionModel": (BlipVisionConfig, blip_vision_model),
    "BlipTextModel": (BlipTextConfig, blip_text_model),
    "BlipModel": (BlipConfig, blip_model),
    "BlipForConditionalGeneration": (BlipConfig, blip_for_conditional_generation),
    "BlipForImageTextRetrieval": (BlipConfig, blip_for_image_text_retrieval),
    "BlipForQuestionAnswering": (BlipConfig, blip_for_question_answering),
    "Blip2VisionModel": (Blip2VisionConfig, blip2_vision_model),
    "Blip2QFormerModel": (Blip2QFormerConfig, blip2_qformer_model),
    "Blip2Model": (Blip2Config, blip2_model),
    "Blip2ForConditionalGeneration": (Blip2Config, blip2_for_conditional_generation),
    "Blip2ForImageTextRetrieval": (Blip2Config, blip2_for_image_text_retrieval),
    "Blip2TextModelWithProjection": (Blip2Config, blip2_text_model_with_projection),
    "Blip2VisionModelWithProjection": (Blip2Config, blip2_vision_model_with_projection),
}
ARCHITECTURES = tuple(TABLES)


def weight_table(architecture: str, config) -> dict:
    """The weight table of ``architecture`` (a class name) for ``config``."""
    if architecture not in TABLES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    cfg_cls, fn = TABLES[architecture]
    if not isinstance(config, cfg_cls) and not (cfg_cls in (BlipVisionConfig, BlipTextConfig, Blip2VisionConfig,
                                                             Blip2QFormerConfig)):
        raise ValueError(f"{architecture} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    validate = getattr(config, "validate_for", None)
    if validate is not None:   # one class's invariants (VQA's equal widths): checked for every backend here
        validate(architecture)
    return fn(config)
