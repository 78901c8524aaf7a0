"""Model configurations, read from and written to Hugging Face ``config.json`` unchanged.

Every config is a dataclass with the field names and defaults of transformers 4.57. Keys a
class does not know (``architectures``, ``torch_dtype``, ``transformers_version``, ...) are
kept in ``extra`` and written back, so a file survives a load/save round trip. Invariants are
checked at construction and a violation raises ``ValueError`` naming the field. Invariants only
one model class needs are checked by ``validate_for(architecture)``: at construction for the
classes the config declares, and by the weight table (so by every backend) for the class built.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .jsonfile import read_json_file

# Activation names every backend implements (Hugging Face's ACT2FN spellings).
ACTIVATIONS = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh"})

CONFIG_NAME = "config.json"


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config field {name!r}: {msg}")


# Sanity ceilings checked before anything is allocated: far above every published checkpoint, low
# enough that a hostile config.json cannot make the weight table (or a model) exhaust memory.
MAX_LAYERS = 1024                 # num_hidden_layers, num_layers, num_decoder_layers
MAX_HEADS = 1024
MAX_VOCAB = 2**22                 # 4M tokens
MAX_POSITIONS = 2**20
MAX_WIDTH = 2**17                 # any hidden / intermediate / projection width
MAX_IMAGE_SIDE = 2**14


def _ceiling(name: str) -> int:
    if "layers" in name:
        return MAX_LAYERS
    if "heads" in name:
        return MAX_HEADS
    if name == "vocab_size":
        return MAX_VOCAB
    if "position" in name or name == "num_query_tokens":
        return MAX_POSITIONS
    if name in ("image_size", "patch_size"):
        return MAX_IMAGE_SIDE
    return MAX_WIDTH


def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, n, f"must be a positive integer, got {v!r}")
        _check(v <= _ceiling(n), n, f"{v} is above the sanity limit of {_ceiling(n)} (corrupt or hostile config?)")


def _divisible(cfg, size_name, heads_name):
    size, heads = getattr(cfg, size_name), getattr(cfg, heads_name)
    _check(size % heads == 0, size_name, f"{size} is not divisible by {heads_name}={heads}")


def _activation(cfg, name):
    v = getattr(cfg, name)
    _check(v in ACTIVATIONS, name, f"unknown activation {v!r}; known: {sorted(ACTIVATIONS)}")


def _probability(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, n, f"must be in [0, 1], got {v!r}")


@dataclass
class _Config:
    """Shared machinery: dict/JSON conversion with unknown keys preserved."""

    model_type: ClassVar[str] = ""
    _nested: ClassVar[tuple] = ()

    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: dict) -> "_Config":
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        data = dict(data)
        mt = data.pop("model_type", None)
        if mt is not None and cls.model_type and mt != cls.model_type:
            raise ValueError(f"invalid config field 'model_type': {cls.__name__} expects {cls.model_type!r}, got {mt!r}")
        names = set(cls._field_names())
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, extra=data)

    def to_dict(self) -> dict:
        out = dict(copy.deepcopy(self.extra))
        for name in self._field_names():
            value = getattr(self, name)
            if isinstance(value, _Config):
                value = value.to_dict()
            out[name] = copy.deepcopy(value)
        out["model_type"] = self.model_type
        return out

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str) -> "_Config":
        return cls.from_dict(read_json_file(path, what="config file"))

    @classmethod
    def from_pretrained(cls, path: str) -> "_Config":
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        return cls.from_json_file(path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        os.replace(tmp, path)
        return path

    @property
    def architectures(self) -> Optional[list]:
        return self.extra.get("architectures")

    def validate_for(self, architecture: str) -> None:
        """Raise ``ValueError`` naming the field when this config cannot build ``architecture``."""

    def _validate_declared(self) -> None:
        for arch in self.architectures or ():
            self.validate_for(arch)


# ----------------------------------------------------------------------------------------------
# BLIP
# ----------------------------------------------------------------------------------------------
@dataclass
class BlipVisionConfig(_Config):
    model_type: ClassVar[str] = "blip_vision_model"

    hidden_size: int = 768            # width D of the ViT
    intermediate_size: int = 3072     # MLP width
    projection_dim: int = 512         # unused by the vision tower itself; kept for fidelity
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384             # square training resolution
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10

    def __post_init__(self):
        _positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
        _divisible(self, "hidden_size", "num_attention_heads")
        _check(self.image_size % self.patch_size == 0, "image_size", f"{self.image_size} is not a multiple of patch_size={self.patch_size}")
        _activation(self, "hidden_act")
        _probability(self, "attention_dropout")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class BlipTextConfig(_Config):
    model_type: ClassVar[str] = "blip_text_model"

    vocab_size: int = 30524           # bert-base-uncased + [DEC] + [ENC]
    hidden_size: int = 768
    encoder_hidden_size: int = 768    # width of the image states cross-attended (vision hidden size)
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 8      # hub checkpoints use 12: always read the config
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int = 30522
    eos_token_id: int = 2
    pad_token_id: int = 0
    sep_token_id: int = 102
    is_decoder: bool = True           # cross-attention layers exist in every block
    use_cache: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "encoder_hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings")
        _divisible(self, "hidden_size", "num_attention_heads")
        _activation(self, "hidden_act")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob", "label_smoothing")


def _sub(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value)
    raise ValueError(f"expected a dict or {cls.__name__} for a nested config, got {type(value).__name__}")


@dataclass
class BlipConfig(_Config):
    model_type: ClassVar[str] = "blip"

    text_config: Any = None
    vision_config: Any = None
    projection_dim: int = 512               # ITC embedding width (BlipModel)
    logit_scale_init_value: float = 2.6592
    image_text_hidden_size: int = 256       # ITC width of the retrieval model
    label_smoothing: float = 0.0
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self):
        self.text_config = _sub(BlipTextConfig, self.text_config)
        self.vision_config = _sub(BlipVisionConfig, self.vision_config)
        # The text tower always cross-attends the vision tower's width (transformers does the same).
        self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        _positive(self, "projection_dim", "image_text_hidden_size")
        self._validate_declared()

    @classmethod
    def from_text_vision_configs(cls, text_config, vision_config, **kwargs) -> "BlipConfig":
        """transformers' constructor from the two tower configs (objects or dicts)."""
        return cls(text_config=_as_dict(text_config), vision_config=_as_dict(vision_config), **kwargs)

    def validate_for(self, architecture: str) -> None:
        if architecture == "BlipForQuestionAnswering":
            # The answer decoder cross-attends the question states through weights sized for image states.
            text, vision = self.text_config.hidden_size, self.vision_config.hidden_size
            _check(text == vision, "text_config.hidden_size",
                   f"BlipForQuestionAnswering needs text_config.hidden_size ({text}) == "
                   f"vision_config.hidden_size ({vision})")


