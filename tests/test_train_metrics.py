"""Metrics (against hand computation), the synthetic generator (determinism, grammar, vocabulary),
the seeded data order and the learning-rate schedule."""
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip_apps import synthetic
from blip_apps.cli import BUNDLED
from blip_apps.train import TrainConfig, learning_rate
from blip_apps.train.loop import STATE_FILE, evaluate, latest_checkpoint, retrieval_scores
from blip_apps.train import data as data_mod
from blip_apps.train import metrics


def test_bleu4_by_hand():
    # cand "a b c d e" vs ref "a b c d f": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, equal lengths -> BP 1
    want = math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert metrics.bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx(want, rel=1e-12)
    # clipping: "a a a a a" vs "a b c d e f" -> p1 = 1/5 (one "a" in the reference), p2 = 0 -> 0
    assert metrics.bleu4(["a a a a a"], ["a b c d e f"]) == 0.0
    # clipping with every order matched: "a a b c d" vs "a b c d e" -> p1 = 4/5 (the second "a" unmatched),
    # p2 = 3/4, p3 = 2/3, p4 = 1/2
    assert metrics.bleu4(["a a b c d"], ["a b c d e"]) == pytest.approx(want, rel=1e-12)
    # brevity: cand 4 words, ref 6 words, all 4 candidate n-grams found -> exp(1 - 6/4)
    assert metrics.bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-12)
    # corpus counts are summed before the ratio: p1 = (4 + 4) / (4 + 5), ...
    pair = metrics.bleu4(["a b c d", "a b c d e"], ["a b c d", "a b c d f"])
    p = [(4 + 4) / (4 + 5), (3 + 3) / (3 + 4), (2 + 2) / (2 + 3), (1 + 1) / (1 + 2)]
    assert pair == pytest.approx(math.exp(sum(map(math.log, p)) / 4), rel=1e-12)
    assert metrics.bleu4(["The cat sat on the mat"], ["the cat sat on the mat"]) == 1.0


_VOCAB = ["a", "red", "blue", "circle", "square", "on", "the", "left"]


@st.composite
def _pair(draw):
    """A (candidate, reference) pair of word lists: the candidate is a stretch of the reference with words
    changed, dropped or added (so that 4-gram matches, clipping and short candidates are common), or an
    unrelated list (possibly empty)."""
    ref = draw(st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=12))
    if draw(st.booleans()):
        return draw(st.lists(st.sampled_from(_VOCAB), max_size=9)), ref
    i = draw(st.integers(0, len(ref)))
    j = draw(st.integers(i, len(ref)))
    cand = list(ref[i:j])
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, len(cand)))
        cand[k:k + draw(st.integers(0, 1))] = [draw(st.sampled_from(_VOCAB))]
    return cand, ref


@settings(max_examples=200, deadline=None, derandomize=True)
@given(pairs=st.lists(_pair(), min_size=1, max_size=4))
def test_bleu4_is_sacrebleus_unsmoothed_corpus_bleu(pairs):
    """Against sacrebleu's ``corpus_bleu`` (one reference per candidate, no smoothing, whitespace tokens).
    (nltk's ``corpus_bleu`` is no reference here: it counts at least one n-gram of every order per
    candidate, so candidates shorter than four words lower its precisions.)"""
    from sacrebleu import corpus_bleu
    cands, refs = [" ".join(c) for c, _ in pairs], [" ".join(r) for _, r in pairs]
    want = corpus_bleu(cands, [refs], smooth_method="none", tokenize="none", force=True).score / 100
    assert metrics.bleu4(cands, refs) == pytest.approx(want, rel=1e-9, abs=1e-12)


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


