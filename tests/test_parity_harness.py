"""The parity harness (converters.parity, ``blip parity``): comparisons, verdicts and degradation.

Columns are our backends (torch first) and transformers' PyTorch model as the independent
reference; checkpoints are the committed fixtures and conversions of them.
"""
import importlib
import io
import os
import shutil
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from blip_core import BACKENDS, checkpoint
from converters import convert
from converters.cli import main as cli_main
from converters.parity import against, compare, parity
from fixture_utils import CLASSES, MODELS

parity_module = importlib.import_module("converters.parity")
CAPTIONER = os.path.join(MODELS, "BlipForConditionalGeneration")


def perturbed_copy(tmp_path, name: str, index=(0, 0), delta=1.0) -> str:
    """A copy of the captioner fixture with one element of one tensor changed."""
    dst = tmp_path / f"perturbed-{name}"
    shutil.copytree(CAPTIONER, dst)
    sd = checkpoint.load_state_dict(CAPTIONER)
    sd[name] = sd[name].copy()
    sd[name][index] += np.float32(delta)
    checkpoint.save_state_dict(dst, sd)
    return str(dst)


def test_faithful_conversion_passes_in_the_backend_of_its_format(tmp_path):
    for to in ("tf", "jax"):
        convert(CAPTIONER, tmp_path / to, to=to)
        out = io.StringIO()
        result = against(CAPTIONER, tmp_path / to, out=out)
        text = out.getvalue()
        assert result.exit_code == 0, text
        assert f"A:torch vs B:{to}" in text and "PASS" in text
        assert {c.stage for c in result.comparisons} == {"vision", "lm_hidden", "logits", "loss"}


@pytest.mark.parametrize("name, index, first", [("vision_model.post_layernorm.bias", (0,), "vision"),
                                                ("text_decoder.cls.predictions.transform.dense.weight", (0, 0), "logits")])
def test_one_perturbed_tensor_names_the_first_drifting_stage(tmp_path, name, index, first):
    other = perturbed_copy(tmp_path, name, index)
    out = io.StringIO()
    result = against(CAPTIONER, other, out=out)
    assert result.exit_code == 1
    assert result.first_drift == first
    assert f"first drifting stage: {first}" in out.getvalue()
    drifted = {c.stage for c in result.comparisons if not c.ok}
    if first == "logits":   # everything before the LM head is untouched
        assert drifted == {"logits", "loss"} and all(c.max_abs == 0 for c in result.comparisons
                                                     if c.stage in ("vision", "lm_hidden"))


def test_all_backends_and_transformers_reference_agree(tmp_path):
    out = io.StringIO()
    result = parity(CAPTIONER, backends=BACKENDS, reference="transformers", out=out)
    text = out.getvalue()
    assert result.exit_code == 0, text
    pairs = list(dict.fromkeys((c.left, c.right) for c in result.comparisons))
    assert pairs[0] == BACKENDS[:2] and ("torch", "transformers") in pairs and len(pairs) == 6
    assert "worst stage:" in text and "PASS" in text


@pytest.mark.parametrize("name", CLASSES)
def test_every_class_runs_in_the_harness_and_matches_transformers(name):
    out = io.StringIO()
    result = parity(os.path.join(MODELS, name), backends=("torch",), reference="transformers", out=out)
    assert result.exit_code == 0 and result.comparisons, out.getvalue()
    assert {c.left for c in result.comparisons} == {"torch"}


