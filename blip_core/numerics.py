"""Numbers and array helpers every backend and the parity harness share.

The constants the three backends must agree on (the attention mask value, the normalisation
epsilon), ``to_numpy`` and the tolerance table.
"""
from __future__ import annotations

import numpy as np

from .outputs import ModelOutput

# Additive attention bias at a masked key: BERT's -10000 (not -inf), kept by transformers for BLIP's
# text model and the Q-Former. Unlike -inf it keeps a fully masked row finite.
MASK_VALUE = -10000.0

# L2 normalisation of embeddings is x / max(||x||, NORM_EPS) (torch.nn.functional.normalize's rule):
# the epsilon only matters for a zero vector, which it maps to zero instead of NaN.
NORM_EPS = 1e-12


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


# Tolerances keyed by (stage kind, dtype): (atol, rtol); an element passes when
# |a - b| <= atol + rtol * |b|. One table for every test and for `blip parity`.
# float32: the project target (1e-4 absolute on small models).
# Low precision rows are scale-relative: their atol is multiplied by the reference tensor's largest
# magnitude (at least 1), because rounding error in a matmul output is set by the size of the whole
# row it sums, not by the element. bfloat16 keeps 8 significant bits (steps of 2**-8 relative);
# two faithful implementations that only order their sums differently (transformers and our
# PyTorch port, on the fixtures) already differ by up to ~2**-5 of the logits' range. The row
# (2**-3 of the range) separates that rounding noise from real faults (a wrong cast or a missing
# layer moves values by the whole range). float16 has 11 bits: 8x tighter.
TOLERANCES = {
    ("default", "float32"): (1e-4, 1e-4),
    ("default", "bfloat16"): (2.0 ** -3, 2.0 ** -4),
    ("default", "float16"): (2.0 ** -6, 2.0 ** -7),
}
SCALE_RELATIVE = frozenset({"bfloat16", "float16"})

# Low precision against transformers run in the same precision (tests/test_low_precision.py). The
# yardstick is transformers' own rounding: per stage, with e(x) = max |x - transformers float32| /
# max(1, max |transformers float32|), a backend run in ``dtype`` passes when
#     e(backend in dtype) <= NOISE_FACTOR * e(transformers in dtype) + NOISE_FLOOR[stage, dtype].
# Measured on the fixtures (seeds 0-4 of converters.inputs; classes BlipForConditionalGeneration,
# BlipForQuestionAnswering, BlipModel, BlipForImageTextRetrieval, Blip2ForConditionalGeneration (OPT),
# Blip2Model (T5, bfloat16 only); every backend that runs the dtype): the worst ratio
# e(backend) / e(transformers) was 2.1 (vision), 1.9 (lm_hidden), 2.3 (logits), 2.4 (logits_per_image) in
# bfloat16 and 1.6 in float16 (torch); stages of one or a few numbers (loss, itm_score) can land on a lucky
# transformers rounding (ratios up to 26), so their floor carries them: the largest excess over 3x
# transformers' error was 0.005 (loss) and 0.018 (itm_score) in bfloat16, 0.0006 (loss) in float16. A fault of the size of a
# dropped bias (BLIP-2's language_projection: logits move by 0.69, e = 0.13) is 4.6x transformers'
# bfloat16 error there and fails.
NOISE_FACTOR = 3.0
NOISE_FLOOR = {
    ("default", "bfloat16"): 2.0 ** -7,
    ("loss", "bfloat16"): 2.0 ** -5,
    ("itm_score", "bfloat16"): 2.0 ** -5,
    ("default", "float16"): 2.0 ** -10,
    ("loss", "float16"): 2.0 ** -8,
    ("itm_score", "float16"): 2.0 ** -8,
}


def low_precision_error(x, truth) -> float:
    """max |x - truth| as a fraction of truth's largest magnitude (at least 1)."""
    t = np.asarray(to_numpy(truth), dtype=np.float64)
    d = np.abs(np.asarray(to_numpy(x), dtype=np.float64) - t)
    return float(d.max() / max(1.0, float(np.abs(t).max()))) if t.size else 0.0


def low_precision_bound(reference_error: float, stage: str, dtype: str) -> float:
    """The largest ``low_precision_error`` a backend may have where transformers in ``dtype`` has ``reference_error``."""
    floor = NOISE_FLOOR.get((stage, dtype), NOISE_FLOOR[("default", dtype)])
    return NOISE_FACTOR * reference_error + floor


def tolerance(stage: str = "default", dtype: str = "float32") -> tuple:
    """The table's (atol, rtol) for a stage and dtype (see ``effective_tolerance`` for low precision)."""
    return TOLERANCES.get((stage, dtype), TOLERANCES[("default", dtype)])


def effective_tolerance(reference, stage: str = "default", dtype: str = "float32") -> tuple:
    """(atol, rtol) to compare against ``reference``: low-precision atol scales with its magnitude."""
    atol, rtol = tolerance(stage, dtype)
    if dtype in SCALE_RELATIVE:
        ref = np.asarray(to_numpy(reference), dtype=np.float64)
        atol *= max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    return atol, rtol


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


# Bytes of attention scores one step of the compiled backends' attention loop may hold: a step's (group, N, N)
# block stays in cache, where the whole (batch, heads, N, N) tensor (ViT-B/16 at 384 px, batch 8: 128 MB)
# went through memory for every softmax pass, twice the CPU time at batch 8.
ATTENTION_BLOCK_BYTES = 4 << 20


def attention_head_group(heads: int, tokens: int, itemsize: int = 4) -> int:
    """How many heads of (tokens x tokens) scores go into one step: the largest divisor of ``heads`` whose
    scores fit ``ATTENTION_BLOCK_BYTES`` (at least 1). Every (batch, head) pair is one block of the loop."""
    fits = [g for g in range(1, heads + 1) if heads % g == 0 and g * tokens * tokens * itemsize <= ATTENTION_BLOCK_BYTES]
    return max(fits, default=1)