def _epochs(n, seed, upto):
    """The run's sample stream as the module docstring defines it: each epoch's permutation in turn."""
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(upto // n + 1)])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31), start=st.integers(0, 40), count=st.integers(1, 40))
def test_sample_stream_is_each_epochs_permutation_in_turn(n, seed, start, count):
    assert np.array_equal(data_mod.sample_indices(n, seed, start, count), _epochs(n, seed, start + count)[start:start + count])


class _Rows:
    """A stand-in for TaskData: ``batch`` returns the row indices it was given."""
    n = 7

    def batch(self, indices):
        return list(indices)


def test_step_batches_are_consecutive_slices_of_the_stream():
    """Step s with K accumulation slices of B rows reads samples [s*K*B, (s+1)*K*B) of the stream, slice k
    the k-th B of them; four steps of 2 x 3 cross three epochs of 7 rows."""
    stream = _epochs(7, 5, 4 * 6)
    for step in range(4):
        got = data_mod.step_batches(_Rows(), seed=5, step=step, batch_size=3, accum=2)
        want = stream[step * 6:(step + 1) * 6]
        assert got == [list(want[:3]), list(want[3:])], step


def test_accumulation_only_slices_the_steps_batch():
    """2 slices of 3 rows read, step for step, the rows one batch of 6 reads."""
    for step in range(5):
        sliced = data_mod.step_batches(_Rows(), seed=2, step=step, batch_size=3, accum=2)
        [whole] = data_mod.step_batches(_Rows(), seed=2, step=step, batch_size=6, accum=1)
        assert sliced[0] + sliced[1] == whole, step


def _task_data(task, texts=None, extra=0):
    """TaskData of three synthetic pictures (or of ``texts``, retrieval) with the bundled model's processor;
    ``extra`` more padding positions than the longest text needs."""
    from blip_core.configs import load_config
    from blip_core.processing import BlipProcessor
    model_dir = os.path.join(BUNDLED, "vqa" if task == "vqa" else "caption")
    processor = BlipProcessor.from_pretrained(model_dir)
    scenes = synthetic.rows(3 if texts is None else len(texts), seed=2)
    rows = [dict(r) for _, r in scenes] if texts is None else [{"file_name": f"{i}.png", "text": t}
                                                             for i, t in enumerate(texts)]
    px = processor.image_processor([synthetic.render(s) for s, _ in scenes], return_tensors="np")["pixel_values"]
    split = data_mod.Split("memory", rows, px)
    lengths = {k: v + extra for k, v in data_mod.lengths_for(task, processor.tokenizer, split).items()}
    return data_mod.TaskData(split, task, processor.tokenizer, load_config(model_dir).text_config.bos_token_id, lengths)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_labels_are_the_decoder_ids_with_padding_ignored(task):
    """Caption: input ids with bos in place of [CLS]; VQA: the answer's ids after bos, closed by [SEP]. The
    labels are those ids where the mask is 1 and -100 (ignored by the loss) on padding."""
    batch = _task_data(task, extra=4).batch([0, 1, 2])
    ids, mask = ((batch["input_ids"], batch["attention_mask"]) if task == "caption"
                 else (batch["decoder_input_ids"], batch["decoder_attention_mask"]))
    assert (ids[:, 0] == 32).all() and (mask[:, -4:] == 0).all()          # the bundled models' bos
    np.testing.assert_array_equal(batch["labels"], np.where(mask == 1, ids, -100))


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_padding_does_not_change_the_loss(task):
    """The torch loss of the bundled model on the same three pictures, with their texts padded to the
    longest and 6 positions further: equal (padding is neither attended to by the real positions nor
    scored)."""
    import torch

    import backends.torch as bt
    from blip_apps.train.torch_step import task_loss
    cls = bt.BlipForConditionalGeneration if task == "caption" else bt.BlipForQuestionAnswering
    model = cls.from_pretrained(os.path.join(BUNDLED, task)).eval()
    with torch.no_grad():
        tight, padded = (float(task_loss(model, task, _task_data(task, extra=e).batch([0, 1, 2]), 0.07))
                         for e in (0, 6))
    assert padded == pytest.approx(tight, rel=1e-5)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_training_starts_the_decoder_where_generate_does(task):
    """The first decoder token the training data feeds is the one ``generate`` starts its output with
    (bos), so the model learns the continuation it is asked for."""
    import backends.torch as bt
    data = _task_data(task)
    batch = data.batch([0, 1, 2])
    model_dir = os.path.join(BUNDLED, task)
    if task == "caption":
        first = bt.BlipForConditionalGeneration.from_pretrained(model_dir).generate(
            pixel_values=batch["pixel_values"], max_new_tokens=2)[:, 0]
        fed = batch["input_ids"][:, 0]
    else:
        first = bt.BlipForQuestionAnswering.from_pretrained(model_dir).generate(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            max_new_tokens=2)[:, 0]
        fed = batch["decoder_input_ids"][:, 0]
    np.testing.assert_array_equal(fed, first.numpy())


def test_equal_captions_share_a_retrieval_group():
    data = _task_data("retrieval", texts=["a red circle", "a blue square", "a red circle", "a green star",
                                          "a blue square"])
    assert data.arrays["text_group"].tolist() == [0, 1, 0, 2, 1]


def test_a_batch_numbers_its_retrieval_groups_afresh():
    """Within a batch the groups are 0 .. k-1 (only which rows share one matters)."""
    texts = ["a red circle", "a blue square", "a red circle", "a green star", "a blue square"]
    data = _task_data("retrieval", texts=texts)
    for rows in ([4, 2, 1, 0], [3, 0], [1, 4]):
        got = data.batch(rows)["text_group"]
        want = np.array([[texts[i] == texts[j] for j in rows] for i in rows])
        np.testing.assert_array_equal(got[:, None] == got[None, :], want)
        assert sorted(set(got.tolist())) == list(range(len({texts[i] for i in rows}))), rows


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=14)
    assert [learning_rate(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, cfg) == 1.0
    assert learning_rate(9, cfg) == pytest.approx(0.5)          # half-way through the cosine
    assert learning_rate(13, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


# -- the loop's bookkeeping: checkpoints, held-out loss, retrieval ranking ---------------------------------------
def _checkpoints(out, steps, without_state=()):
    for s in steps:
        d = out / f"checkpoint-{s}"
        d.mkdir(parents=True)
        if s not in without_state:
            (d / STATE_FILE).write_text("{}")


def test_the_latest_checkpoint_is_the_highest_step(tmp_path):
    _checkpoints(tmp_path, [30, 200, 1000, 90])
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1000")


def test_a_checkpoint_without_its_state_file_is_not_the_latest(tmp_path):
    """A run killed while saving leaves a checkpoint folder without trainer_state.json: resuming skips it."""
    _checkpoints(tmp_path, [900, 1000, 1100], without_state=(1100,))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1000")


class _Held:
    """A stand-in held-out set of ``n`` rows whose 'loss' per row is its index."""

    def __init__(self, n):
        self.n, self.texts = n, ["a shape"] * n
        self.arrays = {"pixel_values": np.zeros((n, 1)), "input_ids": np.zeros((n, 2), np.int64)}

    def batch(self, idx):
        return {"row": np.asarray(idx, np.float64)}


class _Constant:
    def generate(self, pixel_values, max_new_tokens):
        return np.zeros((len(pixel_values), 2), np.int64)

    def decode(self, row, skip_special_tokens):
        return "a shape"

    def loss(self, batch):                      # the trainer: the mean 'loss' of the batch's rows
        return float(batch["row"].mean())


@pytest.mark.parametrize("n, batch_size", [(5, 2), (7, 3)])
def test_the_held_out_loss_is_the_mean_over_rows(n, batch_size):
    """Batches of unequal size (the last is short) weigh by their rows: the mean over the rows, 0..n-1."""
    stub = _Constant()
    out = evaluate(stub, stub, _Held(n), TrainConfig(task="caption"), trainer=stub, batch_size=batch_size)
    assert out["loss"] == pytest.approx((n - 1) / 2, rel=1e-12) and out["exact_match"] == 1.0


_ITC = np.array([[0.2, 0.5, 0.1], [0.1, 0.6, 0.3], [0.0, 0.2, 0.9]])         # (images, captions)
_MATCH = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])       # ITM logit of "match"
_NO_MATCH = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])    # ITM logit of "no match"


