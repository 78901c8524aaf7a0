"""``blip export`` and ``blip export-parity`` (blip_apps/export.py, export_parity.py) on the fixtures.

Every format and task is exported through the command line and checked by ``export-parity``
(which compares with the library stage by stage and ids, and exits 1 on any difference); a
perturbed export must be caught. The default run covers ONNX VQA, ONNX retrieval at another
image size (``--image-size``), a perturbed export and the refusals; the other formats, tasks and
image sizes (each also tested directly in tests/test_{onnx,saved_model,stablehlo}_export.py) and
BLIP-2 run with ``-m slow``.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blip_apps.cli import main

from fixture_utils import fixture, require

require("onnxruntime")


def _export_and_check(tmp_path, capsys, name, fmt, *extra):
    out = str(tmp_path / f"{name}-{fmt}")
    assert main(["export", fixture(name)[0], out, "--format", fmt, *extra]) == 0
    meta = json.load(open(os.path.join(out, "blip_export.json")))
    assert meta["architecture"] == name and meta["format"] == fmt
    capsys.readouterr()
    code = main(["export-parity", out, fixture(name)[0], "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["ok"] for r in rows), rows
    assert code == 0
    return rows


def test_onnx_vqa(tmp_path, capsys):
    rows = _export_and_check(tmp_path, capsys, "BlipForQuestionAnswering", "onnx", "--task", "vqa")
    assert {r["stage"] for r in rows if r["kind"] == "ids"} == {"generate.num_beams=1", "generate.num_beams=3"}


@pytest.mark.slow
@pytest.mark.parametrize("name,fmt,extra", [
    ("BlipForConditionalGeneration", "onnx", []),
    ("BlipForImageTextRetrieval", "onnx", []),
    ("BlipModel", "onnx", []),
    ("BlipForImageTextRetrieval", "savedmodel", ["--task", "itm"]),
    ("BlipModel", "stablehlo", ["--task", "embed"]),
    ("BlipForConditionalGeneration", "savedmodel", ["--num-beams", "3", "--max-new-tokens", "6"]),
    ("BlipForQuestionAnswering", "savedmodel", ["--max-new-tokens", "6"]),
    ("BlipModel", "savedmodel", []),
    ("BlipForConditionalGeneration", "stablehlo", ["--num-beams", "2", "--max-new-tokens", "6"]),
    ("BlipForQuestionAnswering", "stablehlo", ["--task", "vqa", "--num-beams", "3", "--max-new-tokens", "6"]),
    ("BlipForQuestionAnswering", "stablehlo", ["--max-new-tokens", "6"]),
    ("BlipForImageTextRetrieval", "stablehlo", ["--task", "itm"]),
    # another image size (interpolate_pos_encoding), every format and task
    ("BlipForConditionalGeneration", "onnx", ["--image-size", "48"]),
    ("BlipForQuestionAnswering", "onnx", ["--image-size", "48"]),
    ("BlipModel", "onnx", ["--image-size", "48"]),
    ("BlipForConditionalGeneration", "savedmodel", ["--image-size", "48", "--num-beams", "3", "--max-new-tokens", "6"]),
    ("BlipForQuestionAnswering", "savedmodel", ["--image-size", "48", "--max-new-tokens", "6"]),
    ("BlipForImageTextRetrieval", "savedmodel", ["--image-size", "48"]),
    ("BlipModel", "savedmodel", ["--image-size", "48"]),
    ("BlipForConditionalGeneration", "stablehlo", ["--image-size", "48", "--num-beams", "2", "--max-new-tokens", "6"]),
    ("BlipForQuestionAnswering", "stablehlo", ["--image-size", "48", "--num-beams", "2", "--max-new-tokens", "6"]),
    ("BlipForImageTextRetrieval", "stablehlo", ["--image-size", "48"]),
    ("BlipModel", "stablehlo", ["--image-size", "48"]),
])
def test_other_formats(tmp_path, capsys, name, fmt, extra):
    _export_and_check(tmp_path, capsys, name, fmt, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "stablehlo"])
def test_blip2_captioner(tmp_path, capsys, fmt):
    from blip_core.configs import load_config
    from converters.inputs import make_inputs
    name = "Blip2ForConditionalGeneration"
    length = make_inputs(name, load_config(fixture(name)[0]))["input_ids"].shape[1]
    _export_and_check(tmp_path, capsys, name, fmt, "--max-new-tokens", "5", "--num-beams", "2",
                      "--prompt-length", str(length))


def test_onnx_retrieval_at_another_image_size(tmp_path, capsys):
    """``--image-size``: the artifact takes that size (metadata, processor) and export-parity compares it
    with the library's ``interpolate_pos_encoding=True`` on pixels of that size."""
    _export_and_check(tmp_path, capsys, "BlipForImageTextRetrieval", "onnx", "--image-size", "48")
    out = tmp_path / "BlipForImageTextRetrieval-onnx"
    assert json.load(open(out / "blip_export.json"))["image_size"] == 48
    assert json.load(open(out / "preprocessor_config.json"))["size"] == {"height": 48, "width": 48}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "stablehlo"])
