"""The committed fixtures are exactly what the generator makes with the pinned transformers."""
import filecmp
import os
import subprocess
import sys

import numpy as np

from fixture_utils import CLASSES, MODELS, fixture

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_class_has_a_fixture():
    assert sorted(os.listdir(MODELS)) == sorted(CLASSES)
    for name in CLASSES:
        d, inputs, reference = fixture(name)
        assert inputs and reference


def test_regenerating_gives_the_same_files(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "fixtures", "make_fixtures.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in CLASSES:
        for f in ("config.json", "model.safetensors", "inputs.npz"):
            assert filecmp.cmp(os.path.join(MODELS, name, f), tmp_path / name / f, shallow=False), (name, f)
        # Reference outputs: the same values up to float32 rounding, which another CPU's kernels do in another
        # order. Bound: 1e-5 of the array's largest magnitude (at least 1), ~80 float32 steps; regenerated on an
        # Intel Xeon host, the committed (AMD EPYC) references differed by at most 2.9e-6 of it (Blip2Model's
        # T5 logits, 1.4e-5 absolute at |x| <= 4.8), where any change to the generator or the models moves them
        # by orders of magnitude more.
        with np.load(os.path.join(MODELS, name, "reference.npz")) as a, np.load(tmp_path / name / "reference.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                scale = max(1.0, float(np.abs(a[k]).max())) if a[k].size else 1.0
                np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5 * scale, err_msg=f"{name}/{k}")
