"""Seeded random initialisation, drawn once here for every backend.

``random_weights(architecture, config, seed)`` returns every storage-owning row of the weight
table as a float32 numpy array in canonical (torch) layout. Backends only copy the arrays in (torch)
or lay them out through the table (jax, tf), so one seed gives one model, bit for bit, everywhere.

The distributions are those of transformers 4.57's ``_init_weights``, each row taking the std of
the sub-model that owns it (transformers initialises every ``PreTrainedModel`` child, such as
``vision_model`` or ``language_model``, with its own config):

* BLIP, BLIP-2 vision, Q-Former and the heads: linear, conv and embedding weights
  normal(0, ``initializer_range``), padding rows included (transformers does not zero them here);
  biases 0; layer norms weight 1, bias 0; ``logit_scale`` = ``logit_scale_init_value``.
* Vision ``class_embedding`` and ``position_embedding``: truncated normal(0, vision
  ``initializer_range``) on [-2, 2]. The bounds are torch's ``trunc_normal_`` defaults, absolute
  and not in units of std, so this is transformers' distribution exactly; values outside are
  redrawn from the row's stream (at the stds transformers uses, 0.02 or less, never in practice).
* BLIP-2 ``query_tokens``: normal(0, ``initializer_range``). transformers zero-fills them, which
  makes every query position identical in a random model; the project draws them on purpose.
* OPT: normal(0, ``init_std``), with the ``pad_token_id`` row of ``embed_tokens`` zeroed.
* T5 (Mesh TensorFlow scaling, f = ``initializer_factor``): ``shared`` and an untied ``lm_head``
  normal(0, f); attention q normal(0, f (d_model d_kv)^-1/2), k and v normal(0, f d_model^-1/2),
  o normal(0, f (heads d_kv)^-1/2); relative bias and ``wi``/``wi_0``/``wi_1`` normal(0, f
  d_model^-1/2); ``wo`` normal(0, f d_ff^-1/2); RMS norm weights f.

Every row draws from its own stream, seeded by ``(seed, 128-bit hash of its canonical name)``, so
its values never depend on which other rows the table holds or in what order. Tied rows are not
drawn: they share their target's array.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..configs import Blip2Config, BlipConfig, OPTConfig, T5Config
from .spec import owned
from .tables import weight_table

TRUNC_BOUND = 2.0   # absolute bound of the truncated normal, as torch.nn.init.trunc_normal_

# First name component -> attribute of the composite config that configures that sub-model.
_SUBMODELS = {"vision_model": "vision_config", "text_model": "text_config", "text_encoder": "text_config",
              "text_decoder": "text_config", "qformer": "qformer_config", "language_model": "text_config"}


@dataclass(frozen=True)
class Init:
    """How one row is drawn: ``dist`` is "normal", "trunc_normal" (both use ``std``) or "constant"."""

    dist: str
    std: float = 0.0
    value: float = 0.0
    zero_row: Optional[int] = None   # an embedding row set to zero after the draw (OPT padding)


def _normal(std, zero_row=None) -> Init:
    return Init("normal", std=float(std), zero_row=zero_row)


def _constant(value) -> Init:
    return Init("constant", value=float(value))


def _root_config(architecture: str, config):
    """The config a class is built from, a tower's own config when handed a composite one."""
    if architecture in ("BlipVisionModel", "Blip2VisionModel") and isinstance(config, (BlipConfig, Blip2Config)):
        return config.vision_config
    if architecture == "BlipTextModel" and isinstance(config, BlipConfig):
        return config.text_config
    if architecture == "Blip2QFormerModel" and isinstance(config, Blip2Config):
        return config.qformer_config
    return config


def _owner(name: str, root):
    """(config of the sub-model owning ``name``, ``name`` relative to that sub-model)."""
    head, _, rest = name.partition(".")
    if isinstance(root, (BlipConfig, Blip2Config)) and head in _SUBMODELS and rest:
        return getattr(root, _SUBMODELS[head]), rest
    return root, name


