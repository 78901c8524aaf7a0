"""The torch backend's BLIP-2 classes against transformers 4.57 (the reference).

Each tiny random model is built and saved by transformers (``save_pretrained``), loaded by our
``from_pretrained``, and compared on the same inputs: float32 outputs within the tolerance table,
greedy and beam-search ids identical. Configs vary the vision tower, the Q-Former
(``cross_attention_frequency``, ``num_query_tokens``, activation), the language model (OPT, T5 tied and
untied, gelu / gelu_new) and the image fusion (placeholders or the older concatenation).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from backends.torch import blip2 as ours
from blip_core.numerics import max_abs_diff, tolerance
from hf_configs import OPT_TEXT, T5_TEXT, blip2_config
from hf_configs import randomize as _randomize  # std 0.5: gelu and gelu_new differ by > 1e-4

ATOL = tolerance("default", "float32")[0]
IMG = 90          # image placeholder id used by the placeholder-path configs
Q = 4             # num_query_tokens of the default configs

T5_TIED_RELU = dict(T5_TEXT, feed_forward_proj="relu", tie_word_embeddings=True, relative_attention_num_buckets=8,
                    relative_attention_max_distance=10)
T5_GELU = dict(T5_TEXT, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
               relative_attention_max_distance=10)
WIDE = dict(vision=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=6, hidden_act="gelu_new"),
            qformer=dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=2, cross_attention_frequency=1,
                         hidden_act="gelu_new"),
            num_query_tokens=3)
TEXT_INPUT = dict(qformer=dict(use_qformer_text_input=True))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair(cls_name, **config) -> (transformers model, our model loaded from its save, directory)``."""
    cache = {}

    def make(cls_name, seed=0, std=0.5, **cfg):
        key = (cls_name, seed, std, json.dumps(cfg, sort_keys=True))
        if key not in cache:
            hf_cfg = blip2_config(**cfg)
            if cls_name == "Blip2VisionModel":
                hf_cfg = hf_cfg.vision_config
            elif cls_name == "Blip2QFormerModel":
                hf_cfg = hf_cfg.qformer_config
            hf = _randomize(getattr(transformers, cls_name)(hf_cfg), seed, std)
            path = str(tmp_path_factory.mktemp(cls_name))
            hf.save_pretrained(path)
            cache[key] = (hf, getattr(ours, cls_name).from_pretrained(path), path)
        return cache[key]
    return make


def _pixels(batch=2, size=(32, 32), seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)


def _prompt(lengths, total, vocab=80, seed=0, q=Q, placeholders=True):
    """Blip2Processor's layout: [Q placeholders][left padding][bos=2 prompt]; ids and mask as numpy."""
    rng = np.random.default_rng(seed)
    ids = np.ones((len(lengths), total), dtype=np.int64)          # OPT pad id 1
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab, n)
        ids[row, total - n] = 2
        mask[row, total - n:] = 1
    if placeholders:
        ids = np.concatenate([np.full((len(lengths), q), IMG), ids], 1)
        mask = np.concatenate([np.ones((len(lengths), q), dtype=np.int64), mask], 1)
    return ids, mask


def _close(a, b, where=None):
    a, b = torch.as_tensor(np.asarray(a.detach() if torch.is_tensor(a) else a)), torch.as_tensor(b.detach())
    if where is not None:
        a, b = a[where], b[where]
    d = max_abs_diff(a, b)
    assert d <= ATOL, f"max abs diff {d}"


def _t(x):
    return torch.as_tensor(x)


# -- towers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{}, WIDE], ids=["base", "wide_gelu_new"])
def test_vision_model(pair, cfg):
    hf, me, _ = pair("Blip2VisionModel", **cfg)
    px = _pixels()
    with torch.no_grad():
        ref, out = hf(pixel_values=_t(px)), me(pixel_values=px)
        _close(out.last_hidden_state, ref.last_hidden_state)
        _close(out.pooler_output, ref.pooler_output)
        big = _pixels(size=(48, 40))
        _close(me(pixel_values=big, interpolate_pos_encoding=True).last_hidden_state,
               hf(pixel_values=_t(big), interpolate_pos_encoding=True).last_hidden_state)


