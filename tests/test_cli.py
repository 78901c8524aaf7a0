"""The `blip` command line: version, info, and one-line errors for bad input."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blip_apps.cli import main
from blip_core import __version__
from fixture_utils import ROOT, fixture, pyproject


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
    assert info["shards"] == 1 and info["files"] == ["model.safetensors"]   # one unsharded file
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
    script = pyproject()["project"]["scripts"]["blip"]
    assert script == "blip_apps.cli:main"
    module, name = script.split(":")
    assert getattr(importlib.import_module(module), name) is main
    out = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    from blip_apps.demo import build_demo_model
    root = tmp_path_factory.mktemp("models")
    return {arch: build_demo_model(str(root / arch), architecture=arch)
            for arch in ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval")}


def test_caption_json_lines_and_a_bad_image_in_the_batch(demo_models, tmp_path, capsys):
    from blip_apps.demo import DEMO_IMAGE
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code = main(["caption", DEMO_IMAGE, str(bad), DEMO_IMAGE, "--model", demo_models["BlipForConditionalGeneration"],
                 "--json", "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert code == 1                                   # one failure -> non-zero exit
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["image"] for r in rows] == [DEMO_IMAGE, DEMO_IMAGE]   # the good images still come out
    assert rows[0]["ids"] == rows[1]["ids"] and len(rows[0]["ids"]) <= 6
    assert "broken.png" in out.err and "cannot read image" in out.err


def test_a_folder_given_as_an_image_says_how_to_run_over_it(tmp_path, capsys):
    """A folder is not an image, and not a missing file either: the error names --out, which runs over one."""
    (tmp_path / "a.png").write_bytes(b"")
    for argv in (["caption", str(tmp_path)], ["vqa", str(tmp_path), "what is it?"], ["match", str(tmp_path), "x"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and f"{tmp_path}: is a directory; give --out FILE" in err and "no such file" not in err


# Each single-image command's arguments after the image, and the bundled model it uses without --model.
_COMMANDS = {"caption": ([], "caption"), "vqa": (["what is it?"], "vqa"), "match": (["a shape"], "retrieval")}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_a_command_without_a_model_says_it_uses_the_bundled_one(command, capsys):
    from blip_apps.cli import BUNDLED
    from blip_apps.demo import DEMO_IMAGE
    extra, task = _COMMANDS[command]
    assert main([command, DEMO_IMAGE, *extra] + (["--max-new-tokens", "3"] if command != "match" else [])) == 0
    err = capsys.readouterr().err
    assert f"no --model: using the bundled {task} model ({os.path.join(BUNDLED, task)})" in err


@pytest.mark.parametrize("command,backend", [("caption", "tf"), ("caption", "jax"), ("vqa", "tf"), ("match", "jax")])
def test_the_backend_asked_for_is_the_one_loaded(command, backend, monkeypatch, capsys):
    """With the backend's package made unimportable, a command run with ``--backend`` says it is not
    installed (so the command did ask for it), naming the extra to install."""
    from blip_apps.demo import DEMO_IMAGE
    monkeypatch.setitem(sys.modules, f"backends.{backend}", None)
    assert main([command, DEMO_IMAGE, *_COMMANDS[command][0], "--backend", backend]) != 0
    assert f"backend '{backend}' is not installed" in capsys.readouterr().err


def test_caption_matches_the_python_api(demo_models, capsys):
    import backends.torch as bt
    from PIL import Image
    from blip_apps.demo import DEMO_IMAGE
    from blip_core.processing import BlipProcessor
    d = demo_models["BlipForConditionalGeneration"]
    assert main(["caption", DEMO_IMAGE, "--model", d, "--json", "--num-beams", "2", "--max-new-tokens", "4",
                 "--prompt", "a photo of"]) == 0
    row = json.loads(capsys.readouterr().out)
    proc = BlipProcessor.from_pretrained(d)
    enc = proc(images=Image.open(DEMO_IMAGE), text="a photo of", return_tensors="np")
    ids = bt.BlipForConditionalGeneration.from_pretrained(d).generate(
        pixel_values=enc["pixel_values"], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
        num_beams=2, max_new_tokens=4)
    assert row["ids"] == ids[0].tolist()


def test_vqa_and_match(demo_models, capsys):
    from blip_apps.demo import DEMO_IMAGE
    assert main(["vqa", DEMO_IMAGE, "what is in the sky?", "--model", demo_models["BlipForQuestionAnswering"],
                 "--json", "--max-new-tokens", "3"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
    assert main(["match", DEMO_IMAGE, "a red house", "two dogs on a beach", "--json",
                 "--model", demo_models["BlipForImageTextRetrieval"]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a red house", "two dogs on a beach"]
    assert all(0.0 <= r["itm_probability"] <= 1.0 and -1.0 <= r["itc_score"] <= 1.0 for r in rows)


def test_bad_model_path_and_unknown_backend_class(tmp_path, capsys):
    from blip_apps.demo import DEMO_IMAGE
    assert main(["caption", DEMO_IMAGE, "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model directory" in err[0]


def _safetensors_dtypes(path) -> dict:
    """Tensor name -> dtype string, read from a safetensors header (8-byte little-endian length, then JSON)."""
    import struct
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("dtype, code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_convert_dtype_casts_the_floating_tensors(tmp_path, capsys, dtype, code):
    """``blip convert --dtype`` writes every floating tensor in that dtype (safetensors header codes)."""
    src = fixture("BlipTextModel")[0]
    before = _safetensors_dtypes(os.path.join(src, "model.safetensors"))
    assert "F32" in before.values()
    out = tmp_path / "out"
    assert main(["convert", src, str(out), "--to", "torch", "--dtype", dtype, "--no-progress"]) == 0
    after = _safetensors_dtypes(str(out / "model.safetensors"))
    assert set(after) == set(before)
    assert {k: after[k] for k in before if before[k] == "F32"} == {k: code for k in before if before[k] == "F32"}


@pytest.mark.parametrize("against", [False, True])
def test_parity_on_a_missing_checkpoint_exits_2(tmp_path, capsys, against):
    """``blip parity`` on a path that does not exist (or ``--against`` one) cannot run: one line, exit 2
    (1 means drift)."""
    missing = str(tmp_path / "nowhere")
    argv = ["parity", fixture("BlipTextModel")[0], "--against", missing] if against else ["parity", missing]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip parity: error:") and err.count("\n") == 1 and "nowhere" in err


@pytest.mark.parametrize("size", [48, 64])
def test_convert_image_size_resizes_the_position_table(tmp_path, capsys, size):
    """``blip convert --image-size N`` of a 32-pixel ViT with 8-pixel patches: config.json says N, and the
    position table holds the class token's row, unchanged, and one row per patch of the (N / 8)^2 grid."""
    from safetensors.numpy import load_file
    src = fixture("BlipVisionModel")[0]
    before = load_file(os.path.join(src, "model.safetensors"))["embeddings.position_embedding"]
    assert before.shape == (1, 1 + (32 // 8) ** 2, 32)
    out = tmp_path / "out"
    assert main(["convert", src, str(out), "--to", "torch", "--image-size", str(size), "--no-progress"]) == 0
    with open(out / "config.json") as fh:
        assert json.load(fh)["image_size"] == size
    after = load_file(str(out / "model.safetensors"))["embeddings.position_embedding"]
    assert after.shape == (1, 1 + (size // 8) ** 2, 32)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