# ----------------------------------------------------------------------------------------------
# BLIP-2
# ----------------------------------------------------------------------------------------------
@dataclass
class Blip2VisionConfig(_Config):
    model_type: ClassVar[str] = "blip_2_vision_model"

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True             # q and v biases (k bias is structurally zero)

    __post_init__ = BlipVisionConfig.__post_init__
    num_patches = BlipVisionConfig.num_patches


@dataclass
class Blip2QFormerConfig(_Config):
    model_type: ClassVar[str] = "blip_2_qformer"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    cross_attention_frequency: int = 2   # cross-attention in layers with i % frequency == 0
    encoder_hidden_size: int = 1408      # vision hidden size
    use_qformer_text_input: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size")
        _divisible(self, "hidden_size", "num_attention_heads")
        _activation(self, "hidden_act")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        _check(self.position_embedding_type == "absolute", "position_embedding_type",
               f"only 'absolute' is supported, got {self.position_embedding_type!r}")


@dataclass
class OPTConfig(_Config):
    model_type: ClassVar[str] = "opt"

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: Optional[int] = None   # None -> hidden_size
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    is_encoder_decoder: ClassVar[bool] = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
                  "num_attention_heads", "word_embed_proj_dim")
        _divisible(self, "hidden_size", "num_attention_heads")
        _activation(self, "activation_function")
        _probability(self, "dropout", "attention_dropout", "layerdrop")


@dataclass
class T5Config(_Config):
    model_type: ClassVar[str] = "t5"

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None   # None -> num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"            # "relu", "gated-gelu", "gelu", "gated-silu", ...
    use_cache: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: Optional[int] = None   # hub T5 configs set 0
    classifier_dropout: float = 0.0
    tie_word_embeddings: bool = True
    dense_act_fn: Optional[str] = None         # None -> derived from feed_forward_proj; an explicit value wins
    is_gated_act: Optional[bool] = None        # None -> derived from feed_forward_proj; an explicit value wins
    is_encoder_decoder: ClassVar[bool] = True

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        _positive(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance")
        parts = self.feed_forward_proj.split("-")
        _check(len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), "feed_forward_proj",
               f"{self.feed_forward_proj!r} is not of the form 'gated-ACT' or 'ACT'")
        # As transformers: derived from feed_forward_proj ("gated-gelu" means the tanh approximation),
        # but a value written in config.json wins (Flan-T5 configs say "gated-gelu" with "gelu").
        if self.is_gated_act is None:
            self.is_gated_act = parts[0] == "gated"
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        _check(self.dense_act_fn in ACTIVATIONS, "dense_act_fn", f"unknown activation {self.dense_act_fn!r}")

    @property
    def hidden_size(self) -> int:
        return self.d_model


