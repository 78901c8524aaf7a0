"""The torch backend's OPT and T5 language models against transformers 4.57 (the reference).

Tiny random models are built by transformers, their state dicts loaded into ours unchanged (the
attribute names are the Hugging Face keys), and logits, hidden states and losses compared at
float32 tolerance. KV-cached decoding must reproduce the full forward pass.
"""
import pytest
import torch
import transformers

from backends.torch.opt import OPTForCausalLM
from backends.torch.t5 import T5ForConditionalGeneration, relative_position_bucket
from blip_core.configs import config_from_dict
from blip_core.numerics import max_abs_diff, tolerance
from hf_configs import randomize as _randomize

ATOL = tolerance("default", "float32")[0]


def _pair(hf_cls, ours_cls, hf_config, seed=0):
    hf = _randomize(hf_cls(hf_config), seed)
    ours = ours_cls(config_from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _left_padded(batch, length, vocab, seed, pads=(0, 2)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 1
    return ids, mask


OPT_BASE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                max_position_embeddings=40)
OPT_VARIANTS = {
    "pre_ln": {},
    "projected_embeddings": dict(word_embed_proj_dim=16),
    "post_ln": dict(do_layer_norm_before=False),
    "no_bias_gelu": dict(enable_bias=False, activation_function="gelu"),
}


@pytest.mark.parametrize("variant", sorted(OPT_VARIANTS))
def test_opt_matches_transformers(variant):
    cfg = transformers.OPTConfig(**OPT_BASE, **OPT_VARIANTS[variant])
    hf, ours = _pair(transformers.OPTForCausalLM, OPTForCausalLM, cfg)
    ids, mask = _left_padded(2, 9, 99, seed=1)
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    real = mask.bool()
    assert max_abs_diff(out.logits[real], ref.logits[real]) <= ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert max_abs_diff(a[real], b[real]) <= ATOL
    # padding on the left does not move the real tokens: row 1 equals its unpadded self
    with torch.no_grad():
        alone = ours(input_ids=ids[1:, 2:]).logits
    assert max_abs_diff(alone[0], out.logits[1, 2:]) <= ATOL


def test_opt_tied_head_shares_storage():
    cfg = config_from_dict(transformers.OPTConfig(**OPT_BASE).to_dict())
    lm = OPTForCausalLM(cfg)
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight


def test_opt_kv_cache_reproduces_full_forward():
    cfg = transformers.OPTConfig(**OPT_BASE)
    _, ours = _pair(transformers.OPTForCausalLM, OPTForCausalLM, cfg, seed=3)
    ids, mask = _left_padded(2, 10, 99, seed=4)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(6, 10):
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert max_abs_diff(torch.stack(steps, 1), full[:, 5:]) <= ATOL


def test_opt_rejects_sequences_longer_than_its_positions():
    cfg = config_from_dict(transformers.OPTConfig(**dict(OPT_BASE, max_position_embeddings=8)).to_dict())
    with pytest.raises(ValueError, match="positions"):
        OPTForCausalLM(cfg)(input_ids=torch.ones(1, 9, dtype=torch.long))


T5_BASE = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0)
T5_VARIANTS = {
    "flan_gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "gelu_untied": dict(feed_forward_proj="gelu", tie_word_embeddings=False),
    "gated_silu_tied": dict(feed_forward_proj="gated-silu", tie_word_embeddings=True),
    # BLIP-2 Flan-T5 hub configs: "gated-gelu" with an explicit exact "gelu" that overrides gelu_new
    "flan_hub_exact_gelu": dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(T5_VARIANTS))
