"""The config of a checkpoint that has none: a named preset, sizes read from the state dict, and
explicit overrides, in that order of precedence (lowest first).

Original BLIP and LAVIS ``.pth`` files carry no config. ``resolve_config`` builds one from

1. a preset (``blip_core.presets``): given by name, or chosen from the architecture and the widths
   found in the checkpoint;
2. what the state dict shows: architecture (which heads and towers it holds), widths, depths,
   vocabularies, resolution (position grid x patch), Q-Former cross-attention frequency and
   text input, number of queries. Attention head counts are not visible in any shape: they keep
   the preset's head width (or come from an override);
3. ``overrides``: ``{"section.field": value}`` (``--set section.field=value`` in the CLI).

Every value taken from the state dict is named in the returned notes, with its origin.
"""
from __future__ import annotations

import json
import os
import re

from blip_core.configs import config_from_dict
from blip_core.formats import original
from blip_core.presets import PRESETS, preset_dict, set_field


def _layers(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names for m in [re.match(pattern, n)] if m}
    return max(found) + 1 if found else 0


def infer_architecture(shapes: dict):
    """The model class an original BLIP / LAVIS state dict holds, or None."""
    def has(prefix):
        return any(n.startswith(prefix) for n in shapes)
    if has("Qformer.") or has("query_tokens"):
        if has("opt_proj.") or has("t5_proj.") or has("opt_model.") or has("t5_model."):
            return "Blip2ForConditionalGeneration"
        if has("itm_head.") or has("vision_proj."):
            return "Blip2ForImageTextRetrieval"
        return None
    if has("text_decoder.") and has("text_encoder."):
        return "BlipForQuestionAnswering"
    if has("text_decoder."):
        return "BlipForConditionalGeneration"
    if has("text_encoder.") and has("itm_head."):
        return "BlipForImageTextRetrieval"
    return None


def _vision_sizes(shapes: dict, out: dict, section: str) -> None:
    cls = shapes.get("visual_encoder.cls_token")
    if cls is None:
        return
    patch = shapes["visual_encoder.patch_embed.proj.weight"][-1]
    grid = round((shapes["visual_encoder.pos_embed"][1] - 1) ** 0.5)
    out.update({f"{section}.hidden_size": cls[-1], f"{section}.patch_size": patch,
                f"{section}.image_size": grid * patch,
                f"{section}.num_hidden_layers": _layers(shapes, r"visual_encoder\.blocks\.(\d+)\."),
                f"{section}.intermediate_size": shapes["visual_encoder.blocks.0.mlp.fc1.weight"][0]})


