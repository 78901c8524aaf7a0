"""Metrics (against hand computation), the synthetic generator (determinism, grammar, vocabulary),
the seeded data order and the learning-rate schedule."""
import json
import math
import os

import numpy as np
import pytest

from blip_apps import synthetic
from blip_apps.train import TrainConfig, learning_rate
from blip_apps.train import data as data_mod
from blip_apps.train import metrics


def test_bleu4_by_hand():
    # cand "a b c d e" vs ref "a b c d f": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, equal lengths -> BP 1
    want = math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert metrics.bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx(want, rel=1e-12)
    # clipping: "a a a a a" vs "a b c d e f" -> p1 = 1/5 (one "a" in the reference), p2 = 0 -> 0
    assert metrics.bleu4(["a a a a a"], ["a b c d e f"]) == 0.0
    # brevity: cand 4 words, ref 6 words, all 4 candidate n-grams found -> exp(1 - 6/4)
    assert metrics.bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-12)
    # corpus counts are summed before the ratio: p1 = (4 + 4) / (4 + 5), ...
    pair = metrics.bleu4(["a b c d", "a b c d e"], ["a b c d", "a b c d f"])
    p = [(4 + 4) / (4 + 5), (3 + 3) / (3 + 4), (2 + 2) / (2 + 3), (1 + 1) / (1 + 2)]
    assert pair == pytest.approx(math.exp(sum(map(math.log, p)) / 4), rel=1e-12)
    assert metrics.bleu4(["The cat sat on the mat"], ["the cat sat on the mat"]) == 1.0


def test_exact_match_vqa_accuracy_and_recall():
    assert metrics.exact_match(["A red  circle", "blue"], ["a red circle", "red"]) == 0.5
    assert metrics.exact_match(["what is it?"], ["what is it ?"]) == 1.0
    assert metrics.vqa_accuracy(["red", "blue"], ["red", "green"]) == 0.5
    # VQA v2 rule with annotator lists: 2 of 10 annotators said "red" -> 2/3; 4 said "blue" -> 1
    assert metrics.vqa_accuracy(["red", "blue"], [["red", "red"] + ["x"] * 8, ["blue"] * 4 + ["y"] * 6]) == \
        pytest.approx((2 / 3 + 1) / 2)
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1]])
    assert metrics.recall_at_1(scores, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    positives = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], bool)
    assert metrics.recall_at_1(scores, positives) == pytest.approx(2 / 3)


def test_synthetic_data_is_deterministic_and_in_the_vocabulary(tmp_path):
    a, b = synthetic.write_dataset(str(tmp_path / "a"), 12, 6, seed=7), synthetic.write_dataset(str(tmp_path / "b"), 12, 6, seed=7)
    for split in ("train", "test"):
        names = sorted(os.listdir(os.path.join(a, split)))
        assert names == sorted(os.listdir(os.path.join(b, split)))
        for name in names:
            with open(os.path.join(a, split, name), "rb") as f1, open(os.path.join(b, split, name), "rb") as f2:
                assert f1.read() == f2.read(), name
    rows = [json.loads(line) for line in open(os.path.join(a, "train", "metadata.jsonl"))]
    test_rows = [json.loads(line) for line in open(os.path.join(a, "test", "metadata.jsonl"))]
    assert {"file_name", "text", "question", "answer"} <= set(rows[0])
    assert [r["text"] for r in rows] != [r["text"] for r in test_rows[:6]] + [None] * 6
    other = synthetic.rows(12, seed=8)
    assert [r for _, r in other] != rows
    with open(synthetic.VOCAB_FILE) as fh:
        vocab = set(fh.read().split())
    for r in rows + test_rows:
        words = (r["text"] + " " + r["question"] + " " + r["answer"]).split()
        assert set(words) <= vocab, words
    # the grammar: the caption names what the question's answer says
    for scene, row in synthetic.rows(40, seed=1):
        assert row["answer"] in (scene.color, scene.shape, scene.place, scene.size)
        assert row["text"].startswith(f"a {scene.size} {scene.color} {scene.shape} ")


def test_render_puts_the_shape_where_the_caption_says():
    for place in synthetic.PLACES:
        scene = synthetic.Scene("square", "red", "large", place, 0, 0, 0, 12)
        img = np.asarray(synthetic.render(scene)).astype(int)
        ys, xs = np.nonzero((img[..., 0] > 200) & (img[..., 1] < 80))
        cx, cy = xs.mean(), ys.mean()
        assert {"left": cx < 24, "right": cx > 40, "top": cy < 24, "bottom": cy > 40}[place], (place, cx, cy)


def test_data_order_is_a_function_of_seed_and_step():
    n = 10
    stream = data_mod.sample_indices(n, seed=3, start=0, count=35)
    for epoch in range(3):      # every epoch is a permutation of all rows
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert np.array_equal(stream[:10], np.random.default_rng([3, 0]).permutation(10))
    assert np.array_equal(data_mod.sample_indices(n, seed=3, start=17, count=18), stream[17:])
    assert not np.array_equal(data_mod.sample_indices(n, seed=4, start=0, count=10), stream[:10])


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=14)
    assert [learning_rate(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, cfg) == 1.0
    assert learning_rate(9, cfg) == pytest.approx(0.5)          # half-way through the cosine
    assert learning_rate(13, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