def test_blip2_captioner_at_another_image_size(tmp_path, capsys, fmt):
    from blip_core.configs import load_config
    from converters.inputs import make_inputs
    name = "Blip2ForConditionalGeneration"
    cfg = load_config(fixture(name)[0])
    length = make_inputs(name, cfg)["input_ids"].shape[1]
    size = cfg.vision_config.image_size + cfg.vision_config.patch_size
    _export_and_check(tmp_path, capsys, name, fmt, "--max-new-tokens", "5", "--num-beams", "2",
                      "--prompt-length", str(length), "--image-size", str(size))


def test_parity_catches_a_perturbed_export(tmp_path, capsys):
    import backends.torch as bt
    import torch
    name = "BlipForQuestionAnswering"
    model = bt.BlipForQuestionAnswering.from_pretrained(fixture(name)[0])
    with torch.no_grad():
        # one coordinate: the LayerNorm after it would undo a uniform shift
        model.text_encoder.encoder.layer[0].output.dense.bias[0] += 0.5
    bad = tmp_path / "bad"
    model.save_pretrained(str(bad))
    assert main(["export", str(bad), str(tmp_path / "out"), "--format", "onnx"]) == 0
    capsys.readouterr()
    assert main(["export-parity", str(tmp_path / "out"), fixture(name)[0]]) == 1
    text = capsys.readouterr().out
    assert "question_encoder" in text and "FAIL" in text


