"""The torch decoding engine (backends/torch/generation.py) against transformers 4.57's ``generate``.

The step function wraps a tiny transformers OPT model, so both sides see the same logits and any
difference in ids comes from the search itself: greedy, beam search (length penalty, early
stopping modes, several returned sequences), sampling with a seed, repetition penalty, min length,
several eos ids, left-padded batched prompts.
"""
import numpy as np
import pytest
import torch

from backends.torch import generation
from blip_core import decoding
from blip_core.generation import resolve_generation

from fixture_utils import require
transformers = require("transformers")

EOS, PAD = 2, 1


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                                 max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS,
                                 word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():   # spread the logits so that the search has real choices to make
        for p in model.parameters():
            p.normal_(0.0, 0.5) if p.dim() > 1 else None
    return model


def _ours(model, ids, mask=None, **kw):
    settings = resolve_generation(ids.shape[1], defaults={"eos_token_id": EOS, "pad_token_id": PAD}, **kw)

    def step(step_ids, position_ids, key_mask, cache, index, context):
        out = model(input_ids=step_ids, attention_mask=key_mask[:, : index + step_ids.shape[1]],
                    position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def reorder(cache, idx):
        cache.reorder_cache(idx)
        return cache

    return generation.generate(step, ids, settings, vocab_size=model.config.vocab_size, attention_mask=mask,
                               reorder_cache=reorder)


def _ref(model, ids, mask=None, **kw):
    kw = {k: v for k, v in kw.items() if k != "seed"}
    return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          eos_token_id=kw.pop("eos_token_id", EOS), pad_token_id=PAD, **kw)


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (3, 5), generator=g)
    ids[:, 0] = EOS
    return ids


CASES = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, min_new_tokens=6, repetition_penalty=1.7),
    dict(max_new_tokens=9, eos_token_id=[EOS, 7, 11]),
    dict(max_new_tokens=10, num_beams=3),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=3, length_penalty=0.5),
    dict(max_new_tokens=8, num_beams=3, early_stopping=True, length_penalty=-1.0),
    dict(max_new_tokens=8, num_beams=2, early_stopping="never", length_penalty=2.0, repetition_penalty=1.3),
    dict(max_new_tokens=10, num_beams=3, min_new_tokens=5, eos_token_id=[EOS, 7]),
    dict(max_length=11, num_beams=2),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_search_ids_match_transformers(lm, kw):
    ids = _prompts()
    np.testing.assert_array_equal(_ours(lm, ids, **kw).numpy(), _ref(lm, ids, **kw).numpy())


def test_left_padded_batch_matches_transformers(lm):
    ids = _prompts()
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0          # left padding: positions come from the mask
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        np.testing.assert_array_equal(_ours(lm, ids, mask, **kw).numpy(), _ref(lm, ids, mask, **kw).numpy())


def test_inferred_mask_from_pad_tokens(lm):
    ids = _prompts()
    ids[1, :2] = PAD
    mask = torch.from_numpy(decoding.infer_prompt_mask(ids.numpy(), resolve_generation(5, eos_token_id=EOS,
                                                                                         pad_token_id=PAD)))
    assert mask[1, :2].tolist() == [0, 0] and int(mask.sum()) == ids.numel() - 2
    # transformers is given no mask either: it infers its own from the pad tokens
    theirs = lm.generate(input_ids=ids, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6)
    np.testing.assert_array_equal(_ours(lm, ids, max_new_tokens=6).numpy(), theirs.numpy())
    # and the inferred mask decides: with every token attended, transformers answers otherwise
    assert not np.array_equal(theirs.numpy(), _ref(lm, ids, torch.ones_like(ids), max_new_tokens=6).numpy())


SAMPLING = [dict(temperature=0.7, top_k=10), dict(top_p=0.8), dict(num_return_sequences=3, top_k=0),
            dict(num_beams=3, top_k=8, temperature=1.3)]


@pytest.mark.parametrize("kw", SAMPLING, ids=str)
def test_sampling_seeded_reproducible_and_matches_transformers_rng(lm, kw):
    ids = _prompts()
    a = _ours(lm, ids, do_sample=True, seed=123, max_new_tokens=10, **kw)
    b = _ours(lm, ids, do_sample=True, seed=123, max_new_tokens=10, **kw)
    c = _ours(lm, ids, do_sample=True, seed=7, max_new_tokens=10, **kw)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.shape[0] == ids.shape[0] * kw.get("num_return_sequences", 1)
    assert not (a.shape == c.shape and torch.equal(a, c))
    # transformers draws from the global generator; seeded the same way, the same tokens come out.
    torch.manual_seed(123)
    np.testing.assert_array_equal(a.numpy(), _ref(lm, ids, do_sample=True, max_new_tokens=10, **kw).numpy())