def test_t5_matches_transformers(variant):
    cfg = transformers.T5Config(**T5_BASE, **T5_VARIANTS[variant])
    hf, ours = _pair(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, cfg)
    # 20 encoder tokens: distances beyond max_distance hit the log-spaced and the last buckets
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 99, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = torch.randint(2, 99, (2, 15), generator=gen)
    labels[0, 12:] = -100
    dec_mask = torch.ones_like(labels)
    dec_mask[0, 12:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
                 output_hidden_states=True)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
                   output_hidden_states=True)
    real = mask.bool()
    assert max_abs_diff(out.encoder_last_hidden_state[real], ref.encoder_last_hidden_state[real]) <= ATOL
    assert max_abs_diff(out.logits, ref.logits) <= ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    for a, b in zip(out.decoder_hidden_states, ref.decoder_hidden_states, strict=True):
        assert max_abs_diff(a, b) <= ATOL


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_t5_encoder_outputs_follow_their_own_flag(flag):
    """Each output flag reaches the encoder as well as the decoder, alone: only output_hidden_states gives the
    encoder's hidden states and no maps, only output_attentions its maps and no states, as transformers."""
    cfg = transformers.T5Config(**T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf, ours = _pair(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, cfg, seed=9)
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(2, 99, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.randint(2, 99, (2, 4), generator=gen)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **{flag: True})
        out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **{flag: True})
    if flag == "output_hidden_states":
        asked, absent = ("encoder_hidden_states", "decoder_hidden_states"), ("encoder_attentions", "decoder_attentions")
    else:
        asked, absent = ("encoder_attentions", "decoder_attentions", "cross_attentions"), ("encoder_hidden_states",)
    for name in absent:
        assert getattr(ref, name) is None and getattr(out, name) is None, name
    real = mask.bool()
    for name in asked:
        theirs, mine = getattr(ref, name), getattr(out, name)
        assert mine is not None and len(mine) == len(theirs) > 0, name
        for a, b in zip(mine, theirs):
            assert a.shape == b.shape, name
            if name == "encoder_hidden_states":
                a, b = a[real], b[real]
            assert max_abs_diff(a, b) <= ATOL, name


@pytest.mark.parametrize("variant", ["flan_gated_gelu_untied", "relu_tied"])
def test_t5_labels_score_given_decoder_inputs_embeds(variant):
    """Labels with decoder_inputs_embeds score those embeddings (no decoder ids are built from the labels then):
    logits and loss as transformers."""
    cfg = transformers.T5Config(**T5_BASE, **T5_VARIANTS[variant])
    hf, ours = _pair(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, cfg, seed=11)
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(2, 99, (2, 8), generator=gen)
    labels = torch.randint(2, 99, (2, 5), generator=gen)
    labels[1, 3:] = -100
    dec_embeds = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_inputs_embeds=dec_embeds, labels=labels)
        out = ours(input_ids=ids, decoder_inputs_embeds=dec_embeds, labels=labels)
        shifted = hf(input_ids=ids, labels=labels)
    assert max_abs_diff(out.logits, ref.logits) <= ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    assert max_abs_diff(shifted.logits, ref.logits) > 1e-3      # the embeddings are not the labels' shift


def test_t5_tie_rules():
    def build(tie):
        cfg = transformers.T5Config(**T5_BASE, tie_word_embeddings=tie)
        return T5ForConditionalGeneration(config_from_dict(cfg.to_dict()))
    tied, untied = build(True), build(False)
    assert tied.lm_head.weight is tied.shared.weight
    assert untied.lm_head.weight is not untied.shared.weight
    for m in (tied, untied):
        assert m.encoder.embed_tokens is m.shared and m.decoder.embed_tokens is m.shared


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-300, 300)[None, :]
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 12)):
            ref = bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
            assert torch.equal(relative_position_bucket(rel, bidirectional, nb, md), ref)


def test_t5_decoder_cache_reproduces_full_forward():
    cfg = transformers.T5Config(**T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    _, ours = _pair(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, cfg, seed=7)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(2, 99, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    dec = torch.randint(2, 99, (3, 14), generator=gen)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        enc = ours.encode(input_ids=ids, attention_mask=mask)
        out = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :1], use_cache=True)
        steps, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(1, 14):
            out = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1],
                       past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert max_abs_diff(torch.stack(steps, 1), full) <= ATOL
    # beam bookkeeping: reordering the cache reorders the next step's logits the same way
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        moved = ours(encoder_outputs=type(enc)(last_hidden_state=enc.last_hidden_state[order]),
                     attention_mask=mask[order], decoder_input_ids=dec[order, -1:],
                     past_key_values=ours.reorder_cache(cache, order), use_cache=True).logits
        base = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, -1:],
                    past_key_values=cache, use_cache=True).logits
    assert max_abs_diff(moved, base[order]) <= ATOL


def test_t5_needs_decoder_start_for_labels():
    cfg = config_from_dict(transformers.T5Config(**dict(T5_BASE, decoder_start_token_id=None)).to_dict())
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        T5ForConditionalGeneration(cfg)(input_ids=torch.ones(1, 3, dtype=torch.long),
                                        labels=torch.ones(1, 2, dtype=torch.long))
