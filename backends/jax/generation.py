"""Compiled decoding for the BLIP text decoder: greedy, sampling, beam search and beam sampling.

The whole loop is one XLA program: a prefill over the prompt, then ``lax.while_loop`` steps of one token,
with a fixed-size self-attention cache (B*, L_max, H, hd) per layer written in place and cross-attention
keys/values computed once before the loop. The token rules reproduce transformers 4.57 step for step
(``_sample`` and the vectorised ``_beam_search``): processor order repetition penalty -> min length ->
temperature -> top-k -> top-p, beam scores on log-softmax, ``beams_to_keep = max(2, 1 + n_eos) * num_beams``
candidates, the -1e9 bookkeeping, the early-stopping heuristic, positions from the cumulative attention mask
and the output trimmed to the longest returned sequence.

Only the structure is static (``DecodeSpec``: mode, beams, lengths, which processors run); numeric settings
(temperature, top_k, top_p, penalties, min length, eos ids, length penalty) are traced, so changing them
does not recompile. Sampling takes an explicit PRNG key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .text import MASK_VALUE, cross_attention_bias

NEG = -1.0e9


@dataclass(frozen=True)
class DecodeSpec:
    """The static (shape- and control-flow-deciding) part of the generation settings."""

    mode: str                 # greedy | sample | beam | beam_sample
    num_beams: int
    num_return_sequences: int
    max_new_tokens: int
    n_eos: int
    repetition_penalty: bool  # the processor runs at all
    filters: bool             # sampling with top-k and/or top-p (their values are traced)
    early_stopping: Any       # True | False | "never"
    fill_value: int           # beam output filler (transformers: ``pad or eos[0]``)
    min_keep: int             # min_tokens_to_keep of the top-k / top-p warpers

    @property
    def beam(self) -> bool:
        return self.mode.startswith("beam")

    @property
    def sample(self) -> bool:
        return self.mode in ("sample", "beam_sample")


def make_spec(settings, vocab_size: int):
    """Split ``GenerationSettings`` into ``(DecodeSpec, dyn)``; ``dyn`` holds the traced values."""
    s = settings
    if s.num_beams > 1 and s.num_return_sequences > s.num_beams:
        raise ValueError(f"num_return_sequences ({s.num_return_sequences}) must be <= num_beams ({s.num_beams})")
    eos = tuple(s.eos_token_id)
    pad = s.pad_token_id if s.pad_token_id is not None else (eos[0] if eos else 0)
    for name, t in [("eos_token_id", e) for e in eos] + [("pad_token_id", pad)]:
        if not 0 <= t < vocab_size:
            raise ValueError(f"{name} {t} is outside the vocabulary of size {vocab_size}")
    fill = (s.pad_token_id or eos[0]) if eos else -1
    min_keep = (len(eos) + 1 if eos else 2) if s.num_beams > 1 else 1
    top_k = min(max(s.top_k, min_keep), vocab_size) if s.top_k else vocab_size     # vocab_size: no-op
    spec = DecodeSpec(mode=s.mode, num_beams=s.num_beams, num_return_sequences=s.num_return_sequences,
                      max_new_tokens=s.max_new_tokens, n_eos=len(eos),
                      repetition_penalty=s.repetition_penalty != 1.0,
                      filters=bool(s.do_sample and (s.top_k or s.top_p < 1.0)),
                      early_stopping=s.early_stopping if s.num_beams > 1 else False, fill_value=int(fill),
                      min_keep=min_keep)
    # (n ** length_penalty) in double precision, as Python computes it, then float32 as torch divides
    n = np.arange(s.max_new_tokens + 1, dtype=np.float64)
    n[0] = 1.0
    lp_table = (n ** s.length_penalty).astype(np.float32)
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        heuristic = np.full_like(lp_table, lp_table[s.max_new_tokens])
    else:
        heuristic = lp_table
    dyn = dict(
        eos=jnp.asarray(np.array(eos if eos else [-1], np.int32)), pad=jnp.int32(pad),
        temperature=jnp.float32(s.temperature), top_k=jnp.int32(top_k), top_p_cut=jnp.float32(1.0 - s.top_p),
        penalty=jnp.float32(s.repetition_penalty), min_new=jnp.int32(s.min_new_tokens),
        lp_table=jnp.asarray(lp_table), heuristic_table=jnp.asarray(heuristic),
    )
    return spec, dyn


# -- logits processors -----------------------------------------------------------------------------------
def _is_eos(tokens, eos):
    return jnp.any(tokens[..., None] == eos, axis=-1)


def process_scores(scores, seqs, cur, prompt_len, spec: DecodeSpec, dyn):
    """transformers' processor chain on (N, V) float32 scores given the (N, L) sequences filled up to ``cur``."""
    n, v = scores.shape
    if spec.repetition_penalty:
        valid = jnp.arange(seqs.shape[1]) < cur
        cols = jnp.where(valid[None, :], seqs, v)                  # unfilled slots go to a dummy column
        present = jnp.zeros((n, v + 1), bool).at[jnp.arange(n)[:, None], cols].set(True)[:, :v]
        pen = dyn["penalty"]
        scores = jnp.where(present, jnp.where(scores < 0, scores * pen, scores / pen), scores)
    if spec.n_eos:
        eos_cols = _is_eos(jnp.arange(v), dyn["eos"])
        scores = jnp.where(eos_cols[None, :] & (cur - prompt_len < dyn["min_new"]), -jnp.inf, scores)
    if spec.sample:
        scores = scores / dyn["temperature"]
        if spec.filters:   # top-k then top-p, both from one ascending sort (torch.sort(descending=False))
            order = jnp.argsort(scores, axis=-1)
            ordered = jnp.take_along_axis(scores, order, axis=-1)
            kth = jax.lax.dynamic_slice_in_dim(ordered, v - dyn["top_k"], 1, axis=1)   # k-th largest
            scores = jnp.where(scores < kth, -jnp.inf, scores)
            ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
            cum = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
            drop = (cum <= dyn["top_p_cut"]) & (jnp.arange(v) < v - spec.min_keep)
            drop = jnp.zeros_like(drop).at[jnp.arange(n)[:, None], order].set(drop)
            scores = jnp.where(drop, -jnp.inf, scores)
    return scores


