"""The main job on the bundled models (`blip demo` / `make demo`) runs in every backend and they agree."""
import fnmatch
import glob
import os

from blip_apps.demo import DEMO_IMAGE, DEMO_VOCAB, MODELS, SAMPLES, run_demo
from blip_core import BACKENDS
from fixture_utils import ROOT, pyproject


def test_demo_runs_and_agrees_in_every_backend(capsys):
    assert run_demo(backends=BACKENDS) == 0
    out = capsys.readouterr().out
    assert "backends agree (torch, tf, jax): captions True, answers True, matches True" in out
    for backend in BACKENDS:
        assert f"{backend:>5}: loaded 3 models" in out
    assert out.count("  truth: '") == 6                 # six images, each with its true caption


def test_demo_assets_and_bundled_models_are_package_data():
    """An installed wheel holds the demo's pictures, vocabularies and bundled models: their package declares them."""
    setuptools = pyproject()["tool"]["setuptools"]
    paths = [DEMO_IMAGE, DEMO_VOCAB] + glob.glob(os.path.join(SAMPLES, "*")) + glob.glob(os.path.join(MODELS, "*", "*"))
    assert len(paths) > 2 + 6 + 3 * 5
    for path in paths:
        assert os.path.isfile(path), path
        package, inside = os.path.relpath(path, ROOT).split(os.sep, 1)
        assert any(fnmatch.fnmatch(package, p) for p in setuptools["packages"]["find"]["include"]), package
        assert any(fnmatch.fnmatch(inside, p) for p in setuptools["package-data"].get(package, ())), inside
