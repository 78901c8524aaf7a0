"""The main job on the bundled models (`blip demo` / `make demo`) runs in every backend and they agree."""
import fnmatch
import glob
import os

import numpy as np
import pytest

from blip_apps.demo import DEMO_IMAGE, DEMO_VOCAB, MODELS, SAMPLES, _run_backend, _samples, run_demo
from blip_core import BACKENDS
from fixture_utils import ROOT, pyproject


@pytest.fixture(scope="module")
def reference():
    """What the demo computes, computed by transformers' PyTorch classes from the bundled models: captions
    (12 new tokens), answers to the padded questions (4), and per image the sample caption with the best
    ITM "match" logit + ITC cosine, with the ITM match probabilities."""
    import torch
    import transformers
    from blip_core.processing import BlipProcessor
    rows, images = _samples()
    processor = BlipProcessor.from_pretrained(os.path.join(MODELS, "caption"))
    px = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])

    def hf(cls, task):
        return getattr(transformers, cls).from_pretrained(os.path.join(MODELS, task)).eval()

    def decode(ids):
        return [processor.decode(r.tolist(), skip_special_tokens=True).strip() for r in ids]
    q = {k: torch.from_numpy(v) for k, v in processor.tokenizer([r["question"] for r in rows], padding=True,
                                                                 return_tensors="np").items()}
    t = {k: torch.from_numpy(v) for k, v in processor.tokenizer([r["text"] for r in rows], padding=True,
                                                                 return_tensors="np").items()}
    n = len(rows)
    with torch.no_grad():
        captions = decode(hf("BlipForConditionalGeneration", "caption").generate(pixel_values=px, max_new_tokens=12))
        answers = decode(hf("BlipForQuestionAnswering", "vqa").generate(
            input_ids=q["input_ids"], attention_mask=q["attention_mask"], pixel_values=px, max_new_tokens=4))
        retrieval = hf("BlipForImageTextRetrieval", "retrieval")
        itm = np.stack([retrieval(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                  pixel_values=px[i:i + 1].expand(n, -1, -1, -1)).itm_score.numpy() for i in range(n)])
        itc = retrieval(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px,
                        use_itm_head=False).itm_score.numpy()
    p_match = np.exp(itm[..., 1]) / np.exp(itm).sum(-1)
    return {"rows": rows, "captions": captions, "answers": answers, "best": (itm[..., 1] + itc).argmax(1).tolist(),
            "p_match": p_match}


def test_demo_results_are_transformers_results(reference):
    """The torch backend's run of the demo: the same captions, answers and best matches as transformers."""
    rows, images = _samples()
    got = _run_backend("torch", rows, images)
    assert {k: got[k] for k in ("captions", "answers", "best")} == {k: reference[k] for k in ("captions", "answers",
                                                                                               "best")}
    np.testing.assert_allclose(got["p_match"], reference["p_match"], atol=1e-5)


def test_demo_runs_and_agrees_in_every_backend(capsys, reference):
    """Every backend runs, they agree, and what the demo prints (captions, answers, best matches with their
    probability, the right-answer counts) is what transformers computes from the same models."""
    assert run_demo(backends=BACKENDS) == 0
    out = capsys.readouterr().out
    assert "backends agree (torch, tf, jax): captions True, answers True, matches True" in out
    for backend in BACKENDS:
        assert f"{backend:>5}: loaded 3 models" in out
    assert out.count("  truth: '") == 6                 # six images, each with its true caption
    rows, texts = reference["rows"], [r["text"] for r in reference["rows"]]
    for i, row in enumerate(rows):
        assert "    caption   " + " | ".join(f"{b}: {reference['captions'][i]}" for b in BACKENDS) in out
        assert f"  (truth: {row['answer']})  " + " | ".join(f"{b}: {reference['answers'][i]}" for b in BACKENDS) in out
        best = texts[reference["best"][i]]
        assert " | ".join(f"{b}: {best!r} p={reference['p_match'][i].max():.3f}" for b in BACKENDS) in out
    right = (sum(c == t for c, t in zip(reference["captions"], texts)),
             sum(a == r["answer"] for a, r in zip(reference["answers"], rows)),
             sum(j == i for i, j in enumerate(reference["best"])))
    for b in BACKENDS:
        assert f"{b:>5} correct: captions {right[0]}/6, answers {right[1]}/6, matches {right[2]}/6" in out


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