def test_explicit_generator(lm):
    ids = _prompts()
    settings = resolve_generation(5, eos_token_id=EOS, pad_token_id=PAD, do_sample=True, max_new_tokens=6)
    step_calls = []

    def step(step_ids, position_ids, key_mask, cache, index, context):
        step_calls.append(step_ids.shape[1])
        out = lm(input_ids=step_ids, attention_mask=key_mask[:, : index + step_ids.shape[1]],
                 position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    v = lm.config.vocab_size
    b = generation.generate(step, ids, settings, vocab_size=v, generator=torch.Generator().manual_seed(5))
    step_calls.clear()
    a = generation.generate(step, ids, settings, vocab_size=v, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # the prompt goes in once, then one token per step (the cache carries the rest)
    assert step_calls[0] == 5 and set(step_calls[1:]) == {1}


def test_finished_rows_are_padded_and_eos_stops_early():
    # A step function with fixed logits: row 0 says eos at once, row 1 never does.
    vocab = 6

    def step(ids, pos, mask, cache, index, context):
        logits = torch.full((ids.shape[0], vocab), -5.0)
        logits[0, EOS] = 5.0
        logits[1, 4] = 5.0
        return logits, None

    ids = torch.tensor([[0], [0]])
    out = generation.generate(step, ids, resolve_generation(1, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=4),
                              vocab_size=vocab)
    assert out.tolist() == [[0, EOS, PAD, PAD, PAD], [0, 4, 4, 4, 4]]
    out = generation.generate(step, ids, resolve_generation(1, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=4,
                                                            min_new_tokens=2), vocab_size=vocab)
    assert out[0].tolist() == [0, 0, 0, EOS, PAD]      # eos banned for the first two new tokens


def test_expand_size_and_bad_mask():
    assert decoding.make_plan(resolve_generation(1, num_beams=4, num_return_sequences=2), 10)[0].expand == 4
    assert decoding.make_plan(resolve_generation(1, do_sample=True, num_return_sequences=3), 10)[0].expand == 3
    with pytest.raises(ValueError, match="attention_mask shape"):
        generation.generate(lambda *a: None, torch.zeros(2, 3, dtype=torch.long), resolve_generation(3), vocab_size=10,
                            attention_mask=torch.ones(2, 4))


BEAM_SCORES = [dict(max_new_tokens=7, num_beams=3),
               dict(max_new_tokens=7, num_beams=4, num_return_sequences=2, length_penalty=0.5)]


@pytest.mark.parametrize("kw", BEAM_SCORES, ids=str)
def test_beam_dict_output_holds_transformers_scores(lm, kw):
    """``return_dict_in_generate`` under beam search: the sequences, each step's processed scores and the
    final beam scores (``sequences_scores``, one per returned sequence) are transformers'."""
    ids = _prompts()
    kw = dict(kw, return_dict_in_generate=True, output_scores=True)
    got, ref = _ours(lm, ids, **kw), _ref(lm, ids, **kw)
    np.testing.assert_array_equal(got.sequences.numpy(), ref.sequences.numpy())
    assert got.sequences_scores is not None and got.sequences_scores.shape == ref.sequences_scores.shape
    np.testing.assert_allclose(got.sequences_scores.numpy(), ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
    assert len(got.scores) == len(ref.scores)
    for mine, theirs in zip(got.scores, ref.scores):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(mine), finite)
        np.testing.assert_allclose(mine[finite].numpy(), theirs[finite].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=6, num_beams=3),
                                dict(max_new_tokens=6, do_sample=True, seed=3, num_return_sequences=2)], ids=str)
def test_without_a_mask_the_pad_tokens_are_masked(lm, kw):
    """No ``attention_mask``: the prompt's pad tokens (pad != eos) are left out, as transformers infers
    its own mask; the ids equal a call given that mask explicitly and transformers' unmasked call."""
    ids = _prompts()
    ids[0, :2] = PAD
    ids[2, :1] = PAD
    mask = (ids != PAD).long()
    got = _ours(lm, ids, **kw)
    np.testing.assert_array_equal(got.numpy(), _ours(lm, ids, mask, **kw).numpy())
    if kw.get("do_sample"):
        torch.manual_seed(kw["seed"])
    theirs = lm.generate(input_ids=ids, eos_token_id=EOS, pad_token_id=PAD,
                         **{k: v for k, v in kw.items() if k != "seed"})
    np.testing.assert_array_equal(got.numpy(), theirs.numpy())