TEXT_CONFIGS = {"opt": OPTConfig, "t5": T5Config}


@dataclass
class Blip2Config(_Config):
    model_type: ClassVar[str] = "blip-2"

    vision_config: Any = None
    qformer_config: Any = None
    text_config: Any = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: Optional[int] = None   # placeholder id the queries replace (4.57 path)
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self):
        self.vision_config = _sub(Blip2VisionConfig, self.vision_config)
        self.qformer_config = _sub(Blip2QFormerConfig, self.qformer_config)
        tc = self.text_config
        if tc is None or isinstance(tc, dict):
            tc = dict(tc or {})
            kind = tc.get("model_type", "opt")
            if kind not in TEXT_CONFIGS:
                raise ValueError(f"invalid config field 'text_config.model_type': {kind!r}; supported: {sorted(TEXT_CONFIGS)}")
            tc = TEXT_CONFIGS[kind].from_dict(tc)
        elif not isinstance(tc, (OPTConfig, T5Config)):
            raise ValueError(f"invalid config field 'text_config': expected OPTConfig or T5Config, got {type(tc).__name__}")
        self.text_config = tc
        # The Q-Former always cross-attends the vision tower's width (transformers does the same).
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        _positive(self, "num_query_tokens", "image_text_hidden_size")
        if self.image_token_index is not None:
            _check(0 <= self.image_token_index < self.text_config.vocab_size, "image_token_index",
                   f"{self.image_token_index} is outside the language model's vocabulary ({self.text_config.vocab_size})")
        # Read by transformers, derived here; dropped from extra so they are not duplicated.
        self.extra.pop("use_decoder_only_language_model", None)
        self.extra.pop("is_encoder_decoder", None)
        self._validate_declared()

    def validate_for(self, architecture: str) -> None:
        if architecture in ("Blip2Model", "Blip2ForConditionalGeneration") and self.use_decoder_only_language_model:
            # The projected queries (text_config.hidden_size wide) sit in the OPT's input-embedding rows, which
            # are word_embed_proj_dim wide; transformers scatters the one into the other element by element.
            tc = self.text_config
            _check(tc.word_embed_proj_dim == tc.hidden_size, "text_config.word_embed_proj_dim",
                   f"{architecture} feeds the query embeddings (text_config.hidden_size={tc.hidden_size}) into the "
                   f"language model's input embeddings, so word_embed_proj_dim must equal it, "
                   f"got {tc.word_embed_proj_dim}")

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config, qformer_config, text_config=None,
                                         **kwargs) -> "Blip2Config":
        """transformers' constructor from the vision, Q-Former and language model configs."""
        return cls(vision_config=_as_dict(vision_config), qformer_config=_as_dict(qformer_config),
                   text_config=_as_dict(text_config) if text_config is not None else None, **kwargs)

    @property
    def use_decoder_only_language_model(self) -> bool:
        return isinstance(self.text_config, OPTConfig)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        out["is_encoder_decoder"] = self.text_config.is_encoder_decoder
        return out


def _as_dict(config):
    """A config object as a fresh dict (with its ``model_type``), a dict as a copy."""
    return config.to_dict() if isinstance(config, _Config) else dict(config)


CONFIG_CLASSES = {c.model_type: c for c in (BlipConfig, BlipTextConfig, BlipVisionConfig, Blip2Config,
                                            Blip2VisionConfig, Blip2QFormerConfig, OPTConfig, T5Config)}


def config_from_dict(data: dict) -> _Config:
    """Build the config class named by ``model_type``."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
    mt = data.get("model_type")
    if mt not in CONFIG_CLASSES:
        raise ValueError(f"invalid config field 'model_type': {mt!r}; known: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[mt].from_dict(data)


def load_config(path: str) -> _Config:
    """Read ``config.json`` (or a directory holding one) into the class its ``model_type`` names."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    return config_from_dict(read_json_file(path, what="config file"))
