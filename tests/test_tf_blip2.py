"""TensorFlow BLIP-2 against transformers 4.57 PyTorch and the torch backend.

Golden values come from the committed fixtures (transformers' outputs), from tiny transformers
models built and saved here (OPT and T5 / Flan-T5 language models, both image-fusion paths), or
from ``backends.torch`` on the same files. The fixtures' greedy ids are checked through the model side
of the engine's contract (``generation_context`` / ``init_cache`` / ``step``) with greedy decoding
written out here (``_greedy``, shared with ``test_tf_blip2_generate.py``); training, checkpoints and
bfloat16 are in ``test_tf_blip2_training.py``.
"""
import json

import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers

import backends.tf as B
from backends.torch import blip2 as torch_blip2
from blip_core.numerics import max_abs_diff, tolerance
from fixture_utils import fixture
from hf_configs import OPT_TEXT, T5_TEXT, blip2_config
from hf_configs import randomize as _randomize

ATOL = tolerance("default", "float32")[0]
IMG = 90          # image placeholder id of the placeholder-path configs built here
Q = 4             # num_query_tokens of the default configs
FIXTURE_IMG = 98  # image_token_index of the committed BLIP-2 fixtures

T5_GELU = dict(T5_TEXT, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
               relative_attention_max_distance=10)
T5_TIED_RELU = dict(T5_TEXT, feed_forward_proj="relu", tie_word_embeddings=True, relative_attention_num_buckets=8,
                    relative_attention_max_distance=10)
WIDE = dict(vision=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=6, hidden_act="gelu_new"),
            qformer=dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=2, cross_attention_frequency=1,
                         hidden_act="gelu_new"),
            num_query_tokens=3)
TEXT_INPUT = dict(qformer=dict(use_qformer_text_input=True))
CASES = {
    "opt_placeholders": dict(text=OPT_TEXT, image_token_index=IMG),
    "opt_concat": dict(text=OPT_TEXT),
    "opt_wide": dict(text=OPT_TEXT, image_token_index=IMG, **WIDE),
    "opt_post_ln": dict(text=dict(OPT_TEXT, do_layer_norm_before=False), image_token_index=IMG),
    "t5_placeholders": dict(text=T5_GELU, image_token_index=IMG),
    "t5_tied_relu_concat": dict(text=T5_TIED_RELU),
    "flan_t5_exact_gelu": dict(text=dict(T5_GELU, dense_act_fn="gelu"), image_token_index=IMG),
}



