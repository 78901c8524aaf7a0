"""The parity harness: run a checkpoint's named stages in several backends and compare them.

``parity(path, backends=("torch", "tf", "jax"), dtype="float32", reference=None)`` loads the
checkpoint in each backend (the class its ``config.json`` names), runs ``model.stages(**inputs)`` on fixed seeded
inputs built from the config (``make_inputs``), and compares every stage for every pair of
columns against ``blip_core.numerics``' tolerance table. ``reference="transformers"`` adds
transformers' PyTorch model as a column when it is importable.

``against(path, other)`` compares two checkpoints of the same model, each loaded in the backend
its format belongs to (safetensors/.bin/.pth -> torch, tf_model.h5 -> tf, flax msgpack -> jax),
and names the first stage (in forward order) that drifts.

A stage is within tolerance when every element satisfies ``|a - b| <= atol + rtol * |b|``
(``numpy.allclose``'s rule, ``b`` the left column) with ``(atol, rtol) = effective_tolerance(b, stage, dtype)``
(the table's values; low-precision atol scaled by the reference's magnitude).
Exit status (``ParityResult.exit_code``): 0 all within tolerance; 1 some stage drifts; 2 a
requested backend could not run, or nothing could be compared.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from blip_core import BACKENDS, architecture_of
from blip_core.numerics import effective_tolerance, max_abs_diff, max_rel_diff, to_numpy
from blip_core.pretrained import config_for
from blip_core.configs import load_config

from .inputs import make_inputs
from .sources import detect_format

# Forward order: the first drifting stage in this order is the one to look at.
STAGE_ORDER = ("vision", "vision_pooled", "qformer", "projection", "text", "lm_hidden", "logits", "itm_score",
               "image_embeds", "text_embeds", "logits_per_image", "loss")
FORMAT_BACKEND = {"safetensors": "torch", "bin": "torch", "original": "torch", "tf": "tf", "flax": "jax"}


class Unavailable(RuntimeError):
    """A column could not be produced (backend missing, class not implemented, no stages())."""


@dataclass
class Comparison:
    stage: str
    left: str
    right: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ratio: float          # max |a-b| / (atol + rtol |b|): <= 1 means within tolerance
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.ratio <= 1.0


@dataclass
class ParityResult:
    comparisons: list = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)    # column -> reason
    notes: list = field(default_factory=list)
    first_drift: str | None = None

    @property
    def exit_code(self) -> int:
        if any(not c.ok for c in self.comparisons):
            return 1
        if self.unavailable or not self.comparisons:
            return 2
        return 0

    @property
    def worst(self):
        return max(self.comparisons, key=lambda c: (bool(c.error), c.ratio), default=None)


def compare(stage: str, a, b, left: str, right: str, dtype: str = "float32") -> Comparison:
    """Compare one stage of two columns (``a`` is the reference side for the relative part)."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    atol, rtol = effective_tolerance(a, stage, dtype)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        return Comparison(stage, left, right, float("inf"), float("inf"), atol, rtol, float("inf"),
                          f"shape {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Comparison(stage, left, right, float("nan"), float("nan"), atol, rtol, float("inf"), "non-finite values")
    ratio = float(np.max(np.abs(b - a) / (atol + rtol * np.abs(a)))) if a.size else 0.0
    return Comparison(stage, left, right, max_abs_diff(b, a), max_rel_diff(b, a), atol, rtol, ratio)