def _bert_sizes(shapes: dict, out: dict, section: str, prefix: str, ffn: str = "intermediate") -> None:
    words = shapes.get(f"{prefix}embeddings.word_embeddings.weight")
    if words is not None:
        out[f"{section}.vocab_size"] = words[0]
        out[f"{section}.max_position_embeddings"] = shapes[f"{prefix}embeddings.position_embeddings.weight"][0]
    layer0 = shapes.get(f"{prefix}encoder.layer.0.attention.self.query.weight")
    if layer0 is not None:
        out[f"{section}.hidden_size"] = layer0[0]
        out[f"{section}.num_hidden_layers"] = _layers(shapes, re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
        out[f"{section}.intermediate_size"] = shapes[f"{prefix}encoder.layer.0.{ffn}.dense.weight"][0]


def _lm_sizes(shapes: dict, out: dict) -> None:
    opt = shapes.get("opt_model.model.decoder.embed_tokens.weight")
    if opt is not None:
        p = "opt_model.model.decoder."
        out.update({"text_config.model_type": "opt", "text_config.vocab_size": opt[0],
                    "text_config.word_embed_proj_dim": opt[1],
                    "text_config.hidden_size": shapes[p + "layers.0.self_attn.q_proj.weight"][0],
                    "text_config.ffn_dim": shapes[p + "layers.0.fc1.weight"][0],
                    "text_config.num_hidden_layers": _layers(shapes, re.escape(p) + r"layers\.(\d+)\."),
                    "text_config.max_position_embeddings": shapes[p + "embed_positions.weight"][0] - 2})
    t5 = shapes.get("t5_model.shared.weight")
    if t5 is not None:
        p = "t5_model."
        out.update({"text_config.model_type": "t5", "text_config.vocab_size": t5[0], "text_config.d_model": t5[1],
                    "text_config.d_ff": shapes[p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                    "text_config.num_layers": _layers(shapes, r"t5_model\.encoder\.block\.(\d+)\."),
                    "text_config.num_decoder_layers": _layers(shapes, r"t5_model\.decoder\.block\.(\d+)\.")})
        bias = shapes.get(p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        if bias is not None:     # (buckets, heads): T5 is the one stack whose head count shows in a shape
            heads = bias[1]
            out.update({"text_config.relative_attention_num_buckets": bias[0], "text_config.num_heads": heads,
                        "text_config.d_kv": shapes[p + "encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads})


def infer_sizes(shapes: dict, architecture: str) -> dict:
    """``{"section.field": value}`` read from the shapes of an original state dict."""
    out: dict = {}
    if architecture.startswith("Blip2"):
        _vision_sizes(shapes, out, "vision_config")
        q = shapes.get("query_tokens")
        if q is not None:
            out["num_query_tokens"] = q[1]
        _bert_sizes(shapes, out, "qformer_config", "Qformer.bert.", ffn="intermediate_query")
        cross = sorted({int(m.group(1)) for n in shapes
                        for m in [re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.", n)] if m})
        if len(cross) > 1:
            out["qformer_config.cross_attention_frequency"] = cross[1] - cross[0]
        if any(n.startswith("Qformer.bert.encoder.layer.0.intermediate.dense.") for n in shapes):
            out["qformer_config.use_qformer_text_input"] = True
        _lm_sizes(shapes, out)
    else:
        _vision_sizes(shapes, out, "vision_config")
        prefix = "text_decoder.bert." if architecture == "BlipForConditionalGeneration" else "text_encoder."
        _bert_sizes(shapes, out, "text_config", prefix)
    return {k: v if isinstance(v, (bool, str)) else int(v) for k, v in out.items()}


def choose_preset(architecture: str, sizes: dict) -> str:
    """The preset of ``architecture`` whose widths match ``sizes`` best (first of the family if none)."""
    keys = ("vision_config.hidden_size", "text_config.hidden_size", "text_config.d_model", "text_config.model_type")
    family = [n for n, (a, _, _) in PRESETS.items() if a == architecture]
    if architecture == "Blip2ForConditionalGeneration":   # OPT or T5 first, then widths
        kind = sizes.get("text_config.model_type", "opt")
        family = [n for n in family if PRESETS[n][1]["text_config"]["model_type"] == kind]

    def score(name):
        data = PRESETS[name][1]
        hits = 0
        for key in keys:
            section, _, fld = key.partition(".")
            if key in sizes and data.get(section, {}).get(fld) == sizes[key]:
                hits += 1
        return hits
    return max(family, key=score)


_HEADS = {"vision_config.hidden_size": "vision_config.num_attention_heads",
          "text_config.hidden_size": "text_config.num_attention_heads",
          "qformer_config.hidden_size": "qformer_config.num_attention_heads"}


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _keep_head_width(data: dict, base: dict, sizes: dict, explicit: dict, notes: list) -> None:
    pairs = dict(_HEADS)
    if data.get("text_config", {}).get("model_type") == "t5":
        pairs = {k: v for k, v in pairs.items() if not k.startswith("text_config")}
        pairs["text_config.d_model"] = "text_config.num_heads"
    for width, heads in pairs.items():
        if width not in sizes or heads in explicit or heads in sizes or _get(base, width) is None:
            continue
        if sizes[width] == _get(base, width):
            continue
        head_dim = _get(base, width) // _get(base, heads)
        if width == "text_config.d_model":
            head_dim = _get(base, "text_config.d_kv")
        if sizes[width] % head_dim:
            raise ValueError(f"{width}={sizes[width]} is not a multiple of the preset's head width {head_dim}; "
                             f"give the head count in overrides= ({heads}=N)")
        set_field(data, heads, sizes[width] // head_dim)
        notes.append(f"{heads}={sizes[width] // head_dim} (the preset's head width {head_dim})")


_SIZE_KEYS = ("_size", "_dim", "_layers", "layers", "heads", "d_model", "d_ff", "d_kv", "embeddings", "_frequency")


def resolve_config(shapes: dict, architecture: str | None = None, preset: str | None = None,
                   overrides: dict | None = None, component_configs: dict | None = None) -> tuple:
    """``(architecture, config, notes)`` for an original state dict given as ``{name: shape}``.

    ``component_configs``: ``{"vision_config" | "qformer_config" | "text_config": config.json dict}``
    of the checkpoints that supply towers (``converters.components``); their sizes are used for a
    tower the state dict does not hold.
    """
    if preset is not None and preset not in PRESETS:
        preset_dict(preset)       # an unknown name is the error, not what inferring without it then says
    notes: list = []
    explicit = dict(overrides or {})
    arch = architecture or (PRESETS[preset][0] if preset is not None else None) or infer_architecture(shapes)
    if arch is None:
        raise ValueError("cannot tell the architecture from the checkpoint's names; give architecture=")
    if not architecture and not preset:
        notes.append(f"inferred architecture {arch} from the checkpoint's names")
    sizes = infer_sizes(shapes, arch)
    for section, data in (component_configs or {}).items():
        if any(k.startswith(section + ".") for k in sizes):
            continue
        taken = {f"{section}.{k}": v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)
                 and k.endswith(_SIZE_KEYS)}
        sizes.update(taken)
        if section == "text_config" and data.get("model_type"):
            sizes["text_config.model_type"] = data["model_type"]
        if taken:
            notes.append(f"{section} sizes from the config.json of the checkpoint that supplies that tower")
    name = preset or choose_preset(arch, sizes)
    base_arch, base = preset_dict(name)
    if base_arch != arch:
        raise ValueError(f"preset {name!r} builds {base_arch}, not {arch}")
    if "text_config.model_type" in sizes and sizes["text_config.model_type"] != _get(base, "text_config.model_type"):
        raise ValueError(f"the language model of preset {name!r} is {_get(base, 'text_config.model_type').upper()}; "
                         f"the checkpoint's is {sizes['text_config.model_type'].upper()}")
    sizes.pop("text_config.model_type", None)
    notes.append(f"config from preset {name!r}" + ("" if preset else " (chosen by the checkpoint's widths)"))
    data = json.loads(json.dumps(base))
    changed = []
    for key, value in sizes.items():
        if key in explicit:
            continue
        if _get(base, key) != value:
            changed.append(f"{key}={value}")
        set_field(data, key, value)
    if changed:
        notes.append("from the checkpoint's shapes: " + ", ".join(changed))
    _keep_head_width(data, base, sizes, explicit, notes)
    for key, value in explicit.items():
        set_field(data, key, value)
    cfg = config_from_dict(data)
    cfg.extra["architectures"] = [arch]
    cfg.validate_for(arch)
    return arch, cfg, notes


def parse_overrides(items) -> dict:
    """``["a.b=3", "c=true"]`` -> ``{"a.b": 3, "c": True}`` (values read as JSON when they parse)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _has_config(src: str, weights_path: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, "config.json"))
               for folder in (src, os.path.dirname(weights_path)) if os.path.isdir(folder))


def plan_config(src, fmt: str, weights_path: str, config, preset, overrides, architecture, allow_pickle_bin: bool,
                component_configs, read_config) -> tuple:
    """``(config, architecture, notes, original state dict or None)`` of a conversion.

    ``config=`` or the source's ``config.json`` (read by ``read_config``) decide when given;
    otherwise ``preset=`` and/or the state dict of an original ``.pth`` (``resolve_config``).
    """
    if config is not None and preset is not None:
        raise ValueError("give config= or preset=, not both")
    if config is not None or (preset is None and (fmt != "original" or _has_config(src, weights_path))):
        if overrides:
            raise ValueError("overrides= apply to preset= or to a config read from an original .pth, "
                             "not to config= or config.json")
        cfg = read_config(src, weights_path, config)
        return cfg, architecture or (cfg.architectures or [None])[0], [], None
    state, shapes = None, {}
    if fmt == "original":
        state = original.load_original_state_dict(weights_path, allow_pickle_bin=allow_pickle_bin)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    arch, cfg, notes = resolve_config(shapes, architecture, preset, overrides, component_configs)
    return cfg, arch, notes, state
