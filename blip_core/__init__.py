"""blip_core: the framework-neutral spec layer of the BLIP / BLIP-2 library.

Configs, weight tables, preprocessing, checkpoint I/O and helpers shared by every backend. This
package never imports torch, tensorflow, jax or flax, nor anything above it (``backends``,
``converters``, ``blip_apps``): loading a checkpoint in a backend chosen by name is
``blip_apps.load``.
"""
from __future__ import annotations

import os

from .configs import (Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipConfig, BlipTextConfig,
                      BlipVisionConfig, OPTConfig, T5Config, load_config)
from .numerics import to_numpy
from .registry import BACKENDS, register_tensor_type

__version__ = "0.1.0"


def architecture_of(path: str) -> str:
    """The class name a checkpoint directory's ``config.json`` declares in ``architectures``."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    from .jsonfile import read_json_file
    data = read_json_file(cfg_path, what="config file")
    archs = data.get("architectures") or []
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ValueError(f"{cfg_path} names no 'architectures'; load the class directly instead")
    from .weights import ARCHITECTURES
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {archs[0]!r} in {cfg_path}; known: {', '.join(ARCHITECTURES)}")
    return archs[0]


def __getattr__(name: str):
    # A pointer for code written against the old layout, where `load` lived here.
    if name == "load":
        raise AttributeError("blip_core.load moved to blip_apps.load (the spec layer imports no backend)")
    raise AttributeError(f"module 'blip_core' has no attribute {name!r}")


__all__ = ["BACKENDS", "Blip2Config", "Blip2QFormerConfig", "Blip2VisionConfig", "BlipConfig", "BlipTextConfig",
           "BlipVisionConfig", "OPTConfig", "T5Config", "architecture_of", "load_config", "register_tensor_type",
           "to_numpy", "__version__"]
