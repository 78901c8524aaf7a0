"""JAX/Flax BLIP-2 against transformers 4.57 (the reference) and the torch backend, on tiny random models.

Goldens come from the committed fixtures (made by transformers), from transformers models built here and
saved in Hugging Face format, or from ``backends.torch`` loading the same files; never from the code under
test. Covered: every class, OPT and T5 language models, both image fusions (placeholders and the older
concatenation), the missing-placeholder error, losses and their gradients, ``interpolate_pos_encoding``, bfloat16
and float16 against float32 within the tolerance table's low-precision rows; decoding is in ``test_jax_blip2_generation.py``.
Models are shared per module and compiled programs per process: jit compilation dominates the run time.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from blip_core.numerics import effective_tolerance, max_abs_diff, tolerance
from blip_core.weights import owned, weight_table
from fixture_utils import fixture, require

torch = require("torch")
transformers = require("transformers")

import backends.jax as J  # noqa: E402
import backends.torch as TB  # noqa: E402
from hf_configs import OPT_TEXT, T5_TEXT, blip2_config  # noqa: E402
from test_jax_blip import _grad_parity  # noqa: E402

ATOL = tolerance("default", "float32")[0]
IMG, Q = 90, 4
SMALL = dict(vision=dict(num_hidden_layers=1), qformer=dict(num_hidden_layers=2, use_qformer_text_input=True))
T5_FLAN = dict(T5_TEXT, dense_act_fn="gelu", relative_attention_num_buckets=8, relative_attention_max_distance=10)
CASES = {
    "t5_placeholders": dict(text=T5_FLAN, image_token_index=IMG, **SMALL),
    "opt_concat": dict(text=OPT_TEXT, **SMALL),
    "opt_post_ln": dict(text=dict(OPT_TEXT, do_layer_norm_before=False), image_token_index=IMG, **SMALL),
}


@pytest.fixture(autouse=True)
def strict_numerics():
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        yield


def close(ours, ref, atol=ATOL, where=None):
    ours = np.asarray(ours, np.float64)
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    if where is not None:
        ours, ref = ours[where], ref[where]
    diff = max_abs_diff(ours, ref)
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"
    return diff


def t(x):
    return torch.from_numpy(np.asarray(x))


def _scramble(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_built(tmp_path_factory):
    """``built(case) -> (transformers reference, jax model, torch-backend model, directory)``.

    transformers 4.57 knows only the placeholder path: for a concatenation config the reference is the same
    weights under a placeholder config (fed the ids with placeholders in front)."""
    cache = {}

    def make(case):
        if case not in cache:
            cfg = CASES[case]
            hf = _scramble(transformers.Blip2ForConditionalGeneration(blip2_config(**cfg)))
            path = str(tmp_path_factory.mktemp(case))
            hf.save_pretrained(path)
            ref = hf
            if cfg.get("image_token_index") is None:
                ref = transformers.Blip2ForConditionalGeneration(blip2_config(**dict(cfg, image_token_index=IMG)))
                ref.load_state_dict(hf.state_dict())
                ref.eval()
            cache[case] = (ref, J.Blip2ForConditionalGeneration.from_pretrained(path),
                           TB.Blip2ForConditionalGeneration.from_pretrained(path), path)
        return cache[case]
    return make


def make_fixed():
    """The committed fixtures, loaded by the JAX backend: ``name -> (model, inputs, reference, directory)``."""
    cache = {}

    def load(name):
        if name not in cache:
            d, inputs, reference = fixture(name)
            cache[name] = (getattr(J, name).from_pretrained(d), inputs, reference, d)
        return cache[name]
    return load


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_built(tmp_path_factory)


@pytest.fixture(scope="module")
def fixed():
    return make_fixed()


def _pixels(batch=2, size=(32, 32), seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)


def _prompt(lengths, total, seed=0, placeholders=True):
    """Blip2Processor's layout: [Q placeholders][left padding][bos=2 prompt]."""
    rng = np.random.default_rng(seed)
    ids = np.ones((len(lengths), total), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, 80, n)
        ids[row, total - n] = 2
        mask[row, total - n:] = 1
    if placeholders:
        ids = np.concatenate([np.full((len(lengths), Q), IMG), ids], 1)
        mask = np.concatenate([np.ones((len(lengths), Q), np.int64), mask], 1)
    return ids, mask