class _Scores:
    """A stand-in retrieval model reading the tables above: the image index rides in pixel_values, the
    caption index in input_ids (what the stand-in tokenizer writes)."""

    def __call__(self, input_ids, pixel_values, attention_mask, use_itm_head):
        i, j = pixel_values[:, 0].astype(int), input_ids[:, 0]
        if not use_itm_head:
            return type("Out", (), {"itm_score": _ITC[np.ix_(i, j)]})
        return type("Out", (), {"itm_score": np.stack([_NO_MATCH[i, j], _MATCH[i, j]], 1)})


class _Captions:
    n, texts = 3, ["t0", "t1", "t2"]
    arrays = {"pixel_values": np.arange(3, dtype=np.float32)[:, None], "input_ids": np.zeros((3, 4), np.int64)}

    @staticmethod
    def tokenizer(texts, padding, max_length, truncation, return_tensors):
        ids = np.zeros((len(texts), max_length), np.int64)
        ids[:, 0] = [int(t[1:]) for t in texts]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.mark.parametrize("k", [0, 2])
def test_retrieval_scores_rank_as_blip_does(k):
    """On hand-made tables: ITC alone picks captions [1, 1, 2], the ITM head alone (match minus no-match) is
    right for images 0 and 1 only, BLIP's score (match logit + ITC cosine) picks [0, 1, 2]; captions to images
    by ITC [0, 1, 2]. The ITM head re-ranks every caption (k=0) or ITC's top 2 (k=2): the same scores here."""
    got = retrieval_scores(_Scores(), _Captions(), 3, k=k)
    assert got["top1"] == [0, 1, 2] and got["itc_top1"] == [1, 1, 2]
    assert (got["recall@1"], got["itc_recall@1"]) == (1.0, pytest.approx(2 / 3))
    assert got["itm_recall@1"] == pytest.approx(2 / 3) and got["itc_text_to_image_recall@1"] == 1.0
