"""Low-precision parity: each backend in bfloat16 / float16 against transformers run in the same dtype.

A backend in low precision cannot match transformers element for element (both round, in different
orders), but it must not be further from transformers' float32 result than transformers' own
low-precision run is, up to the measured factor and floor of ``blip_core.numerics`` (NOISE_FACTOR,
NOISE_FLOOR; the measurement is written there). Comparing a backend with its own float32 cannot
catch a fault present in both precisions; comparing it with transformers' float32 alone would
need a tolerance as wide as the rounding noise. Here a fault as small as a dropped bias fails.

dtypes per backend: torch runs bfloat16 and float16, tf and jax bfloat16 (their dtype tables refuse
float16, checked below so that adding it shows up here). Classes: those of SUPPORT (tests/test_parity_matrix.py).
"""
import importlib

import numpy as np
import pytest

from blip_core.numerics import low_precision_bound, low_precision_error
from converters.parity import _inputs_for, backend_stages
from fixture_utils import fixture, require
from test_parity_matrix import SUPPORT

require("transformers")

DTYPES = {"torch": ("bfloat16", "float16"), "tf": ("bfloat16",), "jax": ("bfloat16",)}
CLASSES = ["BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval",
           "Blip2ForConditionalGeneration", "Blip2Model"]
ROWS = [(name, backend, dtype) for name in CLASSES for backend in SUPPORT[name] for dtype in DTYPES[backend]]


@pytest.fixture(scope="module")
def reference():
    """transformers' stages of a class in float32 and in a low dtype, computed once per (class, dtype)."""
    cache = {}

    def get(name, dtype):
        d, _, _ = fixture(name)
        _, inputs = _inputs_for(d, seed=0)
        for t in ("float32", dtype):
            if (name, t) not in cache:
                cache[name, t] = backend_stages(d, "transformers", inputs, t)
        return d, inputs, cache[name, "float32"], cache[name, dtype]
    return get


@pytest.mark.parametrize("name, backend, dtype", ROWS, ids=[f"{n}-{b}-{t}" for n, b, t in ROWS])
def test_no_further_from_float32_than_transformers_in_the_same_dtype(reference, name, backend, dtype):
    directory, inputs, truth, theirs = reference(name, dtype)
    ours = backend_stages(directory, backend, inputs, dtype)
    assert set(ours) == set(truth), (sorted(ours), sorted(truth))
    report = []
    for stage, t in truth.items():
        ref_err, err = low_precision_error(theirs[stage], t), low_precision_error(ours[stage], t)
        bound = low_precision_bound(ref_err, stage, dtype)
        assert np.isfinite(ours[stage]).all(), stage
        report.append((stage, err, ref_err, bound))
    bad = [r for r in report if not r[1] <= r[3]]
    assert not bad, "stage, our error, transformers' error, bound: " + repr(bad)


@pytest.mark.parametrize("backend", [b for b in DTYPES if "float16" not in DTYPES[b]])
def test_float16_is_refused_where_the_table_says_so(backend):
    module = importlib.import_module(f"backends.{backend}")
    d, _, _ = fixture("BlipVisionModel")
    with pytest.raises(ValueError, match="float16"):
        module.BlipVisionModel.from_pretrained(d, dtype="float16")