# -- the loop --------------------------------------------------------------------------------------------
def _step_bias(key_mask, t, dtype):
    """Additive bias (N, 1, 1, L) for a query at index ``t``: keys j <= t that the mask allows."""
    allowed = (jnp.arange(key_mask.shape[1]) <= t)[None, :] & (key_mask > 0)
    return ((1.0 - allowed.astype(dtype)) * MASK_VALUE)[:, None, None, :]


def decode(decoder, cross_kv, cross_mask, prompt_ids, prompt_mask, key, spec: DecodeSpec, dyn, cache_dims, dtype):
    """Generate ids; returns ``(sequences (rows, L_max) int32, output_length scalar)``.

    ``decoder(ids, positions, self_bias, cross_kv, cross_bias, cache, index) -> (logits, cache)`` runs the
    text decoder on a chunk; ``cache_dims = (num_layers, heads, head_dim)``.
    """
    b, p = prompt_ids.shape
    expand = spec.num_beams if spec.beam else (spec.num_return_sequences if spec.sample else 1)
    n, total = b * expand, p + spec.max_new_tokens
    rep = (lambda x: jnp.repeat(x, expand, axis=0)) if expand > 1 else (lambda x: x)
    ids, pmask = rep(prompt_ids), rep(prompt_mask)
    cross_kv = jax.tree_util.tree_map(rep, cross_kv)
    cross_bias = cross_attention_bias(rep(cross_mask), dtype)

    fill = spec.fill_value if spec.beam else 0
    seqs = jnp.full((n, total), fill, jnp.int32).at[:, :p].set(ids)
    key_mask = jnp.zeros((n, total), jnp.int32).at[:, :p].set(pmask)
    positions = jnp.where(pmask == 0, 1, jnp.cumsum(pmask, axis=-1) - 1)
    layers, heads, hd = cache_dims
    cache = tuple((jnp.zeros((n, total, heads, hd), dtype), jnp.zeros((n, total, heads, hd), dtype))
                  for _ in range(layers))
    causal = jnp.arange(total)[None, :] <= jnp.arange(p)[:, None]                       # (P, L)
    allowed = causal[None] & (key_mask > 0)[:, None, :]
    prefill_bias = ((1.0 - allowed.astype(dtype)) * MASK_VALUE)[:, None]
    logits, cache = decoder(ids, positions, prefill_bias, cross_kv, cross_bias, cache, 0)
    state = dict(seqs=seqs, key_mask=key_mask, count=jnp.sum(pmask, axis=-1), cache=cache, cur=jnp.int32(p), key=key)

    def forward(st):
        t = st["cur"] - 1
        last = jax.lax.dynamic_slice_in_dim(st["seqs"], t, 1, axis=1)
        pos = (st["count"] - 1)[:, None]
        out, c = decoder(last, pos, _step_bias(st["key_mask"], t, dtype), cross_kv, cross_bias, st["cache"], t)
        return out[:, -1].astype(jnp.float32), c

    choose = _beam_choose if spec.beam else _token_choose
    if spec.beam:
        nb = spec.num_beams
        state.update(running_scores=jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(NEG),
                     beam_scores=jnp.full((b, nb), NEG, jnp.float32), finished=jnp.zeros((b, nb), bool),
                     lengths=jnp.zeros((b, nb), jnp.int32), done_seqs=seqs.reshape(b, nb, total),
                     early_unsat=jnp.ones((b, 1), bool), go=jnp.array(True))
    else:
        state.update(unfinished=jnp.ones((n,), bool))
    state = choose(state, logits[:, -1].astype(jnp.float32), p, spec, dyn)

    def body(st):
        logits, c = forward(st)
        return choose(dict(st, cache=c), logits, p, spec, dyn)

    cond = (lambda st: st["go"]) if spec.beam else (lambda st: jnp.any(st["unfinished"]))
    state = jax.lax.while_loop(cond, body, state)
    if not spec.beam:
        return state["seqs"], state["cur"]
    r = spec.num_return_sequences
    out = state["done_seqs"][:, :r].reshape(b * r, total)
    return out, p + jnp.max(state["lengths"][:, :r])