def test_qformer_model_with_text_and_masks(pair):
    hf, me, _ = pair("Blip2QFormerModel", **TEXT_INPUT)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, Q + 5, 32)).astype(np.float32)
    image = rng.standard_normal((2, 17, 32)).astype(np.float32)
    mask = np.ones((2, Q + 5), dtype=np.int64)
    mask[1, -2:] = 0
    image_mask = np.ones((2, 17), dtype=np.int64)
    image_mask[0, 12:] = 0          # the Q-Former applies its cross-attention mask (transformers too)
    kw = dict(query_length=Q, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = hf(query_embeds=_t(x), attention_mask=_t(mask), encoder_hidden_states=_t(image),
                 encoder_attention_mask=_t(image_mask), **kw)
        out = me(query_embeds=x, attention_mask=mask, encoder_hidden_states=image, encoder_attention_mask=image_mask,
                 **kw)
    _close(out.last_hidden_state, ref.last_hidden_state)
    _close(out.pooler_output, ref.pooler_output)
    # transformers 4.57's recorder also files the cross-attention maps under `attentions` (its layer-name
    # filter ".attention" matches "crossattention.attention"); compare with its self-attention maps only.
    ref_self = tuple(a for a in ref.attentions if a.shape[-1] == Q + 5)
    for name, theirs in (("hidden_states", ref.hidden_states), ("attentions", ref_self),
                         ("cross_attentions", ref.cross_attentions)):
        assert len(out[name]) == len(theirs), name
        for a, b in zip(out[name], theirs):
            _close(a, b)
    assert len(out.attentions) == 3 and len(out.cross_attentions) == 2


QFORMER_CONFIGS = {"text_input": TEXT_INPUT, "wide_cross_every_layer": WIDE}


def _qformer_inputs(hf, queries, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, queries, hf.config.hidden_size)).astype(np.float32)
    image = rng.standard_normal((2, 17, hf.config.encoder_hidden_size)).astype(np.float32)
    return x, image


@pytest.mark.parametrize("cfg", sorted(QFORMER_CONFIGS))
def test_qformer_ignores_masked_image_positions(pair, cfg):
    """encoder_attention_mask takes image positions out of every cross-attention: the queries' outputs are
    transformers', and replacing the masked image states changes nothing."""
    hf, me, _ = pair("Blip2QFormerModel", **QFORMER_CONFIGS[cfg])
    x, image = _qformer_inputs(hf, Q, seed=4)
    image_mask = np.ones((2, 17), dtype=np.int64)
    image_mask[0, 9:], image_mask[1, 3:] = 0, 0
    with torch.no_grad():
        ref = hf(query_embeds=_t(x), encoder_hidden_states=_t(image), encoder_attention_mask=_t(image_mask))
        out = me(query_embeds=x, encoder_hidden_states=image, encoder_attention_mask=image_mask)
        other = image.copy()
        other[image_mask == 0] = 3.0 * np.random.default_rng(5).standard_normal(other[image_mask == 0].shape)
        again = me(query_embeds=x, encoder_hidden_states=other, encoder_attention_mask=image_mask)
        unmasked = hf(query_embeds=_t(x), encoder_hidden_states=_t(image))
    _close(out.last_hidden_state, ref.last_hidden_state)
    _close(again.last_hidden_state, ref.last_hidden_state)
    assert max_abs_diff(unmasked.last_hidden_state, ref.last_hidden_state) > 1e-3     # the mask matters here


@pytest.mark.parametrize("cfg", sorted(QFORMER_CONFIGS))
def test_qformer_hidden_states_alone(pair, cfg):
    """output_hidden_states alone: the layer-normed queries then every layer's output, as transformers, and no
    attention maps."""
    hf, me, _ = pair("Blip2QFormerModel", **QFORMER_CONFIGS[cfg])
    x, image = _qformer_inputs(hf, Q, seed=6)
    with torch.no_grad():
        ref = hf(query_embeds=_t(x), encoder_hidden_states=_t(image), output_hidden_states=True)
        out = me(query_embeds=x, encoder_hidden_states=image, output_hidden_states=True)
    assert out.attentions is None and out.cross_attentions is None
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        _close(a, b)
    _close(out.last_hidden_state, ref.last_hidden_state)


