"""The decoding rulebook: what one step of greedy, sampling, beam or beam-sample search keeps, fills,
penalises and when it stops, written once for every backend.

The rules are plain functions over an array namespace ``xp`` that each backend supplies
(``backends/<x>/generation.py``: ``TorchOps``, ``TFOps``, ``JaxOps``) with a small numpy-like
vocabulary (``where``, ``top_k``, ``take_along``, ``write``, ``read``, ``mark``, ``sample``, ...).
The backends' engines only drive the loop in their own dialect (eager, ``tf.while_loop`` under
XLA, ``lax.while_loop``) and call a model's step function; no search logic lives there.

The state is a dict of fixed-size arrays, so the same rules run eagerly and inside compiled loops:

* ``seqs`` (N, T): token buffer of ``T = prompt + max_new_tokens`` slots, filled up to ``cur``;
* ``key_mask`` (N, T): 1 for real tokens written so far (the prompt's padding stays 0);
* ``count`` (N,): real tokens so far, so the next token's position is ``count`` (positions are
  ``cumsum(mask) - 1`` with padded slots at 1, as transformers derives them);
* greedy/sampling: ``unfinished`` (N,); beam: ``running_scores``, ``beam_scores``, ``finished``,
  ``lengths``, ``done_seqs``, ``improvable``, ``go`` per input row, as transformers 4.57's
  vectorised ``_beam_search`` keeps them.

Everything reproduces transformers 4.57 ``generate``: processor order (repetition penalty,
no-repeat n-grams, bad words, min length, then temperature, top-k, top-p), ``min_tokens_to_keep``,
``beams_to_keep = max(2, 1 + n_eos) * num_beams``, the -1e9 bookkeeping, the early-stopping
heuristic, the beam filler ``pad or eos[0]`` and the output trimmed to the longest returned row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from .cache import batch_bucket, new_tokens_bucket
from .generation import GenerationSettings

NEG = -1.0e9      # transformers' "never pick" offset in beam search bookkeeping


@dataclass(frozen=True)
class DecodePlan:
    """The static part of one ``generate`` call: shapes and which rules run (hashable, so compiled
    engines key their programs on it). Numeric values that may change between calls without
    changing the program live in ``plan_numbers``."""

    mode: str                       # greedy | sample | beam | beam_sample
    num_beams: int
    num_return_sequences: int
    prompt_length: int
    max_new_tokens: int
    n_eos: int
    repetition_penalty: bool        # the processor runs at all (its value is a number)
    no_repeat_ngram_size: int
    bad_words: tuple                # tuples of ids, eos-only entries dropped as transformers does
    min_length: bool                # eos is banned before ``min_new`` new tokens (value is a number)
    filters: bool                   # sampling with top-k and/or top-p
    early_stopping: Any             # True | False | "never"
    fill_value: int                 # beam output filler
    min_keep: int                   # min_tokens_to_keep of top-k / top-p
    output_scores: bool

    @property
    def beam(self) -> bool:
        return self.mode.startswith("beam")

    @property
    def sample(self) -> bool:
        return self.mode in ("sample", "beam_sample")

    @property
    def expand(self) -> int:
        """Rows per input row: the beams, or the returned samples."""
        return self.num_beams if self.beam else self.num_return_sequences

    @property
    def total(self) -> int:
        return self.prompt_length + self.max_new_tokens


def make_plan(settings: GenerationSettings, vocab_size: int, output_scores: bool = False):
    """Split resolved settings into ``(DecodePlan, numbers)``; ``numbers`` is a dict of numpy values
    (eos ids, pad, temperature, top-k, top-p cut, penalty, min new tokens, length-penalty tables)."""
    s = settings
    eos = tuple(s.eos_token_id)
    pad = s.pad_token_id if s.pad_token_id is not None else (eos[0] if eos else 0)
    for name, t in [("eos_token_id", e) for e in eos] + [("pad_token_id", pad)]:
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"{name} {t} is outside the vocabulary of size {vocab_size}")
    bad = tuple(tuple(int(t) for t in w) for w in s.bad_words_ids if not (len(w) == 1 and w[0] in eos))
    for word in bad:
        if not word or min(word) < 0 or max(word) >= vocab_size:
            raise ValueError(f"bad_words_ids entry {list(word)} is empty or outside the vocabulary of size {vocab_size}")
    beam = s.num_beams > 1
    if beam and s.do_sample:
        min_keep = len(eos) + 1 if eos else 2
    else:
        min_keep = 1
    plan = DecodePlan(
        mode=s.mode, num_beams=s.num_beams, num_return_sequences=s.num_return_sequences,
        prompt_length=s.prompt_length, max_new_tokens=s.max_new_tokens, n_eos=len(eos),
        repetition_penalty=s.repetition_penalty != 1.0, no_repeat_ngram_size=int(s.no_repeat_ngram_size),
        bad_words=bad, min_length=bool(eos) and s.min_new_tokens > 0,
        filters=bool(s.do_sample and (s.top_k or s.top_p < 1.0)),
        early_stopping=s.early_stopping if beam else False,
        fill_value=int((s.pad_token_id or eos[0]) if eos else -1), min_keep=min_keep,
        output_scores=bool(output_scores))
    # (n ** length_penalty) in double precision as Python computes it, then float32 as torch divides.
    n = np.arange(s.max_new_tokens + 1, dtype=np.float64)
    n[0] = 1.0
    lp = (n ** s.length_penalty).astype(np.float32)
    heuristic = np.full_like(lp, lp[-1]) if (s.early_stopping == "never" and s.length_penalty > 0.0) else lp
    top_k = min(max(s.top_k, min_keep), vocab_size) if s.top_k else vocab_size
    numbers = dict(eos=np.asarray(eos if eos else (-1,), np.int32), pad=np.int32(pad),
                   temperature=np.float32(s.temperature), top_k=np.int32(top_k),
                   top_p_cut=np.float32(1.0 - s.top_p), penalty=np.float32(s.repetition_penalty),
                   min_new=np.int32(s.min_new_tokens), lp_table=lp, heuristic_table=heuristic,
                   limit=np.int32(plan.total))
    return plan, numbers


def bucketed_plan(settings: GenerationSettings, vocab_size: int, batch: int, max_new_limit: Optional[int] = None):
    """``make_plan`` for a compiled engine that shares programs between calls (``blip_core.cache``).

    The plan's buffer holds ``new_tokens_bucket(max_new_tokens, max_new_limit)`` new tokens while
    ``numbers["limit"]`` stops the loop at the requested length; ``numbers["rows"]`` counts the real
    input rows, the rest of the ``batch_bucket(batch)`` rows (copies of row 0, ``padding_rows``) start
    finished and never keep the loop going. Returns ``(plan, numbers, padded batch)``; the engine
    returns the first ``batch * num_return_sequences`` rows, which equal the unpadded call's.
    """
    plan, numbers = make_plan(settings, vocab_size, settings.output_scores)
    new = new_tokens_bucket(plan.max_new_tokens, max_new_limit)
    extra = new - plan.max_new_tokens
    numbers = dict(numbers, rows=np.int32(batch),   # the tables are read up to the real length only
                   lp_table=np.pad(numbers["lp_table"], (0, extra), mode="edge"),
                   heuristic_table=np.pad(numbers["heuristic_table"], (0, extra), mode="edge"))
    return replace(plan, max_new_tokens=new), numbers, batch_bucket(batch)


# -- masks and positions -------------------------------------------------------------------------------
def infer_prompt_mask(prompt: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """transformers' default mask: pad tokens are padding when pad is in the prompt and is no eos."""
    prompt = np.asarray(prompt)
    pad, eos = settings.pad_token_id, settings.eos_token_id
    if pad is not None and pad not in eos and bool(np.any(prompt == pad)):
        return (prompt != pad).astype(np.int32)
    return np.ones(prompt.shape, np.int32)