@contextlib.contextmanager
def loadable(path, allow_pickle_bin: bool = False):
    """A directory ``from_pretrained`` can read: ``path`` itself for PyTorch layouts, else a
    temporary PyTorch conversion (made with ``converters.convert``, removed afterwards)."""
    fmt, weights = detect_format(path)
    if fmt in ("safetensors", "bin"):
        yield path if os.path.isdir(path) else os.path.dirname(weights)
        return
    from .convert import convert
    tmp = tempfile.mkdtemp(prefix="blip-parity-")
    try:
        convert(path, os.path.join(tmp, "model"), to="torch", allow_pickle_bin=allow_pickle_bin, progress=False)
        yield os.path.join(tmp, "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def backend_stages(directory: str, backend: str, inputs: dict, dtype: str = "float32") -> dict:
    """``{stage: numpy array}`` of the checkpoint in ``directory`` run by ``backend``."""
    if backend == "transformers":
        from blip_reference.transformers_stages import reference_stages
        return reference_stages(directory, inputs, dtype)
    arch = architecture_of(directory)
    try:
        module = importlib.import_module(f"backends.{backend}")
    except Exception as exc:  # a framework missing, or a backend that does not import yet
        raise Unavailable(f"backend {backend} is not available ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, arch, None)
    if cls is None:
        raise Unavailable(f"backend {backend} does not implement class {arch} yet")
    if not hasattr(cls, "stages"):
        raise Unavailable(f"backend {backend}'s {arch} has no stages() yet")
    try:
        model = cls.from_pretrained(directory, dtype=None if dtype == "float32" else dtype)
        stages = model.stages(**inputs)
    except NotImplementedError as exc:   # e.g. a dtype or option the backend does not support yet
        raise Unavailable(f"backend {backend}'s {arch}: {exc}") from None
    return {k: to_numpy(v) for k, v in stages.items()}


def _inputs_for(directory: str, seed: int) -> tuple:
    arch = architecture_of(directory)
    return arch, make_inputs(arch, config_for(arch, load_config(directory)), seed=seed)


def _ordered(stages) -> list:
    return sorted(stages, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))


def _first_drift(comparisons) -> str | None:
    bad = [c.stage for c in comparisons if not c.ok]
    return _ordered(set(bad))[0] if bad else None


def _compare_columns(columns: dict, dtype: str) -> list:
    names = list(columns)
    out = []
    for i, left in enumerate(names):
        for right in names[i + 1:]:
            for stage in _ordered(set(columns[left]) & set(columns[right])):
                out.append(compare(stage, columns[left][stage], columns[right][stage], left, right, dtype))
    return out


def parity(path, backends=BACKENDS, dtype: str = "float32", reference: str | None = None, seed: int = 0,
           allow_pickle_bin: bool = False, out=None) -> ParityResult:
    """Run every stage of ``path`` in each of ``backends`` (+ ``reference``) and compare all pairs."""
    result = ParityResult()
    columns: dict = {}
    wanted = list(backends)
    if reference is not None:
        if reference != "transformers":
            raise ValueError(f"unknown reference {reference!r}; the only reference is 'transformers'")
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            result.notes.append("transformers (with torch) is not installed: no reference column")
        else:
            wanted.append("transformers")
    with loadable(path, allow_pickle_bin) as directory:
        arch, inputs = _inputs_for(directory, seed)
        for backend in wanted:
            try:
                columns[backend] = backend_stages(directory, backend, inputs, dtype)
            except Unavailable as exc:
                result.unavailable[backend] = str(exc)
    result.comparisons = _compare_columns(columns, dtype)
    result.first_drift = _first_drift(result.comparisons)
    report(result, f"parity of {path} ({arch}, {dtype}, seed {seed})", out)
    return result


def against(path, other, backend: str | None = None, other_backend: str | None = None, dtype: str = "float32",
            seed: int = 0, allow_pickle_bin: bool = False, out=None) -> ParityResult:
    """Compare checkpoint ``other`` to ``path`` stage by stage; name the first stage that drifts.

    Each side runs in the backend its format belongs to unless ``backend``/``other_backend`` say
    otherwise ("transformers" is accepted as a backend here too).
    """
    result = ParityResult()
    sides = []
    for p, b in ((path, backend), (other, other_backend)):
        b = b or FORMAT_BACKEND[detect_format(p)[0]]
        sides.append((p, b))
    columns: dict = {}
    with loadable(path, allow_pickle_bin) as d0:
        arch, inputs = _inputs_for(d0, seed)
        with loadable(other, allow_pickle_bin) as d1:
            if architecture_of(d1) != arch:
                raise ValueError(f"{other} is a {architecture_of(d1)}, {path} a {arch}: not the same model")
            for label, (directory, (_, b)) in zip(("A", "B"), ((d0, sides[0]), (d1, sides[1]))):
                name = f"{label}:{b}"
                try:
                    columns[name] = backend_stages(directory, b, inputs, dtype)
                except Unavailable as exc:
                    result.unavailable[name] = str(exc)
    result.comparisons = _compare_columns(columns, dtype)
    result.first_drift = _first_drift(result.comparisons)
    report(result, f"A = {sides[0][0]} ({sides[0][1]}), B = {sides[1][0]} ({sides[1][1]}); {arch}, {dtype}", out)
    return result


def report(result: ParityResult, title: str, out=None) -> None:
    """Print the comparison table, the worst stage and the verdict."""
    out = out or sys.stdout
    w = out.write
    w(title + "\n")
    for name, why in result.unavailable.items():
        w(f"  {name}: unavailable: {why}\n")
    for note in result.notes:
        w(f"  note: {note}\n")
    if result.comparisons:
        w(f"  {'stage':<16} {'pair':<28} {'max abs':>10} {'max rel':>10} {'tol abs/rel':>15}  ok\n")
    for c in result.comparisons:
        pair = f"{c.left} vs {c.right}"
        verdict = "yes" if c.ok else ("NO: " + c.error if c.error else "NO")
        w(f"  {c.stage:<16} {pair:<28} {c.max_abs:>10.3g} {c.max_rel:>10.3g} {c.atol:>7.0e}/{c.rtol:<7.0e}  {verdict}\n")
    worst = result.worst
    if worst is not None:
        w(f"worst stage: {worst.stage} ({worst.left} vs {worst.right}): max abs {worst.max_abs:.3g}, "
          f"{100 * worst.ratio:.2g}% of its tolerance\n")
    if result.first_drift:
        w(f"first drifting stage: {result.first_drift}\n")
    code = result.exit_code
    verdict = {0: "PASS: every stage within tolerance", 1: "FAIL: stages drift beyond tolerance",
               2: "INCOMPLETE: " + ("a requested column could not run" if result.unavailable
                                     else "nothing to compare")}[code]
    w(f"{verdict} (exit {code})\n")