# -- conditional generation --------------------------------------------------------------------
FORWARD_CASES = {
    "opt_placeholders": dict(text=OPT_TEXT, image_token_index=IMG),
    "opt_concat": dict(text=OPT_TEXT),
    "opt_wide": dict(text=OPT_TEXT, image_token_index=IMG, **WIDE),
    "t5_untied_gelu_new_placeholders": dict(text=T5_GELU, image_token_index=IMG),
    "t5_tied_relu_concat": dict(text=T5_TIED_RELU),
    "t5_gelu_cross_every_third": dict(text=dict(T5_GELU, feed_forward_proj="gelu"), image_token_index=IMG,
                                      qformer=dict(cross_attention_frequency=3)),
    "t5_flan_hub_exact_gelu": dict(text=dict(T5_GELU, dense_act_fn="gelu"), image_token_index=IMG),
}


def _reference_model(hf, cfg):
    """transformers 4.57 has only the placeholder path: for a concat config, the same weights with placeholders."""
    if cfg.get("image_token_index") is not None:
        return hf
    ref = type(hf)(blip2_config(**dict(cfg, image_token_index=IMG))).eval()
    ref.load_state_dict(hf.state_dict())
    return ref


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_conditional_generation_forward_and_loss(pair, case):
    cfg = FORWARD_CASES[case]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    ref_model = _reference_model(hf, cfg)
    q = cfg.get("num_query_tokens", Q)
    is_t5 = cfg["text"]["model_type"] == "t5"
    placeholders = cfg.get("image_token_index") is not None
    px = _pixels()
    full_ids, full_mask = _prompt([5, 3], 6, q=q)
    ids, mask = (full_ids, full_mask) if placeholders else (full_ids[:, q:], full_mask[:, q:])
    labels = np.where(full_mask[:, q:] == 1, full_ids[:, q:], -100)
    if is_t5:
        kw = dict(labels=_t(np.random.default_rng(2).integers(0, 99, (2, 5))))
    else:
        kw = dict(labels=_t(labels))
    with torch.no_grad():
        ref = ref_model(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask), **kw)
        out = me(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    # with labels, OPT's logits are those of the labelled (text) positions, as in transformers
    real = None if is_t5 else torch.as_tensor(full_mask[:, q:]).bool()
    assert out.logits.shape == ref.logits.shape
    _close(out.logits, ref.logits, real)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    _close(out.qformer_outputs.last_hidden_state, ref.qformer_outputs.last_hidden_state)
    _close(out.vision_outputs.last_hidden_state, ref.vision_outputs.last_hidden_state)
    st = me.stages(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    assert {"vision", "qformer", "projection", "lm_hidden", "logits", "loss"} <= set(st)
    _close(st["logits"], ref.logits, real)


def test_interpolate_pos_encoding_end_to_end(pair):
    cfg = FORWARD_CASES["opt_placeholders"]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    px = _pixels(size=(48, 40), seed=3)
    ids, mask = _prompt([4, 4], 4)
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), interpolate_pos_encoding=True)
        out = me(pixel_values=px, input_ids=ids, attention_mask=mask, interpolate_pos_encoding=True)
    _close(out.logits, ref.logits)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        me(pixel_values=px, input_ids=ids, attention_mask=mask)


GENERATE_OPTIONS = [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
                    dict(repetition_penalty=1.5, min_new_tokens=4)]


@pytest.mark.parametrize("case", ["opt_placeholders", "opt_concat", "t5_untied_gelu_new_placeholders",
                                  "t5_tied_relu_concat"])
def test_generate_ids_identical(pair, case):
    cfg = FORWARD_CASES[case]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    ref_model = _reference_model(hf, cfg)
    placeholders = cfg.get("image_token_index") is not None
    px = _pixels(batch=3, seed=4)
    full_ids, full_mask = _prompt([5, 2, 4], 5, seed=5)       # batched prompts, left padding
    ids, mask = (full_ids, full_mask) if placeholders else (full_ids[:, Q:], full_mask[:, Q:])
    for opts in GENERATE_OPTIONS:
        with torch.no_grad():
            ref = ref_model.generate(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask),
                                     max_new_tokens=7, **opts)
            got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=7, **opts)
        if not placeholders and cfg["text"]["model_type"] == "opt":
            ref = ref[:, Q:]       # the concatenation path returns the given ids (no placeholders) + new tokens
        assert torch.equal(got, ref), (opts, got, ref)


