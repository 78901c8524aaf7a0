"""blip_core: the framework-neutral spec layer of the BLIP / BLIP-2 library.

Configs, weight tables, preprocessing, checkpoint I/O and helpers shared by every backend. This
package never imports torch, tensorflow, jax or flax.
"""
from __future__ import annotations

import importlib
import json
import os

from .configs import (Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipConfig, BlipTextConfig,
                      BlipVisionConfig, OPTConfig, T5Config, load_config)
from .numerics import to_numpy

__version__ = "0.1.0"

BACKEND_MODULES = {"torch": "backends.torch", "tf": "backends.tf", "jax": "backends.jax"}


def architecture_of(path: str) -> str:
    """The class name a checkpoint directory's ``config.json`` declares in ``architectures``."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    archs = data.get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_path} names no 'architectures'; load the class directly instead")
    from .weights import ARCHITECTURES
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {archs[0]!r} in {cfg_path}; known: {', '.join(ARCHITECTURES)}")
    return archs[0]


def load(path: str, backend: str = "torch", **kwargs):
    """Load a checkpoint directory in ``backend``, picking the class from ``config.json``."""
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_MODULES)}")
    arch = architecture_of(path)
    module = importlib.import_module(BACKEND_MODULES[backend])
    cls = getattr(module, arch, None)
    if cls is None:
        raise NotImplementedError(f"the {backend} backend does not implement {arch} yet")
    return cls.from_pretrained(path, **kwargs)


__all__ = ["Blip2Config", "Blip2QFormerConfig", "Blip2VisionConfig", "BlipConfig", "BlipTextConfig",
           "BlipVisionConfig", "OPTConfig", "T5Config", "architecture_of", "load", "load_config", "to_numpy",
           "__version__"]
