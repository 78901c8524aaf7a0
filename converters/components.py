"""Towers taken from other checkpoints: ``vision_model=``, ``qformer=``, ``language_model=``.

LAVIS's trainer saves only the parameters that were trained, so a BLIP-2 checkpoint fine-tuned with
``freeze_vit=True`` has no ``visual_encoder.*``, and none holds the frozen OPT/T5. A component
source fills in the names of its tower that the main checkpoint lacks; names the main checkpoint
has are kept from it (and counted in a note). A component may be:

* a Hugging Face directory or file (safetensors, single or sharded; ``.bin`` with
  ``allow_pickle_bin=True``) of the whole model (``vision_model.*``, ``language_model.*``), of the
  tower alone (``Blip2VisionModel``: ``embeddings.*``; ``OPTForCausalLM``: ``model.decoder.*``;
  ``OPTModel``: ``decoder.*``; ``T5ForConditionalGeneration``: ``shared.*``, ``encoder.*``), with or
  without a leading ``model.``;
* an original ``.pth``: a LAVIS / BLIP checkpoint, or the bare EVA ViT-g file LAVIS starts from
  (``blocks.*``, ``cls_token``; its 40th block, which LAVIS drops, is left out and named).

Names of the tower the target table has no place for are an error (strict loading), except
vision or language-model layers beyond the target's depth.
"""
from __future__ import annotations

import json
import os
import re

from blip_core import checkpoint
from blip_core.formats import original

from .sources import BinSource, DictSource, SafetensorsSource, Source, detect_format, open_source

# API argument -> (CLI flag, canonical prefixes of the tower)
COMPONENTS = {
    "vision_model": ("--vision-model", ("vision_model.",)),
    "qformer": ("--qformer", ("qformer.", "query_tokens")),
    "language_model": ("--language-model", ("language_model.",)),
}
_DEEPER = re.compile(r"^(?:vision_model\.encoder\.layers|language_model\.model\.decoder\.layers|"
                     r"language_model\.(?:encoder|decoder)\.block)\.(\d+)\.")


# First names of a whole BLIP-2 checkpoint's towers and heads.
_WHOLE_MODEL_TOPS = ("vision_model.", "qformer.", "language_model.", "language_projection.", "query_tokens",
                     "embeddings.", "vision_projection.", "text_projection.", "itm_head.")


