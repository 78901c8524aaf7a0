"""The numbers the `blip` command line prints, against transformers 4.57 run on the same checkpoint.

tests/test_cli.py checks the commands' shapes (exit codes, keys, error lines); here every printed
number (caption and answer text, ITM probability, ITC cosine, parameter and byte counts) is
compared with the value transformers' PyTorch class computes from the same files and the same
processor output, so a command that prints the wrong column or the wrong softmax entry fails.
"""
import json
import os

import numpy as np
import pytest

from blip_apps.cli import main
from blip_core.numerics import tolerance
from fixture_utils import fixture, require

torch = require("torch")
transformers = require("transformers")

QUESTION = "what is in the sky?"
TEXTS = ["a red house", "two dogs on a beach under a tree"]   # different lengths: a padded batch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from blip_apps.demo import DEMO_IMAGE, build_demo_model
    from blip_core.processing import BlipProcessor
    from PIL import Image
    root = tmp_path_factory.mktemp("cli-numbers")
    dirs = {arch: build_demo_model(str(root / arch), architecture=arch)
            for arch in ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval")}
    processor = BlipProcessor.from_pretrained(dirs["BlipForConditionalGeneration"])
    return dirs, processor, Image.open(DEMO_IMAGE), DEMO_IMAGE


def _hf(directory, arch):
    return getattr(transformers, arch).from_pretrained(directory).eval()


def _pt(enc, *keys):
    return {k: torch.from_numpy(np.asarray(enc[k])) for k in keys}


@pytest.mark.parametrize("beams", [1, 4])
def test_caption_text_is_transformers_caption(demo, capsys, beams):
    dirs, processor, image, path = demo
    d = dirs["BlipForConditionalGeneration"]
    assert main(["caption", path, "--model", d, "--num-beams", str(beams), "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip().split("\t")
    enc = processor(images=image, return_tensors="np")
    hf = _hf(d, "BlipForConditionalGeneration")
    with torch.no_grad():
        ids = hf.generate(**_pt(enc, "pixel_values"), num_beams=beams, max_new_tokens=5)
        greedy = hf.generate(**_pt(enc, "pixel_values"), max_new_tokens=5)
    want = processor.decode(ids[0].tolist(), skip_special_tokens=True).strip()
    assert printed == [path, want]
    assert (beams == 1) == (ids.tolist() == greedy.tolist())      # 4 beams find another caption here


@pytest.mark.parametrize("beams", [1, 2])
def test_vqa_answer_is_transformers_answer(demo, capsys, beams):
    dirs, processor, image, path = demo
    d = dirs["BlipForQuestionAnswering"]
    assert main(["vqa", path, QUESTION, "--model", d, "--json", "--max-new-tokens", "4",
                 "--num-beams", str(beams)]) == 0
    row = json.loads(capsys.readouterr().out)
    enc = processor(images=image, text=QUESTION, return_tensors="np")
    with torch.no_grad():
        ids = _hf(d, "BlipForQuestionAnswering").generate(**_pt(enc, "pixel_values", "input_ids", "attention_mask"),
                                                          num_beams=beams, max_new_tokens=4)
    assert row == {"image": path, "question": QUESTION,
                   "answer": processor.decode(ids[0].tolist(), skip_special_tokens=True).strip()}


def test_match_prints_transformers_match_probability_and_cosine(demo, capsys):
    dirs, processor, image, path = demo
    d = dirs["BlipForImageTextRetrieval"]
    assert main(["match", path, *TEXTS, "--json", "--model", d]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    enc = processor(images=[image] * len(TEXTS), text=TEXTS, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0                     # the batch really is padded
    model = _hf(d, "BlipForImageTextRetrieval")
    t = _pt(enc, "pixel_values", "input_ids", "attention_mask")
    with torch.no_grad():
        p_match = torch.softmax(model(**t, use_itm_head=True).itm_score.double(), -1)[:, 1].numpy()
        cosine = torch.diagonal(model(**t, use_itm_head=False).itm_score).numpy()
    atol, rtol = tolerance("default", "float32")
    assert [r["text"] for r in rows] == TEXTS
    np.testing.assert_allclose([r["itm_probability"] for r in rows], p_match, atol=atol, rtol=rtol)
    np.testing.assert_allclose([r["itc_score"] for r in rows], cosine, atol=atol, rtol=rtol)
    # the two columns differ, so printing p(no match) or another pair's cosine cannot pass
    assert not np.allclose(p_match, 1.0 - p_match, atol=10 * atol)


def test_match_table_prints_the_same_numbers(demo, capsys):
    """The plain-text table: p(match) and cosine to 4 decimals, the values of transformers' model."""
    dirs, processor, image, path = demo
    d = dirs["BlipForImageTextRetrieval"]
    assert main(["match", path, *TEXTS, "--model", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    enc = processor(images=[image] * len(TEXTS), text=TEXTS, padding=True, return_tensors="np")
    model = _hf(d, "BlipForImageTextRetrieval")
    t = _pt(enc, "pixel_values", "input_ids", "attention_mask")
    with torch.no_grad():
        p_match = torch.softmax(model(**t, use_itm_head=True).itm_score.double(), -1)[:, 1].numpy()
        cosine = torch.diagonal(model(**t, use_itm_head=False).itm_score).numpy()
    assert lines[0].split() == ["ITM", "p(match)", "ITC", "cosine", "text"]
    for line, text, p, c in zip(lines[1:], TEXTS, p_match, cosine):
        assert line.split(None, 2) == [f"{p:.4f}", f"{c:.4f}", text]


@pytest.mark.parametrize("name", ["BlipForConditionalGeneration", "Blip2ForConditionalGeneration"])
def test_info_numbers_are_those_of_the_files(name, capsys):
    d, _, _ = fixture(name)
    assert main(["info", d, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = _hf(d, name)
    unique = {id(p): p for p in model.parameters()}
    assert info["architecture"] == name
    assert info["parameters"] == info["table_parameters"] == sum(p.numel() for p in unique.values())
    assert info["dtypes"] == {"float32": info["parameters"]}
    assert info["bytes"] == 4 * info["parameters"]
    assert info["shards"] == 1 and info["files"] == ["model.safetensors"]
    assert os.path.getsize(os.path.join(d, "model.safetensors")) > info["bytes"]   # tensors plus the header
