"""TensorFlow's side of the persistent compilation cache (policy: ``blip_core.persistent_cache``).

XLA's persistent cache in TensorFlow has no Python switch, only ``TF_XLA_FLAGS``, which TensorFlow
parses once, as soon as it runs its first op; so the flag is set when ``backends.tf`` is imported,
before TensorFlow is, and this module itself never imports TensorFlow.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

from blip_core import persistent_cache

FLAG = "--tf_xla_persistent_cache_directory"
_APPLIED: dict = {}      # "dir": the folder applied (None: off), once per process
_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
                  "tf-nightly", "tf-nightly-cpu")


def tensorflow_version() -> str:
    """The installed TensorFlow's version, read from its distribution (importing it would parse the flags)."""
    for name in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def apply_persistent_cache() -> Optional[str]:
    """Add the cache folder to ``TF_XLA_FLAGS`` once per process (a directory already there stays).
    Returns the folder in use by this module's choice, None when off or left to the caller's flags."""
    if "dir" not in _APPLIED:
        flags = os.environ.get("TF_XLA_FLAGS", "")
        path = None
        if FLAG not in flags:
            path = persistent_cache.cache_dir("tf", tensorflow_version())
            if path is not None:
                persistent_cache.prune()          # the folder's bound (BLIP_COMPILE_CACHE_MAX_MB)
                os.environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={path}".strip()
        _APPLIED["dir"] = path
    return _APPLIED["dir"]