@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair(cls_name, **config) -> (transformers model, our TF model, directory)``, built once."""
    cache = {}

    def make(cls_name, seed=0, std=0.5, **cfg):
        key = (cls_name, seed, std, json.dumps(cfg, sort_keys=True))
        if key not in cache:
            hf_cfg = blip2_config(**cfg)
            if cls_name == "Blip2QFormerModel":
                hf_cfg = hf_cfg.qformer_config
            hf = _randomize(getattr(transformers, cls_name)(hf_cfg), seed, std)
            path = str(tmp_path_factory.mktemp(cls_name))
            hf.save_pretrained(path)
            cache[key] = (hf, getattr(B, cls_name).from_pretrained(path), path)
        return cache[key]
    return make


def _reference(hf, cfg):
    """transformers 4.57 has only the placeholder path: for a concat config, the same weights with placeholders."""
    if cfg.get("image_token_index") is not None:
        return hf
    ref = type(hf)(blip2_config(**dict(cfg, image_token_index=IMG))).eval()
    ref.load_state_dict(hf.state_dict())
    return ref


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


def _t(x):
    return torch.as_tensor(np.asarray(x))


def close(ours, ref, what="", where=None):
    ours = np.asarray(tf.cast(ours, tf.float32)) if isinstance(ours, (tf.Tensor, tf.Variable)) else np.asarray(ours)
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if where is not None:
        ours, ref = ours[where], ref[where]
    err = max_abs_diff(ours, ref)
    assert err <= ATOL, f"{what}: max abs diff {err:.3g} > {ATOL}"


def _case_inputs(cfg, batch_lengths=(5, 3), total=6, seed=0):
    """(reference ids, reference mask, our ids, our mask): ours drop the placeholders on the concat path."""
    q = cfg.get("num_query_tokens", Q)
    full_ids, full_mask = _prompt(list(batch_lengths), total, q=q, seed=seed)
    if cfg.get("image_token_index") is None:
        return full_ids, full_mask, full_ids[:, q:], full_mask[:, q:]
    return full_ids, full_mask, full_ids, full_mask


def _is_t5(cfg):
    return cfg["text"]["model_type"] == "t5"


# -- committed fixtures ----------------------------------------------------------------------------
def _fixture_inputs(name):
    directory, inputs, reference = fixture(name)
    if name == "Blip2ForImageTextRetrieval":
        # transformers drops the first Q ids whenever image_token_index is set; the fixture's ids have
        # no placeholders there, so its reference saw ids[:, Q:]. Ours refuse ids without placeholders:
        # give them the same ids with the first Q written as placeholders.
        inputs["input_ids"] = inputs["input_ids"].copy()
        inputs["input_ids"][:, :Q] = FIXTURE_IMG
    return directory, inputs, reference


def _greedy(model, pixel_values, ids, mask, new_tokens):
    """Greedy decoding by hand through the step contract; finished rows get pad as in transformers.

    Returns (ids (B, P + n), [per-step logits]) with n <= new_tokens (stops when every row ended).
    """
    tc = model.config.text_config
    is_t5 = not model.is_decoder_only
    slots = model.image_slots(ids)
    ctx = model.generation_context(pixel_values, ids, mask, slots)
    prompt = np.full((ids.shape[0], 1), tc.decoder_start_token_id) if is_t5 else np.asarray(ids)
    p = prompt.shape[1]
    total = p + new_tokens
    key_mask = np.zeros((ids.shape[0], total), np.int32)
    key_mask[:, :p] = 1 if is_t5 else mask
    cache = model.init_cache(ids.shape[0], total)
    logits, cache = model.step(tf.constant(prompt, tf.int32), None, tf.constant(key_mask), cache, 0, ctx)
    out, seen, done = prompt, [logits], np.zeros(ids.shape[0], bool)
    for i in range(new_tokens):
        tok = np.argmax(logits.numpy(), -1)
        tok = np.where(done, tc.pad_token_id, tok)
        done |= tok == tc.eos_token_id
        out = np.concatenate([out, tok[:, None]], 1)
        if done.all() or i == new_tokens - 1:
            break
        key_mask[:, p + i] = 1
        logits, cache = model.step(tf.constant(tok[:, None], tf.int32), None, tf.constant(key_mask), cache,
                                   tf.constant(p + i), ctx)
        seen.append(logits)
    return out, seen


FIXTURE_OUTPUTS = {
    "Blip2VisionModel": lambda m, a: m(**a),
    "Blip2QFormerModel": lambda m, a: m(**a),
    "Blip2Model": lambda m, a: m(**a),
    "Blip2ForConditionalGeneration": lambda m, a: m(**a),
    "Blip2ForImageTextRetrieval": lambda m, a: dict(
        itm_logits=m(**a, use_image_text_matching_head=True).logits_per_image,
        itc_logits_per_image=m(**a).logits_per_image),
    "Blip2TextModelWithProjection": lambda m, a: m(**a),
    "Blip2VisionModelWithProjection": lambda m, a: m(**a),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTPUTS))
def test_fixture_matches_transformers(name):
    directory, inputs, reference = _fixture_inputs(name)
    model = getattr(B, name).from_pretrained(directory)
    out = FIXTURE_OUTPUTS[name](model, inputs)
    compared = 0
    for key, ref in reference.items():
        if key == "greedy_ids":
            new = ref.shape[1] - inputs["input_ids"].shape[1]
            ids, _ = _greedy(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], new)
            np.testing.assert_array_equal(ids, ref)
        else:
            close(out[key], ref, f"{name}.{key}")
        compared += 1
    assert compared == len(reference) >= 1


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTPUTS))
def test_fixture_stages_match_torch_backend(name):
    directory, inputs, _ = _fixture_inputs(name)
    ours = getattr(B, name).from_pretrained(directory).stages(**inputs)
    with torch.no_grad():
        theirs = getattr(torch_blip2, name).from_pretrained(directory).stages(**inputs)
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for stage in ours:
        close(ours[stage], theirs[stage], stage)


# -- conditional generation: OPT and T5, both fusion paths ----------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_conditional_generation_forward_and_loss(pair, case):
    cfg = CASES[case]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    ref_model = _reference(hf, cfg)
    q = cfg.get("num_query_tokens", Q)
    px = _pixels()
    full_ids, full_mask, ids, mask = _case_inputs(cfg)
    if _is_t5(cfg):
        labels = np.random.default_rng(2).integers(0, 99, (2, 5))
        labels[1, 3:] = -100
    else:
        labels = np.where(full_mask[:, q:] == 1, full_ids[:, q:], -100)
    with torch.no_grad():
        ref = ref_model(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask), labels=_t(labels),
                        output_hidden_states=True)
    out = me(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    # with labels, OPT's logits are those of the labelled (text) positions, as in transformers
    real = None if _is_t5(cfg) else full_mask[:, q:].astype(bool)
    assert tuple(out.logits.shape) == tuple(ref.logits.shape)
    close(out.logits, ref.logits, "logits", real)
    assert abs(float(out.loss) - ref.loss.item()) <= ATOL
    close(out.qformer_outputs.last_hidden_state, ref.qformer_outputs.last_hidden_state, "qformer")
    close(out.vision_outputs.last_hidden_state, ref.vision_outputs.last_hidden_state, "vision")
    lm, ref_lm = out.language_model_outputs, ref.language_model_outputs
    fields = ("decoder_hidden_states", "encoder_hidden_states") if _is_t5(cfg) else ("hidden_states",)
    for field in fields:
        where = full_mask.astype(bool) if field != "decoder_hidden_states" else None
        assert len(lm[field]) == len(ref_lm[field]), field
        for a, b in zip(lm[field], ref_lm[field]):
            close(a, b, field, where)
    st = me.stages(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert set(st) == {"vision", "vision_pooled", "qformer", "projection", "lm_hidden", "logits", "loss"}
    close(st["logits"], ref.logits, "stages logits", real)


def test_missing_placeholders_raise(pair):
    _, me, _ = pair("Blip2ForConditionalGeneration", **CASES["opt_placeholders"])
    px = _pixels()
    ids, mask = _prompt([3, 3], 3, placeholders=False)
    with pytest.raises(ValueError, match="placeholder"):
        me(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="placeholder"):
        me.image_slots(ids)
    with pytest.raises(ValueError, match="placeholder"):
        me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    _, retrieval, _ = pair("Blip2ForImageTextRetrieval", image_token_index=IMG, **TEXT_INPUT)
    with pytest.raises(ValueError, match="placeholder"):
        retrieval(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        me(pixel_values=px, input_ids=ids + 200)


def test_interpolate_pos_encoding_end_to_end(pair):
    hf, me, _ = pair("Blip2ForConditionalGeneration", **CASES["opt_placeholders"])
    px = _pixels(size=(48, 40), seed=3)
    ids, mask = _prompt([4, 4], 4)
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), interpolate_pos_encoding=True)
    close(me(pixel_values=px, input_ids=ids, attention_mask=mask, interpolate_pos_encoding=True).logits, ref.logits)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        me(pixel_values=px, input_ids=ids, attention_mask=mask)


# -- Blip2Model, the Q-Former, retrieval and projection models ------------------------------------
@pytest.mark.parametrize("text", ["opt", "t5"])
def test_blip2_model_and_feature_getters(pair, text):
    lm = OPT_TEXT if text == "opt" else T5_GELU
    hf, me, _ = pair("Blip2Model", text=lm, image_token_index=IMG)
    px = _pixels(seed=8)
    ids, mask = _prompt([4, 2], 4, seed=9)
    text_ids, text_mask = ids[:, Q:], mask[:, Q:]
    dec = dict(decoder_input_ids=np.random.default_rng(3).integers(0, 99, (2, 3))) if text == "t5" else {}
    tdec = {k: _t(v) for k, v in dec.items()}
    real = mask.astype(bool) if text == "opt" else None
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), **tdec).logits
        t_ref = hf.get_text_features(input_ids=_t(text_ids), attention_mask=_t(text_mask), legacy_output=False, **tdec)
        i_ref = hf.get_image_features(_t(px), legacy_output=False)
        q_ref = hf.get_qformer_features(_t(px), legacy_output=False)
    close(me(pixel_values=px, input_ids=ids, attention_mask=mask, **dec).logits, ref, "logits", real)
    close(me.get_text_features(input_ids=text_ids, attention_mask=text_mask, legacy_output=False, **dec), t_ref,
          "text features", None if real is None else real[:, Q:])
    close(me.get_image_features(px, legacy_output=False), i_ref, "image features")
    close(me.get_qformer_features(px, legacy_output=False), q_ref, "qformer features")
    assert me.get_qformer_features(px).pooler_output.shape == (2, 32)


def test_qformer_model_with_text_masks_and_recorded_outputs(pair):
    hf, me, _ = pair("Blip2QFormerModel", **TEXT_INPUT)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, Q + 5, 32)).astype(np.float32)
    image = rng.standard_normal((2, 17, 32)).astype(np.float32)
    mask = np.ones((2, Q + 5), dtype=np.int64)
    mask[1, -2:] = 0
    image_mask = np.ones((2, 17), dtype=np.int64)
    image_mask[0, 12:] = 0
    kw = dict(query_length=Q, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = hf(query_embeds=_t(x), attention_mask=_t(mask), encoder_hidden_states=_t(image),
                 encoder_attention_mask=_t(image_mask), **kw)
    out = me(query_embeds=x, attention_mask=mask, encoder_hidden_states=image, encoder_attention_mask=image_mask, **kw)
    close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    close(out.pooler_output, ref.pooler_output, "pooler_output")
    # transformers 4.57 also files the cross-attention maps under `attentions`: compare its self-attention maps
    ref_self = tuple(a for a in ref.attentions if a.shape[-1] == Q + 5)
    for name, theirs in (("hidden_states", ref.hidden_states), ("attentions", ref_self),
                         ("cross_attentions", ref.cross_attentions)):
        assert len(out[name]) == len(theirs), name
        for a, b in zip(out[name], theirs):
            close(a, b, name)
    assert len(out.attentions) == 3 and len(out.cross_attentions) == 2


def _queries_apart(n):
    """Queries see queries only, text sees everything (BLIP-2's image-grounded text generation layout)."""
    m = np.ones((2, n, n), np.int64)
    m[:, :Q, Q:] = 0
    return m


def _causal_text(n):
    """Queries see queries; text sees the queries and the text before it; row 1's last two tokens are padding."""
    m = np.tril(np.ones((n, n), np.int64))
    m[:Q, :Q] = 1
    m = np.repeat(m[None], 2, axis=0)
    m[1, :, -2:] = 0
    return m


@pytest.mark.parametrize("make_mask", [_queries_apart, _causal_text], ids=["queries_apart", "causal_text"])
def test_qformer_three_dimensional_attention_mask(pair, make_mask):
    """A (batch, from, to) attention mask is applied per query row, as transformers' Q-Former does."""
    hf, me, _ = pair("Blip2QFormerModel", **TEXT_INPUT)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, Q + 5, 32)).astype(np.float32)
    image = rng.standard_normal((2, 17, 32)).astype(np.float32)
    mask = make_mask(Q + 5)
    with torch.no_grad():
        ref = hf(query_embeds=_t(x), query_length=Q, attention_mask=_t(mask), encoder_hidden_states=_t(image))
        full = hf(query_embeds=_t(x), query_length=Q, encoder_hidden_states=_t(image))
    out = me(query_embeds=x, query_length=Q, attention_mask=mask, encoder_hidden_states=image)
    close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state (3-D mask)")
    assert max_abs_diff(full.last_hidden_state, ref.last_hidden_state) > 1e-3     # the mask matters here