def _owned(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


def _open_raw(component: str, path, table: dict, architecture: str, allow_pickle_bin: bool):
    """``(reader, {canonical name: stored name})`` for a component checkpoint."""
    fmt, weights = detect_format(path)
    if fmt == "safetensors":
        reader = SafetensorsSource(weights)
    elif fmt == "bin":
        if not allow_pickle_bin:
            raise checkpoint.CheckpointError(
                f"{path}: {component}= is a pickle-based .bin checkpoint; it is read only with allow_pickle_bin=True")
        reader = BinSource(weights, allow_pickle_bin)
    elif fmt == "original":
        state = original.load_original_state_dict(weights, allow_pickle_bin=allow_pickle_bin)
        if "cls_token" in state or any(k.startswith("blocks.") for k in state):   # bare EVA / timm ViT
            state = {f"visual_encoder.{k}": v for k, v in state.items()}
        renamed, unused = original.rename_original(state, table, architecture)
        reader = DictSource(renamed)
        if unused:
            reader.notes.append(f"{component}: left out {len(unused)} key(s) of {path} with no place in "
                                f"{architecture}: {', '.join(unused[:6])}{', ...' if len(unused) > 6 else ''}")
        return reader, {n: n for n in renamed}
    else:
        raise ValueError(f"{path}: {component}= must be a Hugging Face safetensors/.bin checkpoint or an original "
                         f".pth, not {fmt}")
    prefix = COMPONENTS[component][1][0]
    mapping = {}
    for stored in reader.names():
        bare = stored.removeprefix("model.")
        for cand in (stored, prefix + stored, prefix + "model." + stored, prefix + bare):
            if cand in table:
                mapping[cand] = stored
                break
        else:   # unplaced: another tower of a whole model (ignored), or this tower's (reported by the caller)
            mapping.setdefault(stored if stored.startswith(_WHOLE_MODEL_TOPS) else prefix + stored, stored)
    return reader, mapping


_SECTIONS = {"vision_model": "vision_config", "qformer": "qformer_config", "language_model": "text_config"}


def component_configs(components: dict) -> dict:
    """``{config section: config.json dict}`` of the component checkpoints that have one (a whole
    BLIP-2 model gives its matching section, a tower saved alone its own config)."""
    out = {}
    for component, path in components.items():
        path = os.fspath(path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(folder, "config.json")
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
        section = _SECTIONS[component]
        out[section] = data.get(section, {}) if data.get("model_type") == "blip-2" else data
    return out


class ComposedSource(Source):
    """The main checkpoint plus the names component checkpoints supply."""

    def __init__(self, main: Source, table: dict, architecture: str, components: dict, allow_pickle_bin: bool):
        super().__init__()
        self.format, self.main = main.format, main
        self.unexpected, self.notes, self.files = list(main.unexpected), list(main.notes), list(main.files)
        self._from: dict = {}
        self._readers: list = []
        have = set(main.names())
        for component, path in components.items():
            flag_prefixes = COMPONENTS[component][1]
            reader, mapping = _open_raw(component, os.fspath(path), table, architecture, allow_pickle_bin)
            self._readers.append(reader)
            self.notes += reader.notes
            self.files += list(reader.files) or [os.fspath(path)]
            supplied, kept, deeper, stray = [], [], set(), []
            for name, stored in mapping.items():
                if not _owned(name, flag_prefixes):
                    continue
                spec = table.get(name)
                if spec is None:
                    m = _DEEPER.match(name)
                    if m and not any(n.startswith(m.group(0)) for n in table):   # a layer the model lacks
                        deeper.add(int(m.group(1)))
                    else:
                        stray.append(stored)
                elif spec.tied_to is not None:
                    continue
                elif name in have:
                    kept.append(name)
                else:
                    supplied.append(name)
                    self._from[name] = (reader, stored)
            if stray:
                raise checkpoint.StateDictMismatchError(
                    f"{path} ({component}=): {len(stray)} name(s) with no place in {architecture}: "
                    + ", ".join(stray[:10]), [], stray, [])
            if not supplied:
                raise ValueError(f"{path} ({component}=) supplies no {component} weight that {main.files[0]} lacks")
            note = f"{component}: {len(supplied)} tensor(s) from {path}"
            if kept:
                note += f"; {len(kept)} kept from the main checkpoint ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})"
            if deeper:
                note += f"; left out its layer(s) {', '.join(map(str, sorted(deeper)))}, deeper than the model"
            self.notes.append(note)
            have |= set(supplied)

    def names(self):
        return self.main.names() + list(self._from)

    def _owner(self, name):
        return self._from.get(name, (self.main, name))

    def shape(self, name):
        reader, key = self._owner(name)
        return reader.shape(key)

    def dtype(self, name):
        reader, key = self._owner(name)
        return reader.dtype(key)

    def get(self, name):
        reader, key = self._owner(name)
        return reader.get(key)

    def close(self):
        for reader in self._readers:
            reader.close()
        self.main.close()


def requested(**paths) -> dict:
    """``{component: path}`` of the components given (None values dropped)."""
    return {k: v for k, v in paths.items() if v is not None}


def open_with_components(fmt: str, path, table: dict, architecture: str, allow_pickle_bin: bool, state,
                         components: dict) -> Source:
    """The source reader (``sources.open_source``), completed by the component checkpoints if any."""
    source = open_source(fmt, path, table, architecture, allow_pickle_bin, state)
    if not components:
        return source
    try:
        return ComposedSource(source, table, architecture, components, allow_pickle_bin)
    except BaseException:
        source.close()
        raise
