"""Original Salesforce BLIP and LAVIS BLIP-2 ``.pth`` checkpoints -> canonical names.

The renaming follows transformers' conversion scripts (see REFERENCE.md): BLIP's ``visual_encoder``
ViT becomes ``vision_model`` (``blocks`` -> ``encoder.layers``, ``attn.proj`` ->
``self_attn.projection``, ``norm1/2`` -> ``layer_norm1/2``, final ``norm`` -> ``post_layernorm``);
text keys keep their names. LAVIS additionally maps ``ln_vision`` -> ``post_layernorm``,
``Qformer.bert`` -> ``qformer`` (``attention.self`` -> ``attention.attention``, embeddings
LayerNorm -> ``qformer.layernorm``), ``opt_/t5_proj`` -> ``language_projection``,
``opt_/t5_model`` -> ``language_model`` and the retrieval heads; EVA's separate ``q_bias`` and
``v_bias`` are fused into one ``qkv.bias = [q | 0 | v]``.

Keys that belong to nothing the target class has (momentum encoders, queues, ``temp``, the
Q-Former's LM head, position-id buffers, another task's head) are returned as ``unused``; keys
under a module the class does have but with an unknown name stay, so the strict table check
reports them.

``resize_position_embedding`` resizes the patch grid of a checkpoint trained at another
resolution with PyTorch's bicubic kernel (``blip_core.interpolate``, the one implementation of
that rule), keeping the class position, as the original code and transformers do.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..interpolate import resize_grid

_VISION_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.", r"vision_model.encoder.layers.\1.self_attn."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
]
_LAVIS_RULES = [
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^Qformer\.bert\.", "qformer."),
    (r"^(qformer\.encoder\.layer\.\d+\.(?:cross)?attention)\.self\.", r"\1.attention."),
    (r"^(?:opt|t5)_proj\.", "language_projection."),
    (r"^(?:opt|t5)_model\.", "language_model."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
]
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.q_bias$")
# Sub-model classes whose tables have no tower prefix: strip it after renaming.
_STRIP = {"BlipVisionModel": "vision_model.", "Blip2VisionModel": "vision_model.",
          "Blip2QFormerModel": "qformer.", "BlipTextModel": "text_encoder."}


def load_original_state_dict(path, allow_pickle_bin: bool = False) -> dict:
    """The flat ``{name: array}`` model state of an original ``.pth`` (``{"model": ...}`` unwrapped)."""
    from ..checkpoint.errors import CheckpointError
    from ..safe_pickle import unpickle_torch_zip

    path = os.fspath(path)
    if not allow_pickle_bin:
        raise CheckpointError(
            f"{path}: original BLIP/LAVIS checkpoints are pickle files; they are read only with "
            "allow_pickle_bin=True (a restricted unpickler that builds tensors only and runs no code)")
    obj = unpickle_torch_zip(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(obj)


def is_lavis(state: dict) -> bool:
    return any(k.startswith(("Qformer.", "ln_vision.", "query_tokens")) for k in state)


def _fuse_qv_bias(state: dict) -> dict:
    """LAVIS/EVA keep q and v biases apart (k has none): fuse to the Linear's [q | 0 | v] bias."""
    out = {}
    for key, value in state.items():
        m = _QV_BIAS.match(key)
        if m:
            v_key = f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"
            if v_key not in state:
                raise ValueError(f"{key} has no matching {v_key}")
            v = state[v_key]
            out[f"visual_encoder.blocks.{m.group(1)}.attn.qkv.bias"] = np.concatenate([value, np.zeros_like(v), v])
        elif not key.endswith(".attn.v_bias") or not key.startswith("visual_encoder.blocks."):
            out[key] = value
        elif key.replace(".v_bias", ".q_bias") not in state:
            raise ValueError(f"{key} has no matching q_bias")
    return out


def rename_original(state: dict, table: dict, architecture: str) -> tuple:
    """``(renamed state, unused original names)`` for an original BLIP or LAVIS state dict."""
    lavis = is_lavis(state)
    rules = _VISION_RULES + (_LAVIS_RULES if lavis else [])
    if lavis or any(_QV_BIAS.match(k) for k in state):   # EVA's ViT, inside LAVIS or on its own
        state = _fuse_qv_bias(state)
    tops = {name.split(".", 1)[0] for name in table}
    strip = _STRIP.get(architecture)
    renamed, unused, origin = {}, [], {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        if strip and new.startswith(strip):
            new = new[len(strip):]
        if new not in table and (new.endswith(".position_ids") or new.split(".", 1)[0] not in tops):
            unused.append(key)
            continue
        if new in renamed:
            raise ValueError(f"original keys {origin[new]!r} and {key!r} both map to {new!r}")
        renamed[new], origin[new] = value, key
    return renamed, unused


def resize_position_embedding(pos: np.ndarray, new_grid: int, num_extra_tokens: int = 1) -> np.ndarray:
    """(1, extra + g*g, D) -> (1, extra + new_grid**2, D): the square patch grid resized bicubically,
    the class position kept, as the original BLIP code (``interpolate_pos_embed``) does."""
    pos = np.asarray(pos)
    n = pos.shape[1] - num_extra_tokens
    grid = int(round(n ** 0.5))
    if pos.ndim != 3 or pos.shape[0] != 1 or grid * grid != n:
        raise ValueError(f"position embedding of shape {pos.shape} has no square patch grid to resize")
    if grid == new_grid:
        return pos
    patches = pos[0, num_extra_tokens:].reshape(grid, grid, -1)                       # (g, g, D)
    resized = resize_grid(patches, new_grid, new_grid).reshape(1, new_grid ** 2, -1)
    return np.concatenate([pos[:, :num_extra_tokens], resized], axis=1)
