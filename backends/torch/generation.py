"""A model-agnostic decoding engine (greedy, sampling, beam search) reproducing transformers 4.57.

Every ``generate`` of the torch backend (BLIP captioning and VQA, BLIP-2 with OPT or T5) resolves
its options once with ``blip_core.generation.resolve_generation`` and hands a *step function* to
``generate`` here. Greedy and beam ids are the ones transformers 4.57 produces for the same logits.

Interface::

    settings = resolve_generation(prompt_len, defaults={"eos_token_id": 102, "pad_token_id": 0}, **kwargs)
    n = expand_size(settings)                     # rows per input row (beams or returned samples)
    context = context.repeat_interleave(n, 0)     # the caller expands what its step_fn closes over
    ids = generate(step_fn, input_ids, settings, attention_mask=mask)

    def step_fn(input_ids, position_ids, attention_mask, cache):
        # input_ids (N, s): the whole prompt on the first call (cache is None), then the last token.
        # position_ids (N, s): cumsum(attention_mask) - 1 (padding -> 1), as transformers derives them.
        # attention_mask (N, past + s): 1 for real tokens, 0 for padding; grows by one 1 per step.
        # Return (logits of the last position (N, V), new cache). The cache is the model's own
        # object; cross-attention keys/values belong in it, computed on the first call only.
        ...

Beam search reorders the cache rows after each step with ``reorder_cache(cache, beam_idx)``
(default: ``cache.reorder(beam_idx)`` if the cache has that method, else ``index_select`` on dim 0
of every tensor in nested tuples/lists/dicts). ``beam_idx`` only permutes rows within one input
row's beam group, so per-input tensors that are equal across the group (image keys/values) may be
left as they are.

Returns int64 ids ``(B * num_return_sequences, prompt + generated)`` that include the prompt.
Greedy/sampling stop when every row has produced eos (later tokens of finished rows are
``pad_token_id``); beam search returns the best ``num_return_sequences`` hypotheses per row,
padded as transformers pads them. Sampling draws from ``generator``, or a fresh generator seeded
with ``settings.seed``, or torch's global generator (as transformers does).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from blip_core.generation import GenerationSettings

NEG = -1.0e9


def expand_size(settings: GenerationSettings) -> int:
    """How many rows each input row becomes: ``num_beams`` for beam search, else the returned samples."""
    return settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences


def infer_attention_mask(input_ids: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """transformers' default: mask out pad tokens when pad is in the prompt and is not an eos token."""
    pad, eos = settings.pad_token_id, settings.eos_token_id
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def default_reorder_cache(cache, beam_idx: torch.Tensor):
    if cache is None:
        return None
    if hasattr(cache, "reorder"):
        return cache.reorder(beam_idx)
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, beam_idx.to(cache.device))
    if isinstance(cache, dict):
        return {k: default_reorder_cache(v, beam_idx) for k, v in cache.items()}
    if isinstance(cache, (list, tuple)):
        return type(cache)(default_reorder_cache(v, beam_idx) for v in cache)
    return cache


