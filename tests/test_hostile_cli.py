"""The `blip` command line under hostile use: one line per problem, the rest of a batch finishes."""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from blip_apps.cli import main
from fixture_utils import ROOT, fixture


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    from blip_apps.demo import build_demo_model
    root = tmp_path_factory.mktemp("models")
    return {arch: build_demo_model(str(root / arch), architecture=arch)
            for arch in ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval")}


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb to PIL)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def _one_line_errors(err):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert lines and all(ln.startswith("error:") for ln in lines), err
    assert "Traceback" not in err
    return lines


def test_bad_images_are_reported_and_the_others_finish(demo_models, tmp_path, capsys):
    from PIL import Image
    from blip_apps.demo import DEMO_IMAGE
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny)
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 100_000, 100_000)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    images = [DEMO_IMAGE, str(bomb), str(tiny), str(broken), DEMO_IMAGE]
    code = main(["caption", *images, "--model", demo_models["BlipForConditionalGeneration"], "--json",
                 "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert code == 1
    assert [json.loads(ln)["image"] for ln in out.out.splitlines()] == [DEMO_IMAGE, str(tiny), DEMO_IMAGE]
    errors = _one_line_errors(out.err)
    assert any("bomb.png" in ln and "DecompressionBomb" in ln for ln in errors)
    assert any("broken.jpg" in ln for ln in errors) and errors[-1] == "error: 2 of 5 image(s) failed"


def test_over_long_text_is_one_line_in_every_command(demo_models, capsys):
    from blip_apps.demo import DEMO_IMAGE
    long_text = " ".join(["word"] * 300)
    assert main(["caption", DEMO_IMAGE, "--prompt", long_text, "--model",
                 demo_models["BlipForConditionalGeneration"], "--max-new-tokens", "2"]) == 1
    assert "position" in " ".join(_one_line_errors(capsys.readouterr().err))
    assert main(["vqa", DEMO_IMAGE, long_text, "--model", demo_models["BlipForQuestionAnswering"]]) == 1
    _one_line_errors(capsys.readouterr().err)
    assert main(["match", DEMO_IMAGE, long_text, "--model", demo_models["BlipForImageTextRetrieval"]]) == 1
    _one_line_errors(capsys.readouterr().err)


@pytest.mark.parametrize("command, model", [("caption", "BlipForImageTextRetrieval"),
                                            ("vqa", "BlipForConditionalGeneration"),
                                            ("match", "BlipForQuestionAnswering")])
def test_wrong_model_class_for_the_command(demo_models, capsys, command, model):
    from blip_apps.demo import DEMO_IMAGE
    extra = {"caption": [], "vqa": ["what?"], "match": ["a text"]}[command]
    assert main([command, DEMO_IMAGE, *extra, "--model", demo_models[model]]) == 1
    (line,) = _one_line_errors(capsys.readouterr().err)
    assert f"'{command}' needs a" in line and model in line


@pytest.mark.parametrize("flag", ["--num-beams", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["0", "-2", "3.7"])
def test_counts_below_one_are_usage_errors(demo_models, capsys, flag, value):
    from blip_apps.demo import DEMO_IMAGE
    with pytest.raises(SystemExit) as exc:
        main(["caption", DEMO_IMAGE, "--model", demo_models["BlipForConditionalGeneration"], flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {flag}" in err


def test_match_json_never_prints_nan(demo_models, tmp_path, capsys):
    from blip_apps.demo import DEMO_IMAGE
    from blip_core import checkpoint
    d = tmp_path / "nan"
    shutil.copytree(demo_models["BlipForImageTextRetrieval"], d)
    state = checkpoint.load_state_dict(str(d))
    state["itm_head.bias"] = np.full_like(state["itm_head.bias"], np.nan)
    checkpoint.save_state_dict(str(d), state)
    assert main(["match", DEMO_IMAGE, "a dog", "--json", "--model", str(d)]) == 0
    line = capsys.readouterr().out.strip()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert row["itm_probability"] is None


def test_demo_out_onto_an_existing_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["demo", "--backends", "torch", "--out", str(target)]) == 1
    (line,) = _one_line_errors(capsys.readouterr().err)
    assert "not a directory" in line and target.read_text() == "keep me"


@pytest.mark.parametrize("err", [errno.EACCES, errno.ENOSPC, errno.EROFS])
def test_convert_destination_errors_are_one_line(tmp_path, capsys, monkeypatch, err):
    import importlib
    conv = importlib.import_module("converters.convert")
    d, _, _ = fixture("BlipTextModel")

    def fail(dst):
        raise OSError(err, os.strerror(err), dst)
    monkeypatch.setattr(conv, "make_partial", fail)
    assert main(["convert", d, str(tmp_path / "out"), "--to", "torch", "--no-progress"]) == 1
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and os.strerror(err) in err_text and "Traceback" not in err_text
    assert not os.path.exists(tmp_path / "out")


def test_closed_pipe_ends_quietly(demo_models):
    from blip_apps.demo import DEMO_IMAGE
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "blip_apps.cli", "caption", *[DEMO_IMAGE] * 6, "--model",
                             demo_models["BlipForConditionalGeneration"], "--max-new-tokens", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()      # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(120)
    assert first and "Traceback" not in err and "BrokenPipe" not in err
    assert code == 141