def _blip_rule(kind: str, local: str, owner, root) -> Init:
    if kind in ("linear_weight", "conv_weight", "embedding"):
        return _normal(owner.initializer_range)
    if kind == "bias":
        return _constant(0.0)
    if kind == "norm_weight":
        return _constant(1.0)
    if local in ("embeddings.class_embedding", "embeddings.position_embedding"):
        return Init("trunc_normal", std=float(owner.initializer_range))
    if local == "logit_scale":
        return _constant(root.logit_scale_init_value)
    if local == "query_tokens":
        return _normal(root.initializer_range)
    raise ValueError(f"no init rule for parameter {local!r}")


def _opt_rule(kind: str, local: str, c: OPTConfig) -> Init:
    if kind in ("linear_weight", "embedding"):
        pad = c.pad_token_id
        padded = local.endswith("embed_tokens.weight") and pad is not None and 0 <= pad < c.vocab_size
        return _normal(c.init_std, zero_row=pad if padded else None)
    if kind == "bias":
        return _constant(0.0)
    if kind == "norm_weight":
        return _constant(1.0)
    raise ValueError(f"no init rule for OPT parameter {local!r}")


def _t5_rule(kind: str, local: str, c: T5Config) -> Init:
    f = c.initializer_factor
    if kind == "norm_weight":
        return _constant(f)
    module = local.rsplit(".", 2)[-2]
    stds = {"shared": f, "lm_head": f,
            "q": f * (c.d_model * c.d_kv) ** -0.5, "k": f * c.d_model ** -0.5, "v": f * c.d_model ** -0.5,
            "o": f * (c.num_heads * c.d_kv) ** -0.5, "relative_attention_bias": f * c.d_model ** -0.5,
            "wi": f * c.d_model ** -0.5, "wi_0": f * c.d_model ** -0.5, "wi_1": f * c.d_model ** -0.5,
            "wo": f * c.d_ff ** -0.5}
    if kind in ("linear_weight", "embedding") and module in stds:
        return _normal(stds[module])
    raise ValueError(f"no init rule for T5 parameter {local!r}")


def init_rules(architecture: str, config) -> dict:
    """``{canonical name: Init}`` for every row of the table that owns storage, in table order."""
    root = _root_config(architecture, config)
    rules = {}
    for spec in owned(weight_table(architecture, config)):
        owner, local = _owner(spec.name, root)
        if isinstance(owner, OPTConfig):
            rules[spec.name] = _opt_rule(spec.kind, local, owner)
        elif isinstance(owner, T5Config):
            rules[spec.name] = _t5_rule(spec.kind, local, owner)
        else:
            rules[spec.name] = _blip_rule(spec.kind, local, owner, root)
    return rules


def _stream(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def draw(rule: Init, shape: tuple, seed: int, name: str) -> np.ndarray:
    """One row's float32 values under ``rule`` from the stream of ``(seed, name)``."""
    if rule.dist == "constant":
        return np.full(shape, rule.value, dtype=np.float32)
    rng = _stream(seed, name)
    std = np.float32(rule.std)
    values = rng.standard_normal(shape, dtype=np.float32) * std
    if rule.dist == "trunc_normal":
        outside = np.abs(values) > TRUNC_BOUND
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32) * std
            outside = np.abs(values) > TRUNC_BOUND
    elif rule.dist != "normal":
        raise ValueError(f"unknown distribution {rule.dist!r}")
    if rule.zero_row is not None:
        values[rule.zero_row] = 0.0
    return values


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def iter_random_weights(architecture: str, config, seed: int) -> Iterator[tuple]:
    """Yield ``(canonical name, float32 array)`` row by row (see the module docstring)."""
    seed = _check_seed(seed)
    table = weight_table(architecture, config)
    for name, rule in init_rules(architecture, config).items():
        yield name, draw(rule, table[name].shape, seed, name)


def random_weights(architecture: str, config, seed: int) -> dict:
    """``{canonical name: float32 array}`` for every storage-owning row, in table order."""
    return dict(iter_random_weights(architecture, config, seed))