# -- logits processing (transformers' processor order) -------------------------------------------
def process_scores(ids: torch.Tensor, scores: torch.Tensor, s: GenerationSettings, prompt_len: int,
                   min_keep: int = 1) -> torch.Tensor:
    """Repetition penalty, min-length eos ban, then (sampling) temperature, top-k, top-p."""
    if s.repetition_penalty != 1.0:
        picked = torch.gather(scores, 1, ids)
        picked = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
        scores = scores.scatter(1, ids, picked)
    if s.eos_token_id and ids.shape[1] - prompt_len < s.min_new_tokens:
        scores = scores.clone()
        scores[:, list(s.eos_token_id)] = -float("inf")
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k:
            k = min(max(s.top_k, min_keep), scores.shape[-1])
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= (1 - s.top_p)
            drop[..., -min_keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def _generator(settings: GenerationSettings, generator, device) -> Optional[torch.Generator]:
    if generator is not None:
        return generator
    if settings.seed is not None:
        return torch.Generator(device=device).manual_seed(int(settings.seed))
    return None


def generate(step_fn: Callable, input_ids: torch.Tensor, settings: GenerationSettings, *,
             attention_mask: Optional[torch.Tensor] = None, reorder_cache: Callable = default_reorder_cache,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Decode from ``input_ids`` (B, P) with ``step_fn`` (see the module docstring)."""
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = infer_attention_mask(input_ids, settings)
    attention_mask = attention_mask.long().to(input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"shape {tuple(input_ids.shape)}")
    n = expand_size(settings)
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
    gen = _generator(settings, generator, input_ids.device)
    with torch.no_grad():
        if settings.num_beams > 1:
            return _beam_search(step_fn, input_ids, attention_mask, settings, reorder_cache, gen)
        return _greedy_or_sample(step_fn, input_ids, attention_mask, settings, gen)


def _greedy_or_sample(step_fn, ids, mask, s: GenerationSettings, gen):
    n_rows, prompt_len = ids.shape
    max_len = prompt_len + s.max_new_tokens
    eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=ids.device) if s.eos_token_id else None
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else None)
    unfinished = torch.ones(n_rows, dtype=torch.long, device=ids.device)
    step_ids, cache = ids, None
    step_pos = position_ids_from_mask(mask)
    while True:
        logits, cache = step_fn(step_ids, step_pos, mask, cache)
        scores = process_scores(ids, logits.float(), s, prompt_len)
        if s.do_sample:
            nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=gen).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        if eos is not None:
            nxt = nxt * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, nxt[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=-1)
        done = torch.full_like(unfinished, ids.shape[1] >= max_len, dtype=torch.bool)
        if eos is not None:
            done = done | torch.isin(nxt, eos)
        unfinished = unfinished & ~done
        if unfinished.max() == 0:
            return ids
        step_ids = nxt[:, None]
        step_pos = position_ids_from_mask(mask)[:, -1:]


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select along dim 1 (beams) of a (B, K, ...) tensor with (B, K') indices."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _beam_search(step_fn, flat_ids, mask, s: GenerationSettings, reorder_cache, gen):
    """transformers 4.57's vectorised beam search (``GenerationMixin._beam_search``), step for step."""
    k = s.num_beams
    n_rows, prompt_len = flat_ids.shape
    b = n_rows // k
    dev = flat_ids.device
    max_len = prompt_len + s.max_new_tokens
    eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=dev) if s.eos_token_id else None
    keep = max(2, 1 + len(s.eos_token_id)) * k
    top_k_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(dev)
    # transformers pads with `pad or eos[0]` (a pad id of 0 counts as missing), or -1 without eos.
    fill = (s.pad_token_id or s.eos_token_id[0]) if s.eos_token_id else -1
    lp, early = s.length_penalty, s.early_stopping

    running = torch.full((b, k, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = flat_ids.view(b, k, prompt_len)
    finished_seqs = running.clone()
    running_scores = torch.zeros((b, k), dtype=torch.float, device=dev)
    running_scores[:, 1:] = NEG      # only the first beam's tokens count at the first step
    finished_scores = torch.full((b, k), NEG, dtype=torch.float, device=dev)
    is_finished = torch.zeros((b, k), dtype=torch.bool, device=dev)
    can_improve = torch.ones((b, 1), dtype=torch.bool, device=dev)
    running_bidx = torch.full((b, k, max_len - prompt_len), -1, dtype=torch.int32, device=dev)
    finished_bidx = running_bidx.clone()

    cur, cache = prompt_len, None
    step_ids, step_pos = flat_ids, position_ids_from_mask(mask)
    while True:
        flat_running = running[:, :, :cur].reshape(n_rows, cur)
        logits, cache = step_fn(step_ids, step_pos, mask, cache)
        vocab = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process_scores(flat_running, log_probs, s, prompt_len, min_keep=len(s.eos_token_id) + 1)
        log_probs = (log_probs.view(b, k, vocab) + running_scores[:, :, None]).reshape(b, k * vocab)

        # top-`keep` continuations over all beams (sampled without replacement when do_sample)
        if s.do_sample:
            top_idx = torch.multinomial(F.softmax(log_probs, dim=-1), num_samples=keep, generator=gen)
            top_lp = torch.gather(log_probs, 1, top_idx)
        else:
            top_lp, top_idx = torch.topk(log_probs, k=keep)
        src_beam = top_idx // vocab
        top_seqs = _gather(running, src_beam)
        top_bidx = _gather(running_bidx, src_beam)
        top_seqs[:, :, cur] = top_idx % vocab
        offset = torch.arange(b, device=dev).view(-1, 1) * k
        top_bidx[:, :, cur - prompt_len] = (src_beam + offset).to(top_bidx.dtype)

        # which continuations stop here (max length or eos)
        hits = torch.full((b, keep), cur + 1 >= max_len, dtype=torch.bool, device=dev)
        if eos is not None:
            hits = hits | torch.isin(top_seqs[:, :, cur], eos)

        # the best `k` continuations that go on
        alive_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(alive_lp, k=k)[1]
        running = _gather(top_seqs, nxt)
        running_scores = _gather(alive_lp, nxt)
        running_bidx = _gather(top_bidx, nxt)

        # merge the newly finished (only among the top k) into the finished set
        just_done = hits & top_k_mask[None, :]
        cand = top_lp / ((cur + 1 - prompt_len) ** lp)
        cand = cand + (torch.all(is_finished, dim=-1, keepdim=True) & (early is True)).float() * NEG
        cand = cand + (~can_improve).float() * NEG
        cand = cand + (~just_done) * NEG
        m_seqs = torch.cat([finished_seqs, top_seqs], dim=1)
        m_scores = torch.cat([finished_scores, cand], dim=1)
        m_bidx = torch.cat([finished_bidx, top_bidx], dim=1)
        m_done = torch.cat([is_finished, just_done], dim=1)
        best = torch.topk(m_scores, k=k)[1]
        finished_seqs, finished_scores = _gather(m_seqs, best), _gather(m_scores, best)
        finished_bidx, is_finished = _gather(m_bidx, best), _gather(m_done, best)

        beam_idx = running_bidx[..., cur - prompt_len].reshape(-1).long()
        cache = reorder_cache(cache, beam_idx)
        cur += 1

        # can a running beam still beat the worst finished one? (transformers' heuristic)
        if early == "never" and lp > 0.0:
            best_len = max_len - prompt_len
        else:
            best_len = cur - prompt_len
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_done = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        go_on = bool(torch.any(can_improve)) and not (bool(torch.all(is_finished)) and early is True) \
            and not bool(torch.all(hits))
        if not go_on:
            break
        mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=-1)
        step_ids = running[:, :, cur - 1].reshape(n_rows, 1)
        step_pos = position_ids_from_mask(mask)[:, -1:]

    nrs = s.num_return_sequences
    seqs = finished_seqs[:, :nrs].reshape(b * nrs, max_len)
    bidx = finished_bidx[:, :nrs].reshape(b * nrs, -1)
    gen_len = int((bidx != -1).sum(dim=1).max())
    return seqs[:, : prompt_len + gen_len]