def prefill_positions(xp, mask):
    """Positions of the prompt: ``cumsum(mask) - 1``, padded slots at 1 (transformers' rule)."""
    return xp.where(mask == 0, 1, xp.cumsum(mask, axis=1) - 1)


def init_state(xp, plan: DecodePlan, ids, mask, rng, rows=None):
    """The state before the first step; ``ids``/``mask`` (N, P) are already expanded per beam/sample.

    ``rows`` (a scalar, possibly traced) counts the real input rows when the batch was padded to a
    bucket: the rows after them start finished (greedy/sampling) or not improvable (beam search), so
    they neither produce results nor keep the loop going."""
    n, p = xp.rows(ids), plan.prompt_length
    live = None if rows is None else xp.arange(n // plan.expand) < rows          # per input row
    fill = plan.fill_value if plan.beam else 0
    seqs = xp.concat([xp.cast(ids, "int32"), xp.full((n, plan.max_new_tokens), fill, "int32")], axis=1)
    key_mask = xp.concat([xp.cast(mask, "int32"), xp.zeros((n, plan.max_new_tokens), "int32")], axis=1)
    state = dict(seqs=seqs, key_mask=key_mask, count=xp.sum(xp.cast(mask, "int32"), axis=1), cur=xp.scalar(p),
                 rng=rng)
    if plan.output_scores:
        state["scores"] = None      # allocated at the first step, when the vocabulary size is known
    if plan.beam:
        b, k = n // plan.num_beams, plan.num_beams
        first = xp.concat([xp.zeros((b, 1), "float32"), xp.full((b, k - 1), NEG, "float32")], axis=1)
        live = xp.ones((b, 1), "bool") if live is None else xp.reshape(live, (b, 1))
        state.update(running_scores=first, beam_scores=xp.full((b, k), NEG, "float32"),
                     finished=xp.zeros((b, k), "bool"), lengths=xp.zeros((b, k), "int32"),
                     done_seqs=xp.reshape(seqs, (b, k, plan.total)), improvable=live, live=live,
                     go=xp.scalar(True))
    elif live is None:
        state["unfinished"] = xp.ones((n,), "bool")
    else:
        state["unfinished"] = xp.reshape(xp.broadcast(live[:, None], (n // plan.expand, plan.expand)), (n,))
    return state


def step_inputs(xp, state):
    """The last written token (N, 1), its position (N, 1) and its buffer index."""
    t = state["cur"] - 1
    return xp.read(state["seqs"], t, 1, axis=1), xp.reshape(state["count"] - 1, (-1, 1)), t


def going(xp, plan: DecodePlan, state):
    return state["go"] if plan.beam else xp.any(state["unfinished"])


# -- logits processors ---------------------------------------------------------------------------------
def _is_eos(xp, tokens, eos):
    return xp.isin(tokens, eos)


def process_scores(xp, plan: DecodePlan, num, scores, seqs, cur):
    """transformers' processor chain on (N, V) float32 scores given the sequences filled up to ``cur``."""
    n, v = xp.rows(scores), scores.shape[1]
    total = seqs.shape[1]
    filled = xp.arange(total) < cur                                           # (T,)
    if plan.repetition_penalty:
        present = xp.mark((n, v), seqs, xp.broadcast(filled[None, :], (n, total)))
        pen = num["penalty"]
        scores = xp.where(present, xp.where(scores < 0, scores * pen, scores / pen), scores)
    if plan.no_repeat_ngram_size:
        scores = xp.where(_banned_ngrams(xp, plan.no_repeat_ngram_size, seqs, cur, (n, v)), -np.inf, scores)
    if plan.bad_words:
        scores = xp.where(_banned_words(xp, plan.bad_words, seqs, cur, (n, v)), -np.inf, scores)
    if plan.min_length:
        # the eos columns by a scatter of the eos ids (a membership test of every vocabulary id cost ~0.1 ms a
        # step in eager torch); eos ids are checked to lie in the vocabulary (``make_plan``)
        eos_cols = xp.mark((1, v), xp.reshape(num["eos"], (1, -1)), xp.ones((1, plan.n_eos), "bool"))
        scores = xp.where(eos_cols & (cur - plan.prompt_length < num["min_new"]), -np.inf, scores)
    if plan.sample:
        scores = scores / num["temperature"]
        if plan.filters:     # top-k then top-p from one ascending sort, as torch.sort(descending=False)
            order = xp.argsort(scores)
            ordered = xp.take_along(scores, order, axis=1)
            kth = xp.read(ordered, v - num["top_k"], 1, axis=1)             # the k-th largest
            scores = xp.where(scores < kth, -np.inf, scores)
            ordered = xp.where(ordered < kth, -np.inf, ordered)
            cum = xp.cumsum(xp.softmax(ordered), axis=1)
            drop = (cum <= num["top_p_cut"]) & (xp.arange(v) < v - plan.min_keep)[None, :]
            scores = xp.where(xp.unsort(drop, order), -np.inf, scores)
    return scores


def _banned_ngrams(xp, size: int, seqs, cur, shape):
    """NoRepeatNGram: ban the token that would complete an n-gram already present in ``seqs[:cur]``."""
    total = seqs.shape[1]
    width = total - size + 1
    if width <= 0:
        return xp.zeros(shape, "bool")
    tail_start = xp.maximum(cur - size + 1, 0)
    match = (xp.arange(width) + size - 1 < cur)[None, :] & (cur + 1 >= size)     # whole n-gram before cur
    for i in range(size - 1):
        window = seqs[:, i:i + width]
        match = match & (window == xp.read(seqs, tail_start + i, 1, axis=1))
    completes = seqs[:, size - 1:size - 1 + width]
    return xp.mark(shape, completes, match)


def _banned_words(xp, words: tuple, seqs, cur, shape):
    """NoBadWords: ban a word's last token when the tokens before ``cur`` end with the rest of it."""
    n = xp.rows(seqs)
    banned = xp.zeros(shape, "bool")
    for word in words:
        head = len(word) - 1
        hit = xp.ones((n,), "bool")
        if head:
            tail = xp.read(seqs, xp.maximum(cur - head, 0), head, axis=1)
            hit = xp.all(tail == xp.asarray(np.asarray(word[:-1], np.int32))[None, :], axis=1) & (cur >= head)
        col = (xp.arange(shape[1]) == word[-1])[None, :]
        banned = banned | (col & hit[:, None])
    return banned


# -- one step ------------------------------------------------------------------------------------------
def _record_scores(xp, plan, state, scores):
    if not plan.output_scores:
        return state
    buf = state["scores"]
    if buf is None:
        buf = xp.zeros((xp.rows(scores), plan.max_new_tokens, scores.shape[1]), "float32")
    step = state["cur"] - plan.prompt_length
    return dict(state, scores=xp.write(buf, scores[:, None, :], step, axis=1))


def _open_slot(xp, state, n):
    key_mask = xp.write(state["key_mask"], xp.ones((n, 1), "int32"), state["cur"], axis=1)
    return dict(state, key_mask=key_mask, count=state["count"] + 1, cur=state["cur"] + 1)


def choose(xp, plan: DecodePlan, num, state, logits):
    """Pick the next tokens from the last position's ``logits`` (N, V).

    Returns ``(state, rows)``: ``rows`` (N,) says which row of the model's cache each row continues
    (beam search reorders; None otherwise).
    """
    logits = xp.cast(logits, "float32")
    if plan.beam:
        return _beam_choose(xp, plan, num, state, logits)
    return _token_choose(xp, plan, num, state, logits), None


def _token_choose(xp, plan, num, state, logits):
    """One greedy / sampling step (transformers ``_sample``)."""
    scores = process_scores(xp, plan, num, logits, state["seqs"], state["cur"])
    state = _record_scores(xp, plan, state, scores)
    if plan.sample:
        tokens, rng = xp.sample(state["rng"], scores, 1)
        tokens, state = tokens[:, 0], dict(state, rng=rng)
    else:
        tokens = xp.argmax(scores)
    tokens = xp.cast(tokens, "int32")
    if plan.n_eos:          # finished rows get pad, only when an eos criterion exists (as transformers)
        tokens = xp.where(state["unfinished"], tokens, num["pad"])
    n = xp.rows(tokens)
    state = dict(state, seqs=xp.write(state["seqs"], tokens[:, None], state["cur"], axis=1))
    state = _open_slot(xp, state, n)
    hit = xp.broadcast(state["cur"] >= num["limit"], (n,))
    if plan.n_eos:
        hit = _is_eos(xp, tokens, num["eos"]) | hit
    return dict(state, unfinished=state["unfinished"] & ~hit)


def _gather(xp, x, idx):
    """x (B, K, ...) gathered along axis 1 with idx (B, J) (the op broadcasts trailing axes)."""
    return xp.take_along(x, xp.reshape(idx, (xp.rows(idx), idx.shape[1]) + (1,) * (len(x.shape) - 2)), axis=1)


def _beam_choose(xp, plan, num, state, logits):
    """One step of transformers' vectorised beam search (``_beam_search`` and its helpers)."""
    b, k = xp.rows(state["running_scores"]), plan.num_beams
    n, v = xp.rows(logits), logits.shape[1]
    total, p, cur = plan.total, plan.prompt_length, state["cur"]
    keep = max(2, 1 + plan.n_eos) * k
    logp = process_scores(xp, plan, num, xp.log_softmax(logits), state["seqs"], cur)
    state = _record_scores(xp, plan, state, logp)
    flat = xp.reshape(xp.reshape(logp, (b, k, v)) + state["running_scores"][:, :, None], (b, k * v))
    if plan.sample:     # multinomial without replacement over the beam-summed scores
        idx, rng = xp.sample(state["rng"], flat, keep)
        top_lp, state = xp.take_along(flat, idx, axis=1), dict(state, rng=rng)
    else:
        top_lp, idx = xp.top_k(flat, keep)
    src, tokens = idx // v, xp.cast(idx % v, "int32")
    running = xp.reshape(state["seqs"], (b, k, total))
    top_seqs = xp.write(_gather(xp, running, src), tokens[:, :, None], cur, axis=2)
    hits = xp.broadcast(cur + 1 >= num["limit"], (b, keep))
    if plan.n_eos:
        hits = _is_eos(xp, tokens, num["eos"]) | hits

    # the best k continuations that go on
    alive = top_lp + xp.cast(hits, "float32") * NEG
    _, nxt = xp.top_k(alive, k)
    new_running = _gather(xp, top_seqs, nxt)
    running_scores = xp.take_along(alive, nxt, axis=1)
    origin = xp.take_along(src, nxt, axis=1)

    # merge the newly finished (only among the top k candidates) into the finished set
    did = hits & (xp.arange(keep) < k)[None, :]
    gen_len = cur + 1 - p
    cand = top_lp / xp.at(num["lp_table"], gen_len)
    if plan.early_stopping is True:
        cand = cand + xp.cast(xp.all(state["finished"], axis=1, keepdims=True), "float32") * NEG
    cand = cand + xp.cast(~state["improvable"], "float32") * NEG
    cand = cand + xp.cast(~did, "float32") * NEG
    merged = xp.concat([state["beam_scores"], cand], axis=1)
    _, top = xp.top_k(merged, k)
    done_seqs = _gather(xp, xp.concat([state["done_seqs"], top_seqs], axis=1), top)
    beam_scores = xp.take_along(merged, top, axis=1)
    finished = xp.take_along(xp.concat([state["finished"], did], axis=1), top, axis=1)
    lengths = xp.take_along(xp.concat([state["lengths"], xp.broadcast(xp.cast(gen_len, "int32"), (b, keep))],
                                      axis=1), top, axis=1)

    # the per-row decoder state follows the surviving beams
    rows = xp.reshape(xp.arange(b)[:, None] * k + xp.cast(origin, "int32"), (n,))
    state = dict(state, seqs=xp.reshape(new_running, (n, total)), key_mask=xp.take(state["key_mask"], rows),
                 count=xp.take(state["count"], rows))
    state = _open_slot(xp, state, n)

    # transformers' early-stop heuristic and loop condition
    best = running_scores[:, :1] / xp.at(num["heuristic_table"], cur + 1 - p)
    worst = xp.where(finished, xp.min(beam_scores, axis=1, keepdims=True), NEG)
    improvable = state["improvable"] & xp.any(best > worst, axis=1, keepdims=True)
    dead = ~state["live"]                      # padding rows of a bucketed batch take no part in the decision
    go = xp.any(improvable) & ~xp.all(hits | dead)
    if plan.early_stopping is True:
        go = go & ~xp.all(finished | dead)
    state = dict(state, running_scores=running_scores, beam_scores=beam_scores, finished=finished,
                 lengths=lengths, done_seqs=done_seqs, improvable=improvable, go=go)
    return state, rows


# -- an eager driver -----------------------------------------------------------------------------------
def run_eager(xp, plan: DecodePlan, num, ids, mask, step, context, reorder_cache):
    """The whole search as a plain Python loop, for engines that run step by step (torch, numpy).

    ``ids``/``mask`` are already expanded per beam/sample; ``step`` is the model's step function and
    ``reorder_cache(cache, rows)`` regroups its cache after a beam step. Returns ``(sequences trimmed to
    their length, sequences_scores or None, per-step scores or None)``.
    """
    state = init_state(xp, plan, ids, mask, None)
    logits, cache = step(ids, prefill_positions(xp, mask), state["key_mask"], None, 0, context)
    state, rows = choose(xp, plan, num, state, logits)
    while bool(going(xp, plan, state)):
        if rows is not None:
            cache = reorder_cache(cache, rows)
        tokens, positions, index = step_inputs(xp, state)
        logits, cache = step(tokens, positions, state["key_mask"], cache, index, context)
        state, rows = choose(xp, plan, num, state, logits)
    seqs, length, seq_scores, steps = finish(xp, plan, state)
    scores = tuple(state["scores"][:, i] for i in range(int(steps))) if plan.output_scores else None
    return seqs[:, : int(length)], seq_scores, scores


# -- the result ----------------------------------------------------------------------------------------
def finish(xp, plan: DecodePlan, state):
    """``(sequences (rows, T), length, sequences_scores or None, steps)``: the caller trims the
    sequences to ``length`` columns and the score buffer to ``steps`` steps."""
    steps = state["cur"] - plan.prompt_length
    if not plan.beam:
        return state["seqs"], state["cur"], None, steps
    b, r = xp.rows(state["done_seqs"]), plan.num_return_sequences
    seqs = xp.reshape(state["done_seqs"][:, :r], (b * r, plan.total))
    length = plan.prompt_length + xp.max(state["lengths"][:, :r])
    return seqs, length, xp.reshape(state["beam_scores"][:, :r], (b * r,)), steps