@pytest.mark.parametrize("case", ["opt_placeholders", "t5_untied_gelu_new_placeholders"])
def test_one_row_decoding_from_transposed_copies_matches_transformers(pair, monkeypatch, case):
    """Batch 1 greedy: the language model decodes from the one-row transposed copies (``layout``; not the T5
    cross-attention's keys/values, computed once), each OPT attention's query, key and value from one shared
    copy; the ids are transformers'."""
    from backends.torch import layout
    from backends.torch.opt import OPTAttention
    monkeypatch.setattr(layout, "ENABLED", None)          # the default plan
    monkeypatch.setattr(layout, "COPIES", True)
    cfg = FORWARD_CASES[case]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    px = _pixels(batch=1, seed=6)
    ids, mask = _prompt([4], 4, seed=7)
    with torch.no_grad():
        ref = hf.generate(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), max_new_tokens=7)
        got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=7)
    assert torch.equal(got, ref), (got, ref)
    lm = me.language_model
    attns = [m for m in lm.modules() if isinstance(m, OPTAttention)]
    assert all(m.__dict__.get("_fused") is not None for m in attns) and bool(attns) == (case.startswith("opt"))
    laid = [m for m in lm.modules() if isinstance(m, layout.Linear) and m._layout is not None]
    assert laid and all(m._layout.how == layout.TRANSPOSED and m._layout.rows == 1 and not m.runs_once for m in laid)
    if hasattr(lm, "encoder"):       # T5's encoder runs once per input: no copies of its weights
        assert not any(isinstance(m, layout.Linear) and m._layout is not None for m in lm.encoder.modules())
    layout.release_layouts(me)


def test_generate_right_padded_batch_matches_transformers(pair):
    """A right-padded OPT batch: the prefill's last slot is padding, whose position id is 1 in
    transformers' generate; the first new token depends on it."""
    hf, me, _ = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["opt_placeholders"])
    px = _pixels(batch=3, seed=6)
    text, text_mask = _prompt([5, 2, 4], 5, seed=7, placeholders=False)
    order = np.argsort(1 - text_mask, axis=1, kind="stable")         # real tokens first, padding after
    text, text_mask = np.take_along_axis(text, order, 1), np.take_along_axis(text_mask, order, 1)
    ids = np.concatenate([np.full((3, Q), IMG), text], 1)
    mask = np.concatenate([np.ones((3, Q), np.int64), text_mask], 1)
    assert mask[:, -1].tolist() == [1, 0, 0]
    for opts in [dict(), dict(num_beams=2)]:
        kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, **opts)
        with torch.no_grad():
            ref = hf.generate(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), **kw)
        got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got.sequences, ref.sequences), (opts, got.sequences, ref.sequences)
        assert len(got.scores) == len(ref.scores)
        for mine, theirs in zip(got.scores, ref.scores):      # every step's scores, the first one included
            finite = torch.isfinite(theirs)
            assert torch.equal(torch.isfinite(mine), finite)
            _close(mine[finite], theirs[finite])


def test_generate_from_inputs_embeds_alone_matches_transformers(pair):
    """transformers' documented call: embeddings (placeholders included) without input_ids; the
    output then holds the new tokens only."""
    hf, me, _ = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["opt_placeholders"])
    px = _pixels(batch=2, seed=8)
    ids, mask = _prompt([4, 2], 4, seed=9)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(_t(ids))
        for opts in [dict(), dict(num_beams=2)]:
            ref = hf.generate(pixel_values=_t(px), inputs_embeds=embeds, attention_mask=_t(mask), max_new_tokens=5,
                              **opts)
            got = me.generate(pixel_values=px, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, **opts)
            assert torch.equal(got, ref), (opts, got, ref)


def test_generate_without_prompt_starts_from_placeholders_and_bos(pair):
    hf, me, _ = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["opt_placeholders"])
    px = _pixels(seed=6)
    with torch.no_grad():
        ref = hf.generate(pixel_values=_t(px), max_new_tokens=5)
        got = me.generate(pixel_values=px, max_new_tokens=5)
    assert torch.equal(got, ref)
    assert got[:, :Q].eq(IMG).all() and got[:, Q].eq(2).all()
    # default length, as transformers: 20 new tokens (capped by OPT's 40 positions)
    with torch.no_grad():
        assert torch.equal(me.generate(pixel_values=px), hf.generate(pixel_values=_t(px)))