# -- every class against its committed fixture ------------------------------------------------------------
FIXTURE_OUTPUTS = {
    "Blip2VisionModel": ("last_hidden_state", "pooler_output"),
    "Blip2QFormerModel": ("last_hidden_state", "pooler_output"),
    "Blip2Model": ("logits",),
    "Blip2ForConditionalGeneration": ("logits",),
    "Blip2TextModelWithProjection": ("text_embeds", "last_hidden_state"),
    "Blip2VisionModelWithProjection": ("image_embeds", "last_hidden_state"),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTPUTS))
def test_fixture_outputs_match_transformers(fixed, name):
    model, inputs, reference, _ = fixed(name)
    out = model(**inputs)
    real = inputs["attention_mask"] == 1 if name == "Blip2ForConditionalGeneration" else None  # padded rows aside
    for field in FIXTURE_OUTPUTS[name]:
        close(out[field], reference[field], where=real)
    stages = model.stages(**inputs)
    assert stages and all(np.isfinite(np.asarray(v, np.float32)).all() for v in stages.values())


def test_retrieval_fixture_itm_and_itc(fixed):
    """transformers drops the first Q ids of a placeholder config whatever they are; ours checks that they are
    placeholders and drops them: the same rows with placeholders in front must give the reference."""
    model, inputs, reference, _ = fixed("Blip2ForImageTextRetrieval")
    ids = inputs["input_ids"].copy()
    ids[:, :Q] = model.config.image_token_index
    kw = dict(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=inputs["attention_mask"])
    close(model(use_image_text_matching_head=True, **kw).logits_per_image, reference["itm_logits"])
    itc = model(**kw)
    close(itc.logits_per_image, reference["itc_logits_per_image"])
    close(itc.logits_per_text, reference["itc_logits_per_image"].T)
    assert set(model.stages(**kw)) == {"vision", "text", "image_embeds", "text_embeds", "logits_per_image"}
    with pytest.raises(ValueError, match="placeholder"):
        model(**dict(kw, input_ids=inputs["input_ids"]))


@pytest.mark.parametrize("itm,texts", [(False, 1), (False, 3), (True, 1), (True, 3)],
                         ids=["itc-1-text", "itc-3-texts", "itm-1-pair", "itm-3-pairs"])