def _append(st, tokens):
    """Write ``tokens`` (N,) at ``cur`` and open that key slot."""
    n = tokens.shape[0]
    cur = st["cur"]
    seqs = jax.lax.dynamic_update_slice_in_dim(st["seqs"], tokens[:, None].astype(jnp.int32), cur, axis=1)
    key_mask = jax.lax.dynamic_update_slice_in_dim(st["key_mask"], jnp.ones((n, 1), jnp.int32), cur, axis=1)
    return dict(st, seqs=seqs, key_mask=key_mask, count=st["count"] + 1, cur=cur + 1)


def _token_choose(st, logits, p, spec, dyn):
    """One greedy / sampling step (transformers ``_sample``)."""
    scores = process_scores(logits, st["seqs"], st["cur"], p, spec, dyn)
    key = st["key"]
    if spec.sample:
        key, sub = jax.random.split(key)
        tokens = jax.random.categorical(sub, scores, axis=-1)
    else:
        tokens = jnp.argmax(scores, axis=-1)
    if spec.n_eos:    # finished rows receive pad (only when an eos criterion exists, as transformers does)
        tokens = jnp.where(st["unfinished"], tokens, dyn["pad"])
    st = _append(dict(st, key=key), tokens)
    hit = (_is_eos(tokens, dyn["eos"]) if spec.n_eos else False) | (st["cur"] >= st["seqs"].shape[1])
    return dict(st, unfinished=st["unfinished"] & ~hit)