def _canned(captions):
    """A stand-in for one backend's run: these captions, right answers and matches."""
    rows, _ = _samples()
    return {"load_s": 0.0, "run_s": 0.0, "captions": list(captions), "answers": [r["answer"] for r in rows],
            "best": list(range(len(rows))), "p_match": np.eye(len(rows))}


def test_demo_exits_1_when_backends_disagree(monkeypatch, capsys):
    import blip_apps.demo as demo
    rows, _ = _samples()
    truth = [r["text"] for r in rows]
    runs = {"torch": _canned(truth), "jax": _canned(["a red square on the left"] + truth[1:])}
    monkeypatch.setattr(demo, "_run_backend", lambda backend, rows, images: runs[backend])
    assert run_demo(backends=("torch", "jax")) == 1
    assert "backends agree (torch, jax): captions False, answers True, matches True" in capsys.readouterr().out


def test_demo_exits_1_when_a_backend_cannot_run(monkeypatch, capsys):
    import blip_apps.demo as demo
    rows, _ = _samples()

    def run(backend, rows, images):
        if backend == "tf":
            raise ImportError("No module named 'tensorflow'")
        return _canned([r["text"] for r in rows])
    monkeypatch.setattr(demo, "_run_backend", run)
    assert run_demo(backends=("torch", "tf")) == 1
    out = capsys.readouterr().out
    assert "   tf: unavailable (No module named 'tensorflow')" in out and "backends agree (torch)" in out


# -- the synthetic shapes generator behind the bundled models and their held-out samples -------------------------
def test_synthetic_splits_draw_their_own_streams():
    """Same seed, same scenes; the test and samples splits draw streams of their own, so their scenes and
    metadata rows are not the training split's."""
    from blip_apps import synthetic
    train = synthetic.scenes(40, seed=7, split="train")
    assert synthetic.scenes(40, seed=7, split="train") == train
    assert synthetic.scenes(40, seed=8, split="train") != train
    for split in ("test", "samples"):
        held_out = synthetic.scenes(40, seed=7, split=split)
        assert not set(held_out) & set(train), split
        assert [r for _, r in synthetic.rows(40, 7, split)] != [r for _, r in synthetic.rows(40, 7, "train")]


def test_synthetic_test_images_are_not_training_images(tmp_path):
    """``write_dataset``: the same seed writes the same bytes, and no test picture is a training picture."""
    from blip_apps import synthetic

    def pictures(out):
        synthetic.write_dataset(str(out), n_train=12, n_test=6, seed=2)
        return {split: sorted(p.read_bytes() for p in (out / split).glob("*.png")) for split in ("train", "test")}
    first, again = pictures(tmp_path / "a"), pictures(tmp_path / "b")
    assert first == again and len(first["train"]) == 12 and len(first["test"]) == 6
    assert not set(first["test"]) & set(first["train"])


@pytest.mark.parametrize("size", ["small", "large"])
def test_synthetic_scenes_span_their_documented_ranges(size):
    """Half-widths cover ``SIZES[size]`` with both ends included, jitter covers -3..3 pixels, and a square of
    half-width r is drawn as (2r + 1)^2 pixels of its colour centred at its place plus jitter."""
    from blip_apps import synthetic
    drawn = [s for s in synthetic.scenes(600, seed=1) if s.size == size]
    lo, hi = synthetic.SIZES[size]
    assert {s.radius for s in drawn} == set(range(lo, hi + 1))
    assert {s.dx for s in drawn} == {s.dy for s in drawn} == set(range(-3, 4))
    scene = synthetic.Scene("square", "blue", size, "left", 0, 2, -1, hi)
    img = np.asarray(synthetic.render(scene))
    ys, xs = np.nonzero((img == synthetic.COLORS["blue"]).all(-1))
    assert len(xs) == (2 * hi + 1) ** 2
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (16 + 2 - hi, 16 + 2 + hi, 32 - 1 - hi, 32 - 1 + hi)
