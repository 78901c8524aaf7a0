"""Array helpers every backend and the parity harness share: ``to_numpy`` and the tolerance table."""
from __future__ import annotations

import numpy as np

from .outputs import ModelOutput


def to_numpy(x):
    """Any backend's array (or an output, tuple, list, dict of them) as numpy.

    bfloat16 values come back as float32 (numpy has no native bfloat16). Frameworks are
    recognised by duck typing so that this module imports none of them.
    """
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    if isinstance(x, np.ndarray):
        return x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    if isinstance(x, ModelOutput):
        return type(x)(**{k: to_numpy(v) for k, v in x.items()})
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if hasattr(x, "numpy") and mod.startswith(("tensorflow", "tf_keras", "keras")):
        return to_numpy(x.numpy())
    return to_numpy(np.asarray(x))


# Tolerances keyed by (stage kind, dtype): (max abs diff, max rel diff). One table for every test.
TOLERANCES = {
    ("default", "float32"): (1e-4, 1e-4),
    ("default", "bfloat16"): (5e-2, 5e-2),
    ("default", "float16"): (1e-2, 1e-2),
}


def tolerance(stage: str = "default", dtype: str = "float32") -> tuple:
    return TOLERANCES.get((stage, dtype), TOLERANCES[("default", dtype)])


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def max_rel_diff(a, b, floor: float = 1e-6) -> float:
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))) if a.size else 0.0