@pytest.mark.parametrize("image_token_index", [IMG, None], ids=["placeholders", "plain"])
def test_image_text_retrieval(pair, image_token_index):
    hf, me, _ = pair("Blip2ForImageTextRetrieval", image_token_index=image_token_index, **TEXT_INPUT)
    px = _pixels(seed=10)
    ids, mask = _prompt([6, 4], 6, vocab=99, seed=11, placeholders=image_token_index is not None)
    for itm in (False, True):
        with torch.no_grad():
            ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), use_image_text_matching_head=itm)
        out = me(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        close(out.logits_per_image, ref.logits_per_image, f"logits_per_image itm={itm}")
        close(out.logits_per_text, ref.logits_per_text, f"logits_per_text itm={itm}")
        if not itm:
            close(out.text_embeds, ref.text_embeds, "text_embeds")
            close(out.image_embeds, ref.image_embeds, "image_embeds")
    assert tuple(out.logits_per_image.shape) == (2, 2)


def test_text_and_vision_models_with_projection(pair):
    hf_t, me_t, _ = pair("Blip2TextModelWithProjection", **TEXT_INPUT)
    hf_v, me_v, _ = pair("Blip2VisionModelWithProjection", **WIDE)
    ids, mask = _prompt([5, 3], 5, vocab=99, placeholders=False)
    px = _pixels(seed=12)
    with torch.no_grad():
        ref_t, ref_v = hf_t(input_ids=_t(ids), attention_mask=_t(mask)), hf_v(pixel_values=_t(px))
    out_t, out_v = me_t(input_ids=ids, attention_mask=mask), me_v(pixel_values=px)
    close(out_t.text_embeds, ref_t.text_embeds, "text_embeds")
    close(out_t.last_hidden_state, ref_t.last_hidden_state, "text last_hidden_state")
    close(out_v.image_embeds, ref_v.image_embeds, "image_embeds")
    close(out_v.last_hidden_state, ref_v.last_hidden_state, "vision last_hidden_state")
    assert tuple(out_v.image_embeds.shape) == (2, WIDE["num_query_tokens"], 256)


def test_relative_position_bucket_matches_transformers():
    from backends.tf.t5 import relative_position_bucket
    rel = np.arange(-300, 300)[None, :]
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 12)):
            ref = bucket(torch.as_tensor(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md).numpy()
            got = relative_position_bucket(tf.constant(rel, tf.int32), bidirectional, nb, md).numpy()
            np.testing.assert_array_equal(got, ref)