def test_retrieval_heads_on_other_batches_match_transformers(fixed, itm, texts):
    """Batches the fixture does not have: ITC of 2 images against 1 or 3 padded texts (each image-text score
    the best over the queries; ``logits_per_text`` its transpose) and ITM of 1 or 3 pairs (the head's two
    logits averaged over the queries) are transformers'."""
    model, _, _, d = fixed("Blip2ForImageTextRetrieval")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(d).eval()
    rng = np.random.default_rng(texts + 10 * itm)
    text = rng.integers(3, 80, (texts, 5))
    ids = np.concatenate([np.full((texts, Q), model.config.image_token_index), text], 1).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, -2:] = 0                                               # the last text is padded
    pv = _pixels(texts if itm else 2, seed=texts)
    with torch.no_grad():
        ref = hf(pixel_values=t(pv), input_ids=t(ids), attention_mask=t(mask), use_image_text_matching_head=itm)
    out = model(pixel_values=pv, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
    assert out.logits_per_image.shape == ((texts, 2) if itm else (2, texts))
    close(out.logits_per_image, ref.logits_per_image)
    close(out.logits_per_text, ref.logits_per_image.T if itm else ref.logits_per_text)


def test_qformer_with_text_masks_and_maps(tmp_path):
    """Queries + text, a padded text row and a padded image row, hidden states and attention maps."""
    hf = _scramble(transformers.Blip2QFormerModel(blip2_config(**SMALL).qformer_config), seed=2)
    hf.save_pretrained(str(tmp_path))
    ours = J.Blip2QFormerModel.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, Q + 5, 32)).astype(np.float32)
    image = rng.standard_normal((2, 17, 32)).astype(np.float32)
    mask, image_mask = np.ones((2, Q + 5), np.int64), np.ones((2, 17), np.int64)
    mask[1, -2:], image_mask[0, 12:] = 0, 0
    kw = dict(query_length=Q, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = hf(query_embeds=t(x), attention_mask=t(mask), encoder_hidden_states=t(image),
                 encoder_attention_mask=t(image_mask), **kw)
    out = ours(query_embeds=x, attention_mask=mask, encoder_hidden_states=image, encoder_attention_mask=image_mask,
               **kw)
    close(out.last_hidden_state, ref.last_hidden_state)
    close(out.pooler_output, ref.pooler_output)
    # transformers 4.57's recorder also files cross-attention maps under `attentions`: keep its self-attention ones
    ref_self = tuple(a for a in ref.attentions if a.shape[-1] == Q + 5)
    for name, theirs in (("hidden_states", ref.hidden_states), ("attentions", ref_self),
                         ("cross_attentions", ref.cross_attentions)):
        assert len(out[name]) == len(theirs) > 0, name
        for a, b in zip(out[name], theirs):
            close(a, b)


@pytest.mark.parametrize("frequency", [2, 1], ids=["cross_every_second", "cross_every_layer"])
def test_qformer_ignores_masked_image_positions(tmp_path, frequency):
    """encoder_attention_mask takes image positions out of every cross-attention: the queries' outputs are
    transformers', and replacing the masked image states changes nothing."""
    qc = blip2_config(**dict(SMALL, qformer=dict(SMALL["qformer"], cross_attention_frequency=frequency)))
    hf = _scramble(transformers.Blip2QFormerModel(qc.qformer_config), seed=3)
    hf.save_pretrained(str(tmp_path))
    ours = J.Blip2QFormerModel.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, Q, 32)).astype(np.float32)
    image = rng.standard_normal((2, 17, 32)).astype(np.float32)
    image_mask = np.ones((2, 17), np.int64)
    image_mask[0, 9:], image_mask[1, 3:] = 0, 0
    with torch.no_grad():
        ref = hf(query_embeds=t(x), encoder_hidden_states=t(image), encoder_attention_mask=t(image_mask))
        unmasked = hf(query_embeds=t(x), encoder_hidden_states=t(image))
    other = image.copy()
    other[image_mask == 0] = 3.0 * rng.standard_normal(other[image_mask == 0].shape)
    close(ours(query_embeds=x, encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state,
          ref.last_hidden_state)
    close(ours(query_embeds=x, encoder_hidden_states=other, encoder_attention_mask=image_mask).last_hidden_state,
          ref.last_hidden_state)
    assert max_abs_diff(unmasked.last_hidden_state, ref.last_hidden_state) > 1e-3     # the mask matters here


def test_seeded_init_and_files_transformers_reads(fixed, tmp_path):
    model, inputs, _, d = fixed("Blip2ForConditionalGeneration")
    a, b, c = (J.Blip2ForConditionalGeneration(model.config, seed=s) for s in (3, 3, 4))
    leaves = [jax.tree_util.tree_leaves(m.params) for m in (a, b, c)]
    assert all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[2]))
    assert np.isfinite(np.asarray(a(**inputs).logits)).all()          # the fixture's compiled program
    model.save_pretrained(str(tmp_path / "m"), max_shard_size="60KB")
    assert os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "m")).eval()
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    assert all(torch.equal(ref_state[k], back_state[k]) for k in ref_state)
    again = J.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "m"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(model.params),
                                                    jax.tree_util.tree_leaves(again.params)))