def _gather(x, idx):
    """x: (B, K, ...) gathered along axis 1 with idx (B, J)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _beam_choose(st, logits, p, spec, dyn):
    """One step of transformers' vectorised beam search (``_beam_search`` and its helpers)."""
    b, nb = st["running_scores"].shape
    n, v = logits.shape
    total = st["seqs"].shape[1]
    cur = st["cur"]
    k = max(2, 1 + spec.n_eos) * nb
    logp = process_scores(jax.nn.log_softmax(logits, axis=-1), st["seqs"], cur, p, spec, dyn)
    flat = (logp.reshape(b, nb, v) + st["running_scores"][:, :, None]).reshape(b, nb * v)
    key = st["key"]
    if spec.sample:   # multinomial without replacement == Gumbel top-k
        key, sub = jax.random.split(key)
        _, idx = jax.lax.top_k(flat + jax.random.gumbel(sub, flat.shape, jnp.float32), k)
        top_lp = jnp.take_along_axis(flat, idx, axis=1)
    else:
        top_lp, idx = jax.lax.top_k(flat, k)
    src, tokens = idx // v, idx % v
    running = st["seqs"].reshape(b, nb, total)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(_gather(running, src), tokens[:, :, None].astype(jnp.int32),
                                                   cur, axis=2)
    hits = (_is_eos(tokens, dyn["eos"]) if spec.n_eos else jnp.zeros_like(tokens, bool)) | (cur + 1 >= total)

    # beams that keep running
    masked = top_lp + hits.astype(jnp.float32) * NEG
    _, nxt = jax.lax.top_k(masked, nb)
    new_running = _gather(top_seqs, nxt)
    running_scores = _gather(masked, nxt)
    origin = _gather(src, nxt)

    # finished hypotheses: only the top num_beams candidates may finish
    did = hits & (jnp.arange(k) < nb)[None, :]
    gen_len = cur + 1 - p
    cand = top_lp / dyn["lp_table"][gen_len]
    if spec.early_stopping is True:
        cand = cand + jnp.all(st["finished"], axis=-1, keepdims=True).astype(jnp.float32) * NEG
    cand = cand + (~st["early_unsat"]).astype(jnp.float32) * NEG
    cand = cand + (~did).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([st["beam_scores"], cand], axis=1)
    _, top = jax.lax.top_k(merged_scores, nb)
    done_seqs = _gather(jnp.concatenate([st["done_seqs"], top_seqs], axis=1), top)
    beam_scores = _gather(merged_scores, top)
    finished = _gather(jnp.concatenate([st["finished"], did], axis=1), top)
    lengths = _gather(jnp.concatenate([st["lengths"], jnp.full((b, k), gen_len, jnp.int32)], axis=1), top)

    # reorder the per-row decoder state to follow the surviving beams
    rows = (jnp.arange(b)[:, None] * nb + origin).reshape(n)
    cache = jax.tree_util.tree_map(lambda c: c[rows], st["cache"])
    st = dict(st, seqs=new_running.reshape(n, total), key_mask=st["key_mask"][rows], count=st["count"][rows],
              cache=cache, key=key)
    st = _append_slot(st)

    # transformers' early-stop heuristic and loop condition
    best = running_scores[:, :1] / dyn["heuristic_table"][cur + 1 - p]
    worst = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), NEG)
    early_unsat = st["early_unsat"] & jnp.any(best > worst, axis=-1, keepdims=True)
    go = jnp.any(early_unsat) & ~jnp.all(hits)
    if spec.early_stopping is True:
        go = go & ~jnp.all(finished)
    return dict(st, running_scores=running_scores, beam_scores=beam_scores, finished=finished, lengths=lengths,
                done_seqs=done_seqs, early_unsat=early_unsat, go=go)


def _append_slot(st):
    """The beam tokens are already written; open the key slot at ``cur`` and advance."""
    n = st["key_mask"].shape[0]
    key_mask = jax.lax.dynamic_update_slice_in_dim(st["key_mask"], jnp.ones((n, 1), jnp.int32), st["cur"], axis=1)
    return dict(st, key_mask=key_mask, count=st["count"] + 1, cur=st["cur"] + 1)
