"""The `blip` command line: version, info, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

from blip_core import __version__
from blip_core.cli import main
from fixture_utils import fixture


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_reports_architecture_and_parameters(capsys):
    d, _, _ = fixture("BlipForConditionalGeneration")
    assert main(["info", d, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "BlipForConditionalGeneration"
    assert info["parameters"] == info["table_parameters"] > 0
    assert info["shards"] in (0, 1, None) or info["shards"] >= 1
    assert "text_decoder.cls.predictions.decoder.weight" in info["tied"]


def test_info_on_missing_path_is_one_line_error(capsys, tmp_path):
    assert main(["info", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_info_on_truncated_checkpoint(capsys, tmp_path):
    d, _, _ = fixture("BlipVisionModel")
    for f in ("config.json", "model.safetensors"):
        data = open(os.path.join(d, f), "rb").read()
        (tmp_path / f).write_bytes(data[: len(data) // 2] if f.endswith("safetensors") else data)
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "blip_core.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
