"""The main job on the bundled default (`blip demo` / `make demo`) runs in every backend and they agree."""
import fnmatch
import os

from blip_apps.demo import DEMO_IMAGE, DEMO_VOCAB, run_demo
from blip_core import BACKENDS
from fixture_utils import ROOT, pyproject


def test_demo_captions_agree_in_every_backend(capsys, tmp_path):
    assert run_demo(backends=BACKENDS, out=str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "ids=" in line]
    assert len(lines) == 6                                  # 3 backends x (greedy, beam-3)
    assert "backends agree on every decoding mode (beam-3, greedy): True" in out
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= files


def test_demo_assets_are_package_data():
    """An installed wheel holds the demo's picture and vocabulary: their package declares them as data."""
    setuptools = pyproject()["tool"]["setuptools"]
    for path in (DEMO_IMAGE, DEMO_VOCAB):
        assert os.path.isfile(path), path
        package, inside = os.path.relpath(path, ROOT).split(os.sep, 1)
        assert any(fnmatch.fnmatch(package, p) for p in setuptools["packages"]["find"]["include"]), package
        assert any(fnmatch.fnmatch(inside, p) for p in setuptools["package-data"].get(package, ())), inside