@pytest.mark.parametrize("fmt,task", [("onnx", "caption"), ("savedmodel", "caption"), ("savedmodel", "vqa")])
def test_an_artifact_carries_its_models_processor(tmp_path, capsys, fmt, task):
    """An artifact answers from images and text alone: the bundled model's tokenizer and image-processor
    files are copied byte for byte, and the captions or answers made with them (ONNX: the runner's
    ``caption``; SavedModel: its serving signature on the artifact processor's inputs, decoded by that
    processor) are those of ``blip caption`` / ``blip vqa``."""
    from blip_apps.cli import BUNDLED
    from blip_apps.demo import SAMPLES, _samples
    from blip_core.artifact_files import PROCESSOR_FILES
    from blip_core.processing import BlipProcessor
    model_dir = os.path.join(BUNDLED, task)
    out = tmp_path / fmt
    assert main(["export", model_dir, str(out), "--format", fmt, "--max-new-tokens", "20"]) == 0
    copied = [n for n in PROCESSOR_FILES if os.path.isfile(os.path.join(model_dir, n))]
    assert {"tokenizer.json", "vocab.txt", "preprocessor_config.json"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == open(os.path.join(model_dir, name), "rb").read(), name
    rows, images = (x[:3] for x in _samples())
    files = [os.path.join(SAMPLES, r["file_name"]) for r in rows]
    questions = [r["question"] for r in rows]
    if fmt == "onnx":
        from blip_runtime import OnnxBlip
        got = OnnxBlip(str(out)).caption(images)
    else:
        import tensorflow as tf
        processor = BlipProcessor.from_pretrained(str(out))
        serve = tf.saved_model.load(str(out)).signatures["serving_default"]
        if task == "caption":
            px = processor(images=images, return_tensors="np")["pixel_values"]
            ids = serve(pixel_values=tf.constant(px))["sequences"]
        else:
            enc = processor(images=images, text=questions, padding=True, return_tensors="np")
            ids = serve(pixel_values=tf.constant(enc["pixel_values"]), input_ids=tf.constant(enc["input_ids"]),
                        attention_mask=tf.constant(enc["attention_mask"]))["sequences"]
        got = processor.batch_decode(ids.numpy(), skip_special_tokens=True)
    capsys.readouterr()
    if task == "caption":
        assert main(["caption", *files, "--json"]) == 0
        assert got == [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    else:
        for answer, f, q in zip(got, files, questions):
            assert main(["vqa", f, q]) == 0
            assert capsys.readouterr().out.strip() == answer, (f, q)


def test_parity_of_a_perturbed_retrieval_export_fails_in_json(tmp_path, capsys):
    """The ITM head's bias moved after export: export-parity's JSON rows name the stage, and it exits 1."""
    import backends.torch as bt
    import torch
    name = "BlipForImageTextRetrieval"
    model = bt.BlipForImageTextRetrieval.from_pretrained(fixture(name)[0])
    with torch.no_grad():
        model.itm_head.bias[1] += 0.5
    bad = tmp_path / "bad"
    model.save_pretrained(str(bad))
    assert main(["export", str(bad), str(tmp_path / "out"), "--format", "onnx"]) == 0
    capsys.readouterr()
    assert main(["export-parity", str(tmp_path / "out"), fixture(name)[0], "--json"]) == 1
    rows = {r["stage"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not rows["itm_score"]["ok"] and rows["itc_cosine"]["ok"]


def test_export_refuses_a_blip2_task_mismatch_and_a_file_as_destination(tmp_path, capsys):
    d = fixture("Blip2ForConditionalGeneration")[0]
    assert main(["export", d, str(tmp_path / "a"), "--format", "stablehlo", "--task", "vqa"]) == 1
    assert "holds a Blip2ForConditionalGeneration (task caption), not a vqa model" in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    assert main(["export", fixture("BlipModel")[0], str(tmp_path / "file"), "--format", "onnx"]) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "a").exists()


@pytest.mark.parametrize("got_shape, want_shape", [((1, 3), (3,)), ((3, 1), (1, 3))])
def test_export_parity_rows_fail_on_shapes_that_only_broadcast(got_shape, want_shape):
    """Equal values in shapes numpy would broadcast together are a failing row, not a pass."""
    from blip_apps.export_parity import _array_row
    row = _array_row("stage", np.zeros(got_shape), np.zeros(want_shape), "float32")
    assert not row["ok"] and row["max_abs_diff"] == float("inf")


def test_export_refusals(tmp_path, capsys):
    d = fixture("BlipModel")[0]
    assert main(["export", d, str(tmp_path / "a"), "--format", "onnx", "--task", "caption"]) == 1
    assert "not a caption model" in capsys.readouterr().err
    assert main(["export", d, str(tmp_path / "b"), "--format", "onnx", "--dtype", "bfloat16"]) == 1
    assert "float32" in capsys.readouterr().err
    assert main(["export", d, str(tmp_path / "b"), "--format", "onnx", "--dtype", "float16"]) == 1
    assert "benchmarks/onnx_lowprec.py" in capsys.readouterr().err      # the refusal states its measurement
    v = fixture("BlipVisionModel")[0]
    assert main(["export", v, str(tmp_path / "c"), "--format", "stablehlo"]) == 1
    assert "supports" in capsys.readouterr().err
    assert main(["export", d, str(tmp_path / "c"), "--format", "onnx", "--image-size", "33"]) == 1
    assert "multiple of patch_size" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", d, str(tmp_path / "full"), "--format", "onnx"]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert not np.any([os.path.exists(tmp_path / n) for n in "abc"])


@pytest.mark.parametrize("size, want", [(None, 32), (8, 8), (48, 48), (0, None), (-8, None), (-16, None), (4, None),
                                        (33, None)])
def test_export_image_size_is_a_positive_multiple_of_the_patch(size, want):
    """The fixture's vision tower has 8-pixel patches at 32 pixels: an artifact takes the config's size, or a
    positive whole number of patches (``interpolate_pos_encoding``'s grid); 0, negative, smaller than a patch
    or not a multiple is refused."""
    from blip_core.artifact_files import export_image_size
    from blip_core.configs import load_config
    vc = load_config(fixture("BlipModel")[0]).vision_config
    assert (vc.image_size, vc.patch_size) == (32, 8)
    if want is None:
        with pytest.raises(ValueError, match="positive multiple of patch_size 8"):
            export_image_size(vc, size)
    else:
        assert export_image_size(vc, size) == want


@pytest.mark.parametrize("exported, want", [(48, 48), (64, 64), (None, 32)])
def test_a_runner_takes_the_image_size_its_artifact_was_exported_at(tmp_path, exported, want):
    """``Artifact.image_size``: the size in the artifact's manifest (an export at another size), else the
    size in its config.json (32 for the fixture)."""
    import shutil

    from blip_runtime.artifact import Artifact

    class Runner(Artifact):
        FORMAT, KIND = "test-format", "test artifact"

    shutil.copyfile(os.path.join(fixture("BlipModel")[0], "config.json"), tmp_path / "config.json")
    manifest = {"format": "test-format"} if exported is None else {"format": "test-format", "image_size": exported}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    runner = Runner()
    assert runner._open(tmp_path) == str(tmp_path)
    assert runner.image_size == want
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, format="other")))
    with pytest.raises(ValueError, match="not a test artifact"):
        Runner()._open(tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_inputs_pad_every_text_but_the_vqa_question(seed):
    """The parity inputs right-pad the second sample's text by two tokens (id 0, mask 0), except the VQA
    question, which stays whole: transformers 4.57 never applies the question's mask to the answer decoder's
    cross-attention, so a padded question would move the reference for a reason that is not ours."""
    from blip_core.configs import load_config
    from converters.inputs import make_inputs
    for arch in ("BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipModel"):
        inp = make_inputs(arch, load_config(fixture(arch)[0]), seed)
        np.testing.assert_array_equal(inp["attention_mask"], [[1] * 7, [1] * 5 + [0] * 2])
        assert (inp["input_ids"][1, -2:] == 0).all() and (inp["input_ids"][inp["attention_mask"] == 1] > 0).all()
    inp = make_inputs("BlipForQuestionAnswering", load_config(fixture("BlipForQuestionAnswering")[0]), seed)
    assert inp["input_ids"].shape == inp["attention_mask"].shape == (2, 7)
    assert (inp["attention_mask"] == 1).all() and (inp["input_ids"] > 0).all()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    """The artifact is written beside OUT and renamed into place when complete: an exporter failing half-way
    (here after writing its first graph: a full disk, an interrupt) leaves neither OUT nor a work directory; an
    empty OUT given by the caller stays as it was. A dead export's work directory is removed by the next export to
    the same OUT. A finished export is a plain directory (the process's umask, not a private one)."""
    from backends.torch import onnx_export
    from blip_apps.export import export

    def broken(exc):
        def export_onnx(model, out, **kw):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "vision.onnx"), "wb") as fh:
                fh.write(b"half")
            raise exc
        return export_onnx

    d = fixture("BlipModel")[0]
    (tmp_path / "empty").mkdir()
    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        monkeypatch.setattr(onnx_export, "export_onnx", broken(exc))
        for out in (tmp_path / "new", tmp_path / "empty"):
            with pytest.raises(type(exc)):
                export(d, str(out), "onnx")
            assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])      # a killed export's leftovers: removed by the next
    dead.wait()
    (tmp_path / f".ok.partial-{dead.pid}-abc").mkdir()
    (tmp_path / f".ok.partial-{dead.pid}-abc" / "vision.onnx").write_bytes(b"half")
    umask = os.umask(0o022)
    try:
        assert main(["export", d, str(tmp_path / "ok"), "--format", "onnx"]) == 0
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path)) == ["empty", "ok"]
    assert os.stat(tmp_path / "ok").st_mode & 0o777 == 0o755
    assert {"blip_export.json", "manifest.json", "config.json"} <= set(os.listdir(tmp_path / "ok"))
