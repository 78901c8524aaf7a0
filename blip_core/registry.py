"""The backends by name, and what each one registers with the spec layer when it is imported.

The spec layer names the backends but never imports one, not even lazily: dependencies point
down only. What needs a framework (making its tensors for the processors' ``return_tensors``)
is handed in by the backend package itself, from its ``__init__``.
"""
from __future__ import annotations

from typing import Callable

# Every backend, in the column order used by the CLI, the parity harness and the benchmarks.
BACKENDS = ("torch", "tf", "jax")

# transformers' ``return_tensors`` names of framework tensors -> the backend that makes them.
TENSOR_TYPE_BACKENDS = {"pt": "torch", "tf": "tf", "jax": "jax"}

_TENSOR_MAKERS: dict = {}
_TENSOR_MOVERS: dict = {}
# the top-level module of a tensor's type -> its ``return_tensors`` name
_MODULE_TYPES = {"torch": "pt", "tensorflow": "tf", "jax": "jax", "jaxlib": "jax"}


def register_tensor_type(name: str, fn: Callable, move: Callable | None = None) -> None:
    """Make ``return_tensors=name`` use ``fn(value, empty)``; called by a backend package on import.

    ``value`` is a rectangular list (of lists or numpy arrays) or a numpy array; ``empty`` says the
    batch holds no tokens, so integer lists get the framework's default integer dtype.
    """
    if name not in TENSOR_TYPE_BACKENDS:
        raise ValueError(f"unknown tensor type {name!r}; known: {', '.join(TENSOR_TYPE_BACKENDS)}")
    _TENSOR_MAKERS[name] = fn
    if move is not None:
        _TENSOR_MOVERS[name] = move


def tensor_mover(value) -> Callable | None:
    """``move(value, *args, **kwargs)`` for a framework tensor (``BatchFeature.to``), None for others.

    ``move`` is registered with the tensor type by the backend that makes such tensors; a
    tensor's framework is known from its type's module, so nothing is imported here.
    """
    name = _MODULE_TYPES.get(type(value).__module__.split(".")[0])
    return None if name is None else _TENSOR_MOVERS.get(name)


def tensor_maker(name: str) -> Callable:
    """The function registered for ``name``; a clear error names the backend to import when none is."""
    try:
        return _TENSOR_MAKERS[name]
    except KeyError:
        backend = TENSOR_TYPE_BACKENDS[name]
        raise ValueError(f"return_tensors={name!r} needs the {backend} backend: import backends.{backend} first "
                         f"(return_tensors='np' works without any)") from None
