"""Held-out metrics of the training loop, in plain Python / numpy (no framework).

- ``exact_match(predictions, references)``: share of predictions equal to their reference after
  ``normalize`` (lower case, single spaces, no space before ``?``).
- ``vqa_accuracy``: VQA v2's accuracy ``min(#annotators who gave the answer / 3, 1)`` averaged over
  questions; with one reference answer per question (our data) it is the exact match.
- ``bleu4(predictions, references)``: corpus BLEU-4 of Papineni et al. (2002) with one reference per
  prediction: the geometric mean of the clipped 1- to 4-gram precisions (uniform weights, counts
  summed over the corpus, whitespace tokens) times the brevity penalty ``exp(1 - r/c)`` when the total
  candidate length c is below the total reference length r. A zero n-gram precision gives 0 (no
  smoothing), as sacrebleu's ``corpus_bleu(..., smooth_method="none", tokenize="none")`` (tested against
  it). nltk's unsmoothed ``corpus_bleu`` differs where a candidate is shorter than four words: it counts
  at least one n-gram of each order per candidate.
- ``recall_at_1(scores, positives)``: for a (queries, candidates) score matrix, the share of queries
  whose best-scoring candidate is one of their positives.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np


def normalize(text: str) -> str:
    return " ".join(str(text).lower().replace("?", " ?").split()).replace(" ?", "?")


def exact_match(predictions, references) -> float:
    if len(predictions) != len(references) or not references:
        raise ValueError("exact_match needs as many predictions as references (at least one)")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def vqa_accuracy(predictions, answers) -> float:
    """``answers[i]`` is one answer string or a list of the annotators' answers for question i."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError("vqa_accuracy needs as many predictions as answer lists (at least one)")
    total = 0.0
    for p, refs in zip(predictions, answers):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += min(sum(normalize(p) == normalize(r) for r in refs) / 3.0, 1.0) if len(refs) > 1 \
            else float(normalize(p) == normalize(refs[0]))
    return total / len(answers)


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(predictions, references) -> float:
    """Corpus BLEU-4 in [0, 1] (see the module docstring)."""
    if len(predictions) != len(references) or not references:
        raise ValueError("bleu4 needs as many predictions as references (at least one)")
    matched, possible = [0] * 4, [0] * 4
    c_len = r_len = 0
    for p, r in zip(predictions, references):
        cand, ref = normalize(p).split(), normalize(r).split()
        c_len, r_len = c_len + len(cand), r_len + len(ref)
        for n in range(1, 5):
            c, rc = _ngrams(cand, n), _ngrams(ref, n)
            matched[n - 1] += sum(min(k, rc[g]) for g, k in c.items())
            possible[n - 1] += max(len(cand) - n + 1, 0)
    if c_len == 0 or min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / p) for m, p in zip(matched, possible)) / 4.0
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)
    return bp * math.exp(log_p)


def recall_at_1(scores, positives) -> float:
    """``scores`` (Q, C); ``positives`` a (Q, C) boolean matrix, or the index of the one positive per query."""
    scores = np.asarray(scores)
    pos = np.asarray(positives)
    if pos.ndim == 1:
        pos = np.arange(scores.shape[1])[None, :] == pos[:, None]
    best = scores.argmax(axis=1)
    return float(pos[np.arange(len(best)), best].mean())
