"""The weight-table vocabulary: one row per parameter, and the invertible layout transforms.

A weight table is an ordered ``dict[str, WeightSpec]`` keyed by canonical name (the Hugging Face
PyTorch state-dict key). Every loader, saver, converter and fixture generator reads the same
table; backends never guess names or reshape until shapes fit.

Per-backend naming rules (``backend_path``):

* ``torch``: the canonical name itself (torch modules mirror Hugging Face attribute names).
* ``jax``:   Flax linen param-tree path, a tuple. ``layers.3`` becomes ``layers_3`` (how linen
  names list submodules); the leaf is renamed by kind: linear/conv ``weight`` -> ``kernel``,
  embedding ``weight`` -> ``embedding``, norm ``weight`` -> ``scale``.
* ``tf``:    a ``/``-joined path with the same list rule as jax and Keras leaf names:
  ``kernel``, ``embeddings``, norm ``gamma`` / ``beta``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..registry import BACKENDS


@dataclass(frozen=True)
class Transform:
    """A named invertible layout change from the canonical (torch) layout to jax/tf layout."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]   # canonical -> jax/tf
    inverse: Callable[[np.ndarray], np.ndarray]   # jax/tf -> canonical
    # The same change as an axis permutation (``forward(a) == a.transpose(perm)``), so a backend can
    # run it with its own (multithreaded, on-device) transpose while loading; None for the identity.
    perm: Optional[tuple] = None

    @property
    def inverse_perm(self) -> Optional[tuple]:
        return None if self.perm is None else tuple(int(i) for i in np.argsort(self.perm))

    def canonical_shape(self, shape) -> tuple:
        """The canonical (torch) shape of a tensor stored in the jax/tf layout with ``shape``."""
        shape = tuple(shape)
        if self.perm is None or len(shape) != len(self.perm):
            return shape
        return tuple(shape[i] for i in self.inverse_perm)

    def __repr__(self) -> str:
        return f"Transform({self.name})"


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# nn.Linear weight (out, in) <-> Dense kernel (in, out)
LINEAR = Transform("linear", lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T), (1, 0))
# Conv2d weight OIHW <-> HWIO
CONV2D = Transform(
    "conv2d",
    lambda a: np.ascontiguousarray(a.transpose(2, 3, 1, 0)),
    lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1)),
    (2, 3, 1, 0),
)
TRANSFORMS = {t.name: t for t in (IDENTITY, LINEAR, CONV2D)}

# Parameter kinds. The kind decides the leaf rename and the layout transform.
KINDS = ("linear_weight", "conv_weight", "embedding", "norm_weight", "bias", "param")
_KIND_TRANSFORM = {
    "linear_weight": LINEAR,
    "conv_weight": CONV2D,
    "embedding": IDENTITY,
    "norm_weight": IDENTITY,
    "bias": IDENTITY,
    "param": IDENTITY,
}
_JAX_LEAF = {"linear_weight": "kernel", "conv_weight": "kernel", "embedding": "embedding",
             "norm_weight": "scale"}
_TF_LEAF = {"linear_weight": "kernel", "conv_weight": "kernel", "embedding": "embeddings",
            "norm_weight": "gamma"}


@dataclass(frozen=True)
class WeightSpec:
    """One parameter of one architecture.

    name:    canonical name, the Hugging Face PyTorch state-dict key.
    shape:   canonical (torch-layout) shape.
    kind:    one of KINDS; decides the per-backend leaf name and layout transform.
    tied_to: canonical name whose tensor this one shares (absent from safetensors files written
             by transformers; present in ``.bin`` files). ``None`` for an owned parameter.
    norm_bias: True for a LayerNorm bias (renamed ``beta`` in tf).
    """

    name: str
    shape: tuple
    kind: str
    tied_to: Optional[str] = None
    norm_bias: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"WeightSpec {self.name!r}: unknown kind {self.kind!r}")

    @property
    def transform(self) -> Transform:
        return _KIND_TRANSFORM[self.kind]

    def backend_shape(self, backend: str) -> tuple:
        if backend == "torch" or self.transform is IDENTITY:
            return tuple(self.shape)
        return tuple(self.transform.forward(np.empty(self.shape, dtype=np.uint8)).shape)

    def backend_path(self, backend: str):
        return backend_path(self.name, self.kind, backend, self.norm_bias)

    def to_backend(self, backend: str, array: np.ndarray) -> np.ndarray:
        """Canonical-layout array -> the backend's layout."""
        return array if backend == "torch" else self.transform.forward(array)

    def from_backend(self, backend: str, array: np.ndarray) -> np.ndarray:
        """Backend-layout array -> canonical layout."""
        return array if backend == "torch" else self.transform.inverse(array)


_LIST_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def backend_path(name: str, kind: str, backend: str, norm_bias: bool = False):
    """The parameter's address in a backend (see module docstring)."""
    if backend == "torch":
        return name
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    parts = _LIST_INDEX.sub(r"_\1", name).split(".")
    leaf = parts[-1]
    if leaf == "weight":
        table = _JAX_LEAF if backend == "jax" else _TF_LEAF
        if kind in table:
            parts[-1] = table[kind]
    elif leaf == "bias" and norm_bias and backend == "tf":
        parts[-1] = "beta"
    return tuple(parts) if backend == "jax" else "/".join(parts)


WeightTable = dict  # dict[str, WeightSpec], ordered as the model's state dict


def owned(table: WeightTable) -> list:
    """Rows that own storage (not tied to another row)."""
    return [s for s in table.values() if s.tied_to is None]


def expected_shapes(table: WeightTable) -> dict:
    return {k: tuple(s.shape) for k, s in table.items()}


def backend_params(table: WeightTable, state: dict, backend: str) -> dict:
    """Canonical ``{name: array}`` -> ``{backend path: array in the backend's layout}`` (owned rows)."""
    return {spec.backend_path(backend): spec.to_backend(backend, state[spec.name]) for spec in owned(table)}


def backend_perm(spec: WeightSpec, backend: str) -> Optional[tuple]:
    """The axis permutation that takes the row's canonical layout to ``backend``'s (None: unchanged)."""
    return None if backend == "torch" else spec.transform.perm


def canonical_state(table: WeightTable, params: dict, backend: str) -> dict:
    """``{backend path: array}`` -> canonical ``{name: array}`` (owned rows); the inverse of ``backend_params``."""
    return {spec.name: np.asarray(spec.from_backend(backend, np.asarray(params[spec.backend_path(backend)])))
            for spec in owned(table)}
