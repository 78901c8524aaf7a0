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
