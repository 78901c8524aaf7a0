"""Test helper: state dicts in the key layout of the original Salesforce code, written from the
documented renaming (REFERENCE.md, "Converting from the original Salesforce code"), inverted.

``to_original(sd)`` takes a canonical (Hugging Face) state dict of a BLIP or BLIP-2 model and
returns the names the original BLIP repository / LAVIS would store. BLIP-2's fused
``qkv.bias = [q | 0 | v]`` is split into LAVIS's ``q_bias`` and ``v_bias``; its k third must be
zero (the original has no k bias), which ``zero_k_bias`` arranges.
"""
import re

import numpy as np

# (regex on the canonical name, replacement), applied in order
_VISION = [(r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
           (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
           (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
           (r"^vision_model\.encoder\.layers\.", "visual_encoder.blocks."), (r"\.self_attn\.projection\.", ".attn.proj."),
           (r"\.self_attn\.qkv\.", ".attn.qkv."), (r"\.layer_norm([12])\.", r".norm\1.")]
_BLIP_VISION_NORM = [(r"^vision_model\.post_layernorm\.", "visual_encoder.norm.")]
_LAVIS = [(r"^vision_model\.post_layernorm\.", "ln_vision."),
          (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
          (r"^embeddings\.", "Qformer.bert.embeddings."),
          (r"^qformer\.", "Qformer.bert."), (r"attention\.attention\.", "attention.self."),
          (r"^vision_projection\.", "vision_proj."), (r"^text_projection\.", "text_proj.")]


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def zero_k_bias(sd: dict) -> dict:
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith("vision_model.") and k.endswith("self_attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k] = np.concatenate([v[:d], np.zeros(d, v.dtype), v[2 * d:]])
    return out


def to_original(sd: dict, lm: str = "opt") -> dict:
    """Canonical names -> original BLIP (``lm=None`` for BLIP) or LAVIS BLIP-2 names."""
    blip2 = any(k.startswith("qformer.") for k in sd)
    out = {}
    for k, v in sd.items():
        if blip2 and k.endswith("self_attn.qkv.bias"):
            i, d = k.split(".")[3], v.shape[0] // 3
            assert not v[d:2 * d].any(), "LAVIS has no k bias: use zero_k_bias first"
            out[f"visual_encoder.blocks.{i}.attn.q_bias"] = v[:d]
            out[f"visual_encoder.blocks.{i}.attn.v_bias"] = v[2 * d:]
            continue
        new = _rename(k, _VISION + (_LAVIS if blip2 else _BLIP_VISION_NORM))
        if blip2:
            new = re.sub(r"^language_projection\.", f"{lm}_proj.", new)
            new = re.sub(r"^language_model\.", f"{lm}_model.", new)
        out[new] = v
    return out


def torch_save(sd: dict, path, wrap: bool = True):
    """torch.save a numpy state dict, wrapped as the original trainers save ({"model": ..., "epoch": ...})."""
    import torch
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    torch.save({"model": tensors, "epoch": 1} if wrap else tensors, path)