def _touch(m, pv, ids, mask):
    """Runs every submodule of a Blip2Module (for ``init``)."""
    qc, out = m.config.qformer_config, []
    text = 2 if qc.use_qformer_text_input else 0      # the text feed-forward may exist unused (Blip2Model)
    out.append(m.qformer(jnp.zeros((2, Q + text, qc.hidden_size)), None, jnp.zeros((2, 5, qc.encoder_hidden_size)),
                         None, Q, jnp.float32))
    if hasattr(m, "vision_model"):
        out.append(m.image_queries(pv, False, jnp.float32))
    if hasattr(m, "embeddings"):
        out.append(m.qformer(m.embeddings(ids), mask, None, None, 0, jnp.float32))
    for name in ("vision_projection", "text_projection", "itm_head"):
        if hasattr(m, name):
            out.append(getattr(m, name)(jnp.zeros((1, m.config.qformer_config.hidden_size))))
    if hasattr(m, "language_model"):
        embeds, full = m.fuse(m.language_inputs(pv, False, jnp.float32)[0], ids, mask)
        out.append(m.run_language_model(embeds, full, ids, mask, None))
    return out


@pytest.mark.parametrize("name", ["Blip2Model", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
                                  "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"])
def test_param_tree_is_the_weight_table(fixed, name):
    model, inputs, _, _ = fixed(name)
    ids = jnp.full((2, Q + 3), model.config.image_token_index or 5, jnp.int32).at[:, Q:].set(5)
    args = (jnp.zeros((2, 3, 32, 32)), ids, jnp.ones(ids.shape, jnp.int32))
    shapes = jax.eval_shape(lambda: model.module.init(jax.random.key(0), *args, method=_touch))
    got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    assert got == {s.backend_path("jax"): s.backend_shape("jax") for s in owned(weight_table(name, model.config))}


def test_missing_placeholders_raise(fixed):
    model, inputs, _, _ = fixed("Blip2ForConditionalGeneration")
    ids = np.where(inputs["input_ids"] == model.config.image_token_index, 5, inputs["input_ids"])
    for call in (lambda: model(pixel_values=inputs["pixel_values"], input_ids=ids),
                 lambda: model.decoding_context(pixel_values=inputs["pixel_values"], input_ids=ids),
                 lambda: model(pixel_values=inputs["pixel_values"], input_ids=ids[:, 1:])):
        with pytest.raises(ValueError, match="placeholder"):
            call()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"] + 200)


def test_interpolate_pos_encoding(fixed):
    model, _, _, d = fixed("Blip2VisionModelWithProjection")
    hf = transformers.Blip2VisionModelWithProjection.from_pretrained(d).eval()
    px = _pixels(size=(48, 40), seed=3)
    with torch.no_grad():
        ref = hf(pixel_values=t(px), interpolate_pos_encoding=True)
    out = model(pixel_values=px, interpolate_pos_encoding=True)
    close(out.image_embeds, ref.image_embeds)
    close(out.last_hidden_state, ref.last_hidden_state)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(pixel_values=px)