def test_concat_opt_fills_its_position_table_exactly(pair):
    """OPT concatenating the queries in front: the decoder is fed Q queries + prompt + every new token but the
    last, which may use all 40 positions (41 ids: transformers', where the placeholders take the queries'
    positions); one token more is refused."""
    cfg = FORWARD_CASES["opt_concat"]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    px = _pixels(batch=2, seed=3)
    full_ids, full_mask = _prompt([5, 3], 5, seed=3)
    ids, mask = full_ids[:, Q:], full_mask[:, Q:]
    new = 41 - full_ids.shape[1]
    with torch.no_grad():
        ref = _reference_model(hf, cfg).generate(pixel_values=_t(px), input_ids=_t(full_ids),
                                                 attention_mask=_t(full_mask), max_new_tokens=new, min_new_tokens=new)
        got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
    assert ref.shape[1] == 41 and torch.equal(got, ref[:, Q:])
    with pytest.raises(ValueError, match="OPT has only 40 positions"):
        me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=new + 1, min_new_tokens=new + 1)


def test_sampling_is_seeded(pair):
    _, me, _ = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["t5_untied_gelu_new_placeholders"])
    px = _pixels(seed=7)
    ids, mask = _prompt([3, 3], 3)
    a = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, do_sample=True, top_k=5, seed=11,
                    max_new_tokens=6)
    b = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, do_sample=True, top_k=5, seed=11,
                    max_new_tokens=6)
    assert torch.equal(a, b) and a[:, 0].eq(0).all() and int(a.max()) < 99


def test_missing_placeholders_raise(pair):
    _, me, _ = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["opt_placeholders"])
    px = _pixels()
    ids, mask = _prompt([3, 3], 3, placeholders=False)
    with pytest.raises(ValueError, match="placeholder"):
        me(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="placeholder"):
        me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    _, retrieval, _ = pair("Blip2ForImageTextRetrieval", image_token_index=IMG, **TEXT_INPUT)
    with pytest.raises(ValueError, match="placeholder"):
        retrieval(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        me(pixel_values=px, input_ids=ids + 200)


# -- Blip2Model -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [OPT_TEXT, T5_GELU], ids=["opt", "t5"])
def test_blip2_model_and_feature_getters(pair, text):
    hf, me, _ = pair("Blip2Model", text=text, image_token_index=IMG)
    px = _pixels(seed=8)
    ids, mask = _prompt([4, 2], 4, seed=9)
    text_ids, text_mask = ids[:, Q:], mask[:, Q:]
    dec = dict(decoder_input_ids=_t(np.random.default_rng(3).integers(0, 99, (2, 3)))) if text is T5_GELU else {}
    real = torch.as_tensor(mask).bool() if text is OPT_TEXT else None
    with torch.no_grad():
        _close(me(pixel_values=px, input_ids=ids, attention_mask=mask, **dec).logits,
               hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), **dec).logits, real)
        t_ref = hf.get_text_features(input_ids=_t(text_ids), attention_mask=_t(text_mask), legacy_output=False, **dec)
        t_out = me.get_text_features(input_ids=text_ids, attention_mask=text_mask, legacy_output=False, **dec)
        _close(t_out, t_ref, None if real is None else real[:, Q:])
        _close(me.get_image_features(px, legacy_output=False), hf.get_image_features(_t(px), legacy_output=False))
        _close(me.get_qformer_features(px, legacy_output=False),
               hf.get_qformer_features(_t(px), legacy_output=False))


# -- retrieval and projection models -------------------------------------------------------------
@pytest.mark.parametrize("image_token_index", [IMG, None], ids=["placeholders", "plain"])
def test_image_text_retrieval(pair, image_token_index):
    hf, me, _ = pair("Blip2ForImageTextRetrieval", image_token_index=image_token_index, **TEXT_INPUT)
    px = _pixels(seed=10)
    ids, mask = _prompt([6, 4], 6, vocab=99, seed=11, placeholders=image_token_index is not None)
    for itm in (False, True):
        with torch.no_grad():
            ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), use_image_text_matching_head=itm)
            out = me(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        _close(out.logits_per_image, ref.logits_per_image)
        _close(out.logits_per_text, ref.logits_per_text)
        if not itm:
            _close(out.text_embeds, ref.text_embeds)
            _close(out.image_embeds, ref.image_embeds)
    assert tuple(out.logits_per_image.shape) == (2, 2)
    st = me.stages(pixel_values=px, input_ids=ids, attention_mask=mask)
    _close(st["logits_per_image"], hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask)).logits_per_image)