def test_missing_backend_or_class_degrades_clearly(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "backends.tf":
            raise ImportError("No module named 'tensorflow'")
        if name == "backends.jax":
            return types.SimpleNamespace()       # a backend without this class
        return real(name, *args)
    monkeypatch.setattr(parity_module.importlib, "import_module", fake_import)
    out = io.StringIO()
    result = parity(os.path.join(MODELS, "BlipVisionModel"), reference="transformers", out=out)
    text = out.getvalue()
    assert result.unavailable == {"tf": "backend tf is not available (ImportError: No module named 'tensorflow')",
                                  "jax": "backend jax does not implement class BlipVisionModel yet"}
    assert "torch vs transformers" in text and "INCOMPLETE" in text
    assert all(c.ok for c in result.comparisons) and result.exit_code == 2


def test_compare_uses_the_tolerance_table_elementwise():
    a = np.array([[1000.0, 0.0]], np.float32)
    assert compare("logits", a, a + np.float32(0.05) * np.array([[1, 0]], np.float32), "x", "y").ok  # 0.05 <= 1e-4 + 1e-4*1000
    bad = compare("logits", a, a + np.float32(2e-4) * np.array([[0, 1]], np.float32), "x", "y")
    assert not bad.ok and bad.ratio == pytest.approx(2.0, rel=1e-3)
    assert compare("vision", a, a[:, :1], "x", "y").error.startswith("shape")
    assert not compare("vision", a, np.array([[np.nan, 0]], np.float32), "x", "y").ok


def test_cli_parity_exit_codes(tmp_path, capsys):
    other = perturbed_copy(tmp_path, "vision_model.post_layernorm.bias", index=(3,))
    assert cli_main(["parity", CAPTIONER, "--against", other]) == 1
    assert "first drifting stage: vision" in capsys.readouterr().out
    assert cli_main(["parity", CAPTIONER, "--backends", "torch"]) == 2          # one column: nothing to compare
    assert cli_main(["parity", CAPTIONER, "--backends", "torch,mxnet"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_against_refuses_checkpoints_of_two_models():
    retrieval = os.path.join(MODELS, "BlipForImageTextRetrieval")
    with pytest.raises(ValueError, match="is a BlipForImageTextRetrieval.* not the same model"):
        against(CAPTIONER, retrieval, out=io.StringIO())


def test_cli_against_refuses_checkpoints_of_two_models(capsys):
    assert cli_main(["parity", CAPTIONER, "--against", os.path.join(MODELS, "BlipForImageTextRetrieval")]) != 0
    assert "not the same model" in capsys.readouterr().err


_VALUES = arrays(np.float64, 6, elements=st.floats(-2000, 2000))
_FACTORS = arrays(np.float64, 6, elements=st.floats(-3, 3).filter(lambda f: abs(abs(f) - 1) > 1e-6))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(left=_VALUES, factors=_FACTORS, stage=st.sampled_from(["logits", "vision", "loss"]),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_compare_verdict_is_numpys_allclose_with_the_left_column_as_reference(left, factors, stage, dtype):
    """``|right - left| <= atol + rtol * |left|`` everywhere: numpy's ``allclose(right, left)``. The right
    column is drawn as ``left + f * (atol + rtol * |left|)``, so every element sits a known factor of its
    tolerance away, on either side of the boundary."""
    from blip_core.numerics import effective_tolerance
    atol, rtol = effective_tolerance(left, stage, dtype)
    right = left + factors * (atol + rtol * np.abs(left))
    got = compare(stage, left, right, "l", "r", dtype)
    assert (got.atol, got.rtol) == (atol, rtol)
    assert got.ok == np.allclose(right, left, atol=atol, rtol=rtol) == bool(np.all(np.abs(factors) <= 1))
    assert got.ratio == pytest.approx(np.max(np.abs(factors)), rel=1e-6)


def test_compare_scales_the_relative_term_by_the_left_column_only():
    # logits: atol = rtol = 1e-4. 1000 -> 1000.15 is 0.15 / (1e-4 + 0.1) = 1.5 times the tolerance, either way
    # round; with |left| + |right| in the relative term it would pass at 0.75.
    for left, right in ((1000.0, 1000.15), (1000.15, 1000.0)):
        c = compare("logits", np.array([left]), np.array([right]), "l", "r")
        assert not c.ok and c.ratio == pytest.approx(0.15 / (1e-4 + 1e-4 * left), rel=1e-4)


def test_compare_refuses_shapes_that_only_broadcast():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert compare("vision", a, a[None], "x", "y").error == "shape (3,) vs (1, 3)"
    assert compare("vision", a[:1], a[:1, None] * np.ones(3), "x", "y").error == "shape (1,) vs (1, 3)"


def test_low_precision_parity_uses_the_dtypes_tolerances():
    """bfloat16 columns are judged by the table's bfloat16 row (a float32 tolerance would fail them)."""
    out = io.StringIO()
    result = parity(CAPTIONER, backends=("torch", "jax"), dtype="bfloat16", out=out)
    assert result.exit_code == 0, out.getvalue()
    assert all(c.atol >= 2.0 ** -3 for c in result.comparisons)
    assert any(c.max_abs > 1e-3 for c in result.comparisons)       # bfloat16 differences, beyond float32's table


def test_cli_low_precision_parity_passes(capsys):
    assert cli_main(["parity", CAPTIONER, "--backends", "torch,tf", "--dtype", "bfloat16"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_exits_2_when_a_requested_backend_cannot_run(monkeypatch, capsys):
    real = importlib.import_module

    def no_tf(name, *args):
        if name == "backends.tf":
            raise ImportError("No module named 'tensorflow'")
        return real(name, *args)
    monkeypatch.setattr(parity_module.importlib, "import_module", no_tf)
    assert cli_main(["parity", os.path.join(MODELS, "BlipVisionModel"), "--backends", "torch,jax,tf"]) == 2
    text = capsys.readouterr().out
    assert "tf: unavailable" in text and "torch vs jax" in text and "INCOMPLETE" in text