# -- conditional generation built here: T5 with placeholders, OPT concatenating ---------------------------
def _case_inputs(case, seed=0):
    placeholders = CASES[case].get("image_token_index") is not None
    full_ids, full_mask = _prompt([5, 3], 6, seed=seed)
    ids, mask = (full_ids, full_mask) if placeholders else (full_ids[:, Q:], full_mask[:, Q:])
    if CASES[case]["text"]["model_type"] == "t5":
        labels = np.random.default_rng(seed + 1).integers(0, 99, (2, 5))
        labels[1, 3:] = -100
    else:
        labels = np.where(full_mask[:, Q:] == 1, full_ids[:, Q:], -100)
    return _pixels(seed=seed), ids, mask, full_ids, full_mask, labels


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_loss_match_transformers_and_torch(built, case):
    ref_model, ours, torch_model, _ = built(case)
    px, ids, mask, full_ids, full_mask, labels = _case_inputs(case)
    with torch.no_grad():
        ref = ref_model(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask), labels=t(labels))
        tb = torch_model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    real = None if CASES[case]["text"]["model_type"] == "t5" else full_mask[:, Q:] == 1
    assert out.logits.shape == tuple(ref.logits.shape)
    for other in (ref, tb):
        close(out.logits, other.logits, where=real)
        close(out.loss, other.loss)
        close(out.qformer_outputs.last_hidden_state, other.qformer_outputs.last_hidden_state)
        close(out.vision_outputs.last_hidden_state, other.vision_outputs.last_hidden_state)
    st = ours.stages(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    tst = torch_model.stages(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert set(st) == set(tst)
    for name in ("vision", "vision_pooled", "qformer", "projection", "loss"):
        close(st[name], tst[name])
    close(st["logits"], tst["logits"], where=real)
    if case == "t5_placeholders":     # inputs_embeds: the placeholders are the rows equal to the image token's
        with torch.no_grad():
            embeds = torch_model.get_input_embeddings()(t(ids)).numpy()
        close(ours(pixel_values=px, inputs_embeds=embeds, attention_mask=mask, labels=labels).logits, ref.logits)
        embeds[0, 0] += 1.0
        with pytest.raises(ValueError, match="placeholder"):
            ours(pixel_values=px, inputs_embeds=embeds, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("cls_name", ["Blip2ForConditionalGeneration", "Blip2Model"])
def test_t5_encoder_hidden_states_without_attention_maps(built, cls_name):
    """output_hidden_states alone returns the T5 encoder's and decoder's hidden states (and no attention maps),
    as transformers."""
    ref_model, gen, _, path = built("t5_placeholders")
    model = gen if cls_name == "Blip2ForConditionalGeneration" else J.Blip2Model.from_pretrained(path)
    px, ids, mask, full_ids, full_mask, labels = _case_inputs("t5_placeholders")
    with torch.no_grad():
        ref = ref_model(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask), labels=t(labels),
                        output_hidden_states=True).language_model_outputs
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels,
                output_hidden_states=True).language_model_outputs
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert getattr(out, name) is None and getattr(ref, name) is None, name
    for name, where in (("encoder_hidden_states", full_mask == 1), ("decoder_hidden_states", None)):
        theirs, mine = getattr(ref, name), getattr(out, name)
        assert mine is not None and len(mine) == len(theirs) > 0, name
        for a, b in zip(mine, theirs):
            close(a, b, where=where)


@pytest.mark.parametrize("how", ["built", "cast"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_rule_of_built_and_cast_models(fixed, dtype, how):
    """A model built in, or cast to, a half dtype follows transformers' rule (its ``_keep_in_fp32_modules``,
    applied when transformers loads in that dtype): the Q-Former and the query tokens stay float32 in float16
    only; in bfloat16 every parameter is bfloat16."""
    model, _, _, d = fixed("Blip2ForConditionalGeneration")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(d, torch_dtype=getattr(torch, dtype))
    want = {"qformer": hf.qformer.layernorm.weight.dtype, "query_tokens": hf.query_tokens.dtype,
            "vision_model": hf.vision_model.post_layernorm.weight.dtype,
            "language_model": hf.language_model.lm_head.weight.dtype}
    half = J.Blip2ForConditionalGeneration(model.config, seed=0, dtype=dtype) if how == "built" else \
        model.astype(dtype)
    for key, torch_dtype in want.items():
        name = str(torch_dtype).replace("torch.", "")
        assert {str(a.dtype) for a in jax.tree_util.tree_leaves(half.params[key])} == {name}, key


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "opt_concat" else c
                                  for c in sorted(CASES)])
def test_loss_gradients_match_transformers(built, case):
    ref_model, ours, _, _ = built(case)
    px, ids, mask, full_ids, full_mask, labels = _case_inputs(case, seed=1)
    _grad_parity(ref_model, ours,
                 lambda p, x, i, m, y: ours(pixel_values=x, input_ids=i, attention_mask=m, labels=y, params=p).loss,
                 lambda: ref_model(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask),
                                   labels=t(labels)).loss,
                 px, ids, mask, labels)