def test_text_and_vision_models_with_projection(pair):
    hf_t, me_t, _ = pair("Blip2TextModelWithProjection", **TEXT_INPUT)
    hf_v, me_v, _ = pair("Blip2VisionModelWithProjection", **WIDE)
    ids, mask = _prompt([5, 3], 5, vocab=99, placeholders=False)
    px = _pixels(seed=12)
    with torch.no_grad():
        ref, out = hf_t(input_ids=_t(ids), attention_mask=_t(mask)), me_t(input_ids=ids, attention_mask=mask)
        _close(out.text_embeds, ref.text_embeds)
        _close(out.last_hidden_state, ref.last_hidden_state)
        ref, out = hf_v(pixel_values=_t(px)), me_v(pixel_values=px)
        _close(out.image_embeds, ref.image_embeds)
        _close(out.last_hidden_state, ref.last_hidden_state)
    assert tuple(out.image_embeds.shape) == (2, WIDE["num_query_tokens"], 256)


# -- checkpoints ----------------------------------------------------------------------------------
def test_sharded_checkpoints_both_ways(pair, tmp_path):
    cfg = FORWARD_CASES["t5_untied_gelu_new_placeholders"]
    hf, _, _ = pair("Blip2ForConditionalGeneration", **cfg)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    me = ours.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    me.save_pretrained(str(tmp_path / "ours"), max_shard_size="60KB")
    assert os.path.exists(tmp_path / "ours" / "model.safetensors.index.json")
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    ref_state, back_state = hf.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    assert all(torch.equal(ref_state[k], back_state[k]) for k in ref_state)
    ids, mask = _prompt([3, 3], 3)
    with torch.no_grad():
        _close(me(pixel_values=_pixels(), input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, -2:]).logits,
               hf(pixel_values=_t(_pixels()), input_ids=_t(ids), attention_mask=_t(mask),
                  decoder_input_ids=_t(ids[:, -2:])).logits)


