"""blip_apps: applications on top of the library: the ``blip`` command line, the demo, ``load``.

It sits above the spec layer (``blip_core``), the backends and the converters, and may import any
of them; none of them imports it. Dataset pipelines, export and training loops belong here too.
"""
from __future__ import annotations

import importlib

from blip_core import BACKENDS, __version__, architecture_of


def load(path: str, backend: str = "torch", **kwargs):
    """Load a checkpoint directory in ``backend``, picking the class from ``config.json``.

    ``kwargs`` go to the class's ``from_pretrained`` (``dtype=...``, ``allow_pickle_bin=...``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    arch = architecture_of(path)
    module = importlib.import_module(f"backends.{backend}")
    cls = getattr(module, arch, None)
    if cls is None:
        raise NotImplementedError(f"the {backend} backend does not implement {arch} yet")
    return cls.from_pretrained(path, **kwargs)


__all__ = ["load", "__version__"]