def test_blip2_model_feature_getters_match_torch(fixed):
    model, inputs, _, d = fixed("Blip2Model")
    tm = TB.Blip2Model.from_pretrained(d)
    px, ids, mask, dec = (inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids"))
    with torch.no_grad():
        close(model.get_text_features(input_ids=ids[:, Q:], attention_mask=mask[:, Q:], decoder_input_ids=dec,
                                      legacy_output=False),
              tm.get_text_features(input_ids=ids[:, Q:], attention_mask=mask[:, Q:], decoder_input_ids=dec,
                                   legacy_output=False))
        close(model.get_image_features(px, legacy_output=False), tm.get_image_features(px, legacy_output=False))
        close(model.get_qformer_features(px, legacy_output=False), tm.get_qformer_features(px, legacy_output=False))
    # OPT: the fixture of Blip2ForConditionalGeneration holds the same weight table as a Blip2Model
    gen_model, gen_inputs, _, gen_dir = fixed("Blip2ForConditionalGeneration")
    opt_model, opt_torch = J.Blip2Model.from_pretrained(gen_dir), TB.Blip2Model.from_pretrained(gen_dir)
    ids, mask = gen_inputs["input_ids"][:, Q + 2:], gen_inputs["attention_mask"][:, Q + 2:]
    with torch.no_grad():
        close(opt_model.get_text_features(input_ids=ids, attention_mask=mask, legacy_output=False),
              opt_torch.get_text_features(input_ids=ids, attention_mask=mask, legacy_output=False))
        projected, vision, qformer = gen_model.get_image_features(gen_inputs["pixel_values"], return_dict=True)
        ref = opt_torch.get_qformer_features(gen_inputs["pixel_values"])
    close(qformer.last_hidden_state, ref.last_hidden_state)
    assert projected.shape == (2, Q, 32) and vision.last_hidden_state.shape == (2, 17, 32)


def test_relative_position_bucket_matches_transformers():
    from backends.jax.t5 import relative_position_bucket
    rel = np.arange(-300, 300)[None, :]
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 12)):
            want = bucket(t(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md).numpy()
            got = relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional, nb, md)
            assert (np.asarray(got) == want).all()


# -- half precision ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_half_precision_against_float32(built, dtype):
    _, ours, _, path = built("t5_placeholders")
    half = J.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    kept = jnp.float32 if dtype == "float16" else jnp.dtype(dtype)    # transformers' float16-only rule
    assert half.params["query_tokens"].dtype == kept
    assert all(a.dtype == kept for a in jax.tree_util.tree_leaves(half.params["qformer"]))
    assert all(a.dtype == jnp.dtype(dtype) for k in ("vision_model", "language_model", "language_projection")
               for a in jax.tree_util.tree_leaves(half.params[k]))
    px, ids, mask, _, _, labels = _case_inputs("t5_placeholders")
    ref = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    out = half(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == jnp.dtype(dtype) and np.isfinite(float(out.loss))
    assert out.qformer_outputs.last_hidden_state.dtype == kept
    for got, want in ((out.logits, ref.logits), (out.qformer_outputs.last_hidden_state,
                                                 ref.qformer_outputs.last_hidden_state)):
        atol, rtol = effective_tolerance(want, "default", dtype)
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.all(np.abs(got - want) <= atol + rtol * np.abs(want)), np.abs(got - want).max()
    if dtype == "float16":    # float32 Q-Former meets float16 towers and caches inside the compiled loop
        ids_out = np.asarray(half.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                           num_beams=2))
        assert ids_out.shape[0] == 2 and ids_out[:, 0].tolist() == [0, 0] and ids_out.max() < 99


def test_import_loads_no_other_framework():
    code = ("import sys, backends.jax; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'transformers')]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