def test_random_init_is_seeded_and_round_trips(tmp_path):
    cfg = ours.Blip2ForConditionalGeneration.config_from(_save_config(tmp_path, text=OPT_TEXT, image_token_index=IMG))
    a, b = ours.Blip2ForConditionalGeneration(cfg, seed=3), ours.Blip2ForConditionalGeneration(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.language_model.lm_head.weight is a.language_model.model.decoder.embed_tokens.weight
    a.save_pretrained(str(tmp_path / "m"))
    c = ours.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "m"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def _save_config(tmp_path, **cfg):
    path = tmp_path / "cfg"
    blip2_config(**cfg).save_pretrained(str(path))
    return str(path)


# -- half precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["opt_placeholders", "t5_untied_gelu_new_placeholders"])
def test_half_precision_forward_and_generate(pair, case):
    # weights of std 0.2 keep logits O(1), where the table's absolute half-precision tolerance applies
    hf, me32, path = pair("Blip2ForConditionalGeneration", std=0.2, **FORWARD_CASES[case])
    is_t5 = FORWARD_CASES[case]["text"]["model_type"] == "t5"
    px = _pixels(seed=13)
    ids, mask = _prompt([4, 2], 4, seed=14)
    dec = dict(decoder_input_ids=ids[:, -3:]) if is_t5 else {}
    real = None if is_t5 else torch.as_tensor(mask).bool()
    with torch.no_grad():
        ref = me32(pixel_values=px, input_ids=ids, attention_mask=mask, **dec).logits
    for dtype in ("bfloat16", "float16"):
        me = ours.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
        # transformers 4.57 keeps the Q-Former and the queries in float32 for float16 only
        kept = torch.float32 if dtype == "float16" else getattr(torch, dtype)
        assert me.qformer.layernorm.weight.dtype == kept and me.query_tokens.dtype == kept
        assert me.language_model.lm_head.weight.dtype == getattr(torch, dtype)
        with torch.no_grad():
            out = me(pixel_values=px, input_ids=ids, attention_mask=mask, **dec).logits
            gen = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
        assert out.dtype == getattr(torch, dtype)
        assert max_abs_diff(out[real] if real is not None else out, ref[real] if real is not None else ref) \
            <= tolerance("default", dtype)[0]
        assert gen.shape[0] == 2 and int(gen.max()) < 99
    # a randomly initialised bfloat16 model runs end to end as well
    fresh = ours.Blip2ForConditionalGeneration(me32.config, seed=1, dtype="bfloat16")
    with torch.no_grad():
        assert fresh(pixel_values=px, input_ids=ids, attention_mask=mask, **dec).logits.dtype == torch.bfloat16
        assert fresh.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=3).shape[0] == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_class_runs_in_half_precision(tmp_path, dtype):
    """No dtype mismatch on any path (the float16 Q-Former stays float32 and meets float16 tensors)."""
    cfg_opt = ours.Blip2Model.config_from(_save_config(tmp_path, text=OPT_TEXT, image_token_index=IMG, **TEXT_INPUT))
    cfg_t5 = ours.Blip2Model.config_from(_save_config(tmp_path / "t5", text=T5_GELU, **TEXT_INPUT))
    px = _pixels()
    ids, mask = _prompt([4, 2], 4)
    half = getattr(torch, dtype)
    with torch.no_grad():
        for cfg in (cfg_opt, cfg_t5):
            dec = {} if cfg is cfg_opt else dict(decoder_input_ids=ids[:, -2:])
            text_ids = ids if cfg is cfg_opt else ids[:, Q:]
            m = ours.Blip2Model(cfg, seed=0, dtype=dtype)
            assert m(pixel_values=px, input_ids=text_ids, attention_mask=mask[:, -text_ids.shape[1]:],
                     **dec).logits.dtype == half
            assert m.get_qformer_features(px, legacy_output=False).dtype == (
                torch.float32 if dtype == "float16" else half)
        r = ours.Blip2ForImageTextRetrieval(cfg_opt, seed=0, dtype=dtype)
        for itm in (False, True):
            assert torch.isfinite(r(pixel_values=px, input_ids=ids, attention_mask=mask,
                                    use_image_text_matching_head=itm).logits_per_image.float()).all()
        t = ours.Blip2TextModelWithProjection(cfg_opt, seed=0, dtype=dtype)
        assert t(input_ids=ids[:, Q:], attention_mask=mask[:, Q:]).text_embeds.dtype == half
        v = ours.Blip2VisionModelWithProjection(cfg_opt, seed=0, dtype=dtype)
        assert v(pixel_values=px).image_embeds.dtype == half
        g = ours.Blip2ForConditionalGeneration(cfg_opt, seed=0, dtype=dtype)
        assert g.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=3,
                          num_beams=2).shape[0] == 2


def test_training_step_reaches_every_stage(pair):
    """Dropout is active in train mode (as in transformers) and the loss back-propagates to each stage."""
    _, me, path = pair("Blip2ForConditionalGeneration", **FORWARD_CASES["opt_placeholders"])
    model = ours.Blip2ForConditionalGeneration.from_pretrained(path)
    ids, mask = _prompt([4, 3], 4)
    labels = np.where(mask[:, Q:] == 1, ids[:, Q:], -100)
    model.train()
    torch.manual_seed(0)
    a = model(pixel_values=_pixels(), input_ids=ids, attention_mask=mask, labels=labels)
    a.loss.backward()
    b = model(pixel_values=_pixels(), input_ids=ids, attention_mask=mask, labels=labels)
    assert not torch.equal(a.logits, b.logits)          # the configs' dropout (0.1) is applied
    for p in (model.query_tokens, model.qformer.layernorm.weight, model.language_projection.weight,
              model.language_model.model.decoder.embed_tokens.weight, model.vision_model.post_layernorm.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=_pixels(), input_ids=ids, attention_mask=mask).logits,
                           me(pixel_values=_pixels(), input_ids=ids, attention_mask=mask).logits)


def test_import_loads_no_other_framework():
    code = ("import sys, backends.torch.blip2; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'jax', 'flax', 'transformers')]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
