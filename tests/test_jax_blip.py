"""JAX/Flax BLIP against transformers 4.57 PyTorch on tiny random models.

Reference models are built by transformers from ``hf_configs``, their weights scrambled (so every input
matters), saved in Hugging Face format and loaded by ``backends.jax``. Goldens always come from
transformers, never from the code under test. Tests run under JAX strict dtype promotion and "highest"
matmul precision (on CPU float32 matmuls are exact anyway; the setting keeps the tests meaningful on GPU).
"""
import os
import subprocess
import sys

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

from blip_core.configs import BlipConfig, BlipVisionConfig
from blip_core.numerics import max_abs_diff, tolerance
from blip_core.weights import owned, weight_table

from fixture_utils import fixture, require
torch = require("torch")
transformers = require("transformers")

import backends.jax as J  # noqa: E402
from backends.jax.vision import interpolate_positions  # noqa: E402
from hf_configs import blip_config  # noqa: E402

ATOL = tolerance("default", "float32")[0]
CLASSES = ["BlipModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]


@pytest.fixture(autouse=True)
def strict_numerics():
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        yield


# -- shared helpers (also used by test_jax_generation.py) ----------------------------------------------
def scramble(model, seed=0, std=0.2):
    """Give a transformers model non-trivial weights: random weights/biases, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name or "layer_norm" in name and name.endswith("weight") or \
                    "post_layernorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("logit_scale"):
                p.fill_(1.5)
            else:
                p.copy_(std * noise)
    return model.eval()


def build(cls_name, path, seed=0, config=None, **cfg_kw):
    """A scrambled transformers model saved at ``path``; returns (hf_model, jax_model)."""
    config = config or blip_config(**cfg_kw)
    if cls_name == "BlipVisionModel":
        config = config.vision_config
    elif cls_name == "BlipTextModel":
        config = config.text_config
    torch.manual_seed(seed)
    hf = scramble(getattr(transformers, cls_name)(config), seed)
    hf.save_pretrained(path)
    return hf, getattr(J, cls_name).from_pretrained(path)


def inputs(batch=2, length=7, seed=0, pad_row=True, size=32):
    rng = np.random.default_rng(seed)
    pv = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(1, 96, size=(batch, length)).astype(np.int64)
    ids[:, 0] = 96
    mask = np.ones_like(ids)
    if pad_row and batch > 1:
        mask[-1, length - 2:] = 0
        ids[-1, length - 2:] = 0
    return pv, ids, mask


def t(x):
    return torch.from_numpy(np.asarray(x))


def close(ours, ref, atol=ATOL):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    diff = max_abs_diff(ours, ref)
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_blip")
    return {name: build(name, str(root / name)) for name in CLASSES + ["BlipVisionModel", "BlipTextModel"]}


# -- structure -------------------------------------------------------------------------------------------
def _touch_everything(name):
    """A function for ``module.init`` that runs every submodule of class ``name``."""
    from backends.jax.text import encode_text

    def run(m, pv, ids, mask):
        if name == "BlipVisionModel":
            return m(pv)
        if name == "BlipTextModel":
            return encode_text(m, ids, mask, False, context=jnp.zeros((2, 3, 32)))
        img, pooled = m.vision_model(pv)
        if name == "BlipModel":
            h = encode_text(m.text_model, ids, mask, False, context=img)[1]
            return m.visual_projection(pooled), m.text_projection(h), m.logit_scale
        if name == "BlipForConditionalGeneration":
            return encode_text(m.text_decoder, ids, mask, True, context=img)
        q = encode_text(m.text_encoder, ids, mask, False, context=img)[0]
        if name == "BlipForImageTextRetrieval":
            return m.itm_head(q), m.vision_proj(img), m.text_proj(q)
        return encode_text(m.text_decoder, ids, mask, True, context=q)
    return run


@pytest.mark.parametrize("name", CLASSES + ["BlipVisionModel", "BlipTextModel"])
def test_param_tree_is_the_weight_table(models, name):
    """The linen module's own param tree (from ``init``) has exactly the table's jax paths and shapes."""
    from flax import traverse_util
    model = models[name][1]
    pv, ids, mask = inputs()
    args = (jnp.asarray(pv), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    shapes = jax.eval_shape(lambda: model.module.init(jax.random.key(0), *args, method=_touch_everything(name)))
    got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    want = {s.backend_path("jax"): s.backend_shape("jax") for s in owned(weight_table(name, model.config))}
    assert got == want


def test_random_init_is_seeded():
    cfg = J.BlipForConditionalGeneration.config_class.from_dict(blip_config().to_dict())
    a, b, c = (J.BlipForConditionalGeneration(cfg, seed=s) for s in (0, 0, 1))
    la, lb, lc = (jax.tree_util.tree_leaves(m.params) for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not all(np.array_equal(x, y) for x, y in zip(la, lc))
    pv, ids, mask = inputs()
    assert np.isfinite(np.asarray(a(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=ids).logits)).all()


# -- forward parity --------------------------------------------------------------------------------------
def test_vision_parity(models):
    hf, ours = models["BlipVisionModel"]
    pv, _, _ = inputs()
    ref = hf(pixel_values=t(pv))
    out = ours(pixel_values=pv)
    close(out.last_hidden_state, ref.last_hidden_state)
    close(out.pooler_output, ref.pooler_output)


def test_position_interpolation_is_torch_bicubic():
    rng = np.random.default_rng(0)
    for g, (h, w) in [(4, (6, 5)), (4, (3, 2)), (7, (12, 9)), (5, (5, 8))]:
        table = rng.normal(size=(1, 1 + g * g, 3)).astype(np.float32)
        grid = t(table[0, 1:].reshape(g, g, 3).transpose(2, 0, 1)[None].copy())
        ref = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        ref = np.concatenate([table[:, :1], ref[0].permute(1, 2, 0).reshape(1, h * w, 3).numpy()], axis=1)
        ours = interpolate_positions(jnp.asarray(table), h, w)
        assert max_abs_diff(ours, ref) <= ATOL
        # the check discriminates: jax.image.resize's cubic kernel is a different one
        other = jax.image.resize(grid.numpy(), (1, 3, h, w), "cubic", antialias=False)
        assert max_abs_diff(other, ref[0, 1:].reshape(h, w, 3).transpose(2, 0, 1)[None]) > 1e-3


@pytest.mark.parametrize("size", [(64, 16), (16, 64)], ids=["8x2", "2x8"])
def test_non_square_grid_of_the_tables_patch_count_is_resized(models, size):
    """A non-square image with as many patches as the 4x4 table (an 8x2 or 2x8 grid) gets its positions resized
    to its own grid, as transformers: only the square grid of that count keeps the table."""
    hf, ours = models["BlipVisionModel"]
    pv = np.random.default_rng(4).normal(size=(2, 3) + size).astype(np.float32)
    ref = hf(pixel_values=t(pv), interpolate_pos_encoding=True)
    out = ours(pixel_values=pv, interpolate_pos_encoding=True)
    close(out.last_hidden_state, ref.last_hidden_state)
    close(out.pooler_output, ref.pooler_output)


def test_interpolate_pos_encoding_parity(models):
    hf, ours = models["BlipForConditionalGeneration"]
    rng = np.random.default_rng(1)
    pv = rng.normal(size=(1, 3, 48, 40)).astype(np.float32)
    ids = np.array([[96, 5, 6, 7]])
    ref = hf(pixel_values=t(pv), input_ids=t(ids), interpolate_pos_encoding=True)
    out = ours(pixel_values=pv, input_ids=ids, interpolate_pos_encoding=True)
    close(out.image_embeds, ref.image_embeds)
    close(out.logits, ref.logits)


def test_text_model_parity(models):
    hf, ours = models["BlipTextModel"]
    _, ids, mask = inputs()
    for is_decoder in (False, True):
        ref = hf(input_ids=t(ids), attention_mask=t(mask), is_decoder=is_decoder)
        out = ours(input_ids=ids, attention_mask=mask, is_decoder=is_decoder)
        close(out.last_hidden_state, ref.last_hidden_state)
        close(out.pooler_output, ref.pooler_output)
    enc = np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
    ref = hf(input_ids=t(ids), attention_mask=t(mask), encoder_hidden_states=t(enc))
    close(ours(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc).last_hidden_state, ref.last_hidden_state)


def test_blip_model_parity(models):
    hf, ours = models["BlipModel"]
    pv, ids, mask = inputs()
    ref = hf(input_ids=t(ids), pixel_values=t(pv), attention_mask=t(mask), return_loss=True)
    out = ours(input_ids=ids, pixel_values=pv, attention_mask=mask, return_loss=True)
    for field in ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        close(out[field], ref[field])
    close(out.text_model_output.pooler_output, ref.text_model_output.pooler_output)
    close(out.vision_model_output.pooler_output, ref.vision_model_output.pooler_output)
    close(ours.get_text_features(input_ids=ids, attention_mask=mask),
          hf.get_text_features(input_ids=t(ids), attention_mask=t(mask)))
    close(ours.get_image_features(pixel_values=pv), hf.get_image_features(pixel_values=t(pv)))
    close(ours.get_multimodal_features(input_ids=ids, pixel_values=pv, attention_mask=mask),
          hf.get_multimodal_features(input_ids=t(ids), pixel_values=t(pv), attention_mask=t(mask)))
    assert set(ours.stages(input_ids=ids, pixel_values=pv)) >= {"vision", "text", "logits_per_image"}


def test_captioning_parity(models):
    hf, ours = models["BlipForConditionalGeneration"]
    pv, ids, mask = inputs()
    labels = ids.copy()
    labels[mask == 0] = -100
    ref = hf(pixel_values=t(pv), input_ids=t(ids), attention_mask=t(mask), labels=t(labels))
    out = ours(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=labels)
    for field in ("loss", "logits", "image_embeds", "last_hidden_state"):
        close(out[field], ref[field])
    st = ours.stages(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=labels)
    assert set(st) == {"vision", "lm_hidden", "logits", "loss"}


def test_retrieval_parity(models):
    hf, ours = models["BlipForImageTextRetrieval"]
    pv, ids, mask = inputs()
    for use_itm_head in (True, False):
        ref = hf(input_ids=t(ids), pixel_values=t(pv), attention_mask=t(mask), use_itm_head=use_itm_head)
        out = ours(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=use_itm_head)
        assert out.itm_score.shape == ((2, 2) if use_itm_head else (2, 2))
        close(out.itm_score, ref.itm_score)
        close(out.question_embeds, ref.question_embeds)
        close(out.last_hidden_state, ref.last_hidden_state)


def test_vqa_parity(models):
    hf, ours = models["BlipForQuestionAnswering"]
    pv, ids, _ = inputs(pad_row=False)          # unpadded question: transformers' missing cross mask is moot
    answers = np.array([[96, 11, 12, 97], [96, 13, 97, 0]])
    ref = hf(input_ids=t(ids), pixel_values=t(pv), labels=t(answers))
    out = ours(input_ids=ids, pixel_values=pv, labels=answers)
    close(out.loss, ref.loss)
    close(out.image_embeds, ref.image_embeds)
    q = hf.text_encoder(input_ids=t(ids), encoder_hidden_states=ref.image_embeds).last_hidden_state
    ref_logits = hf.text_decoder(input_ids=t(answers), encoder_hidden_states=q).logits
    st = ours.stages(input_ids=ids, pixel_values=pv, labels=answers)    # labels double as decoder inputs
    close(st["text"], q)
    close(st["logits"], ref_logits)


def test_label_smoothing_loss_matches_torch():
    from backends.jax.text import lm_loss
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 6))
    labels[0, 3] = labels[1, 5] = -100
    for eps in (0.0, 0.1):
        ref = torch.nn.functional.cross_entropy(t(logits[:, :-1]).reshape(-1, 11), t(labels[:, 1:]).reshape(-1),
                                                label_smoothing=eps)
        assert abs(float(lm_loss(jnp.asarray(logits), jnp.asarray(labels), eps)) - ref.item()) <= 1e-6


# -- gradients -------------------------------------------------------------------------------------------
def _grad_parity(hf, ours, loss_of_jax, loss_of_torch, *arrays):
    """jax.grad of our loss against torch autograd, every parameter: max|diff| <= 1e-4 * scale.

    scale is the tensor's largest torch gradient, floored at 1e-3 of the largest gradient of the model, so
    that gradients which are zero up to rounding (attention key biases: softmax ignores a per-query shift)
    are compared at that floor instead of against their own noise.
    """
    from flax import traverse_util
    hf.zero_grad()
    loss_of_torch().backward()
    # jit over params *and* inputs: the public forward also works on traced inputs inside a user's jit
    grads = jax.jit(jax.grad(loss_of_jax))(ours.params, *(jnp.asarray(a) for a in arrays))
    flat = traverse_util.flatten_dict(grads)
    named = dict(hf.named_parameters())
    rows = owned(weight_table(type(ours).__name__, ours.config))
    refs = {s.name: (named[s.name].grad.numpy() if named[s.name].grad is not None else np.zeros(s.shape, np.float32))
            for s in rows}
    floor = 1e-3 * max(float(np.abs(r).max()) for r in refs.values())
    assert floor > 0
    for spec in rows:
        ref = refs[spec.name]
        got = spec.from_backend("jax", np.asarray(flat[spec.backend_path("jax")]))
        scale = max(float(np.abs(ref).max()), floor)
        assert np.abs(got - ref).max() <= 1e-4 * scale, spec.name
    assert len(flat) == len(rows)


def test_captioning_gradients(models):
    hf, ours = models["BlipForConditionalGeneration"]
    pv, ids, mask = inputs()
    labels = np.where(mask == 1, ids, -100)
    _grad_parity(hf, ours, lambda p, x, i, m, y: ours(pixel_values=x, input_ids=i, attention_mask=m, labels=y,
                                                      params=p).loss,
                 lambda: hf(pixel_values=t(pv), input_ids=t(ids), attention_mask=t(mask), labels=t(labels)).loss,
                 pv, ids, mask, labels)


@pytest.mark.slow
def test_vqa_gradients(models):
    hf, ours = models["BlipForQuestionAnswering"]
    pv, ids, _ = inputs(pad_row=False)
    answers = np.array([[96, 11, 12, 97], [96, 13, 97, 0]])
    _grad_parity(hf, ours, lambda p, x, i, y: ours(input_ids=i, pixel_values=x, labels=y, params=p).loss,
                 lambda: hf(input_ids=t(ids), pixel_values=t(pv), labels=t(answers)).loss, pv, ids, answers)


@pytest.mark.slow
def test_contrastive_gradients(models):
    hf, ours = models["BlipModel"]
    pv, ids, mask = inputs()
    _grad_parity(hf, ours, lambda p, x, i, m: ours(input_ids=i, pixel_values=x, attention_mask=m, return_loss=True,
                                                   params=p).loss,
                 lambda: hf(input_ids=t(ids), pixel_values=t(pv), attention_mask=t(mask), return_loss=True).loss,
                 pv, ids, mask)


# -- files, dtypes, errors, imports --------------------------------------------------------------------
def test_save_pretrained_loads_in_transformers(models, tmp_path):
    hf, ours = models["BlipForConditionalGeneration"]
    ours.save_pretrained(str(tmp_path))
    back = transformers.BlipForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    pv, ids, mask = inputs()
    close(ours(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=ids).logits,
          back(pixel_values=t(pv), input_ids=t(ids), attention_mask=t(mask)).logits)
    for name, p in hf.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    again = J.BlipForConditionalGeneration.from_pretrained(str(tmp_path))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours.params),
                                                    jax.tree_util.tree_leaves(again.params)))


def test_bfloat16_forward(models, tmp_path):
    hf, ours = models["BlipForConditionalGeneration"]
    ours.save_pretrained(str(tmp_path))
    half = J.BlipForConditionalGeneration.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(half.params))
    pv, ids, mask = inputs()
    out = half(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == jnp.bfloat16 and np.isfinite(float(out.loss))
    ref = ours(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=ids)
    assert abs(float(out.loss) - float(ref.loss)) <= 5e-2 * abs(float(ref.loss))
    grads = jax.grad(lambda p: half(pixel_values=pv, input_ids=ids, labels=ids, params=p).loss.astype(jnp.float32))(
        half.params)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree_util.tree_leaves(grads))


def test_bad_inputs_raise(models):
    _, cap = models["BlipForConditionalGeneration"]
    _, vqa = models["BlipForQuestionAnswering"]
    pv, ids, mask = inputs()
    bad = [
        lambda: cap(pixel_values=pv[:, :, :16], input_ids=ids),                       # wrong size
        lambda: cap(pixel_values=pv[:, :2], input_ids=ids),                           # 2 channels
        lambda: cap(pixel_values=pv[0], input_ids=ids),                               # 3-D
        lambda: cap(pixel_values=pv.astype(np.int32), input_ids=ids),                 # integer pixels
        lambda: cap(pixel_values=pv, input_ids=ids + 99),                             # out of vocabulary
        lambda: cap(pixel_values=pv, input_ids=ids.astype(np.float32)),               # float ids
        lambda: cap(pixel_values=pv, input_ids=ids, attention_mask=mask[:, :3]),      # mask shape
        lambda: cap(pixel_values=pv, input_ids=ids[:1]),                              # batch mismatch
        lambda: cap(pixel_values=pv, input_ids=np.ones((2, 41), np.int64)),           # longer than positions
        lambda: cap(pixel_values=np.zeros((1, 3, 36, 36), np.float32), input_ids=ids[:1],
                    interpolate_pos_encoding=True),                                    # not a patch multiple
        lambda: vqa(input_ids=ids, pixel_values=pv),                                  # no labels / decoder ids
        lambda: cap.generate(pixel_values=pv, max_new_tokens=41),                     # beyond positions (1 + 41 - 1 > 40)
        lambda: cap.generate(pixel_values=pv, num_beams=2, num_return_sequences=3),
        lambda: cap.generate(pixel_values=pv, bogus_option=1),
        lambda: J.BlipForConditionalGeneration(BlipVisionConfig()),                   # wrong config class
        lambda: J.BlipForConditionalGeneration.from_pretrained("/nonexistent/dir"),
    ]
    for i, fn in enumerate(bad):
        with pytest.raises((ValueError, FileNotFoundError)):
            fn()
            pytest.fail(f"case {i} did not raise")
    narrow = BlipConfig(text_config=dict(hidden_size=24, num_attention_heads=2),
                        vision_config=dict(hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match="text_config.hidden_size"):   # the config's VQA invariant
        J.BlipForQuestionAnswering(narrow)


def test_import_does_not_load_other_frameworks():
    code = ("import sys, backends.jax; bad = [m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules];"
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_embeddings_normalise_by_the_shared_rule():
    """x / max(||x||, NORM_EPS), as torch's F.normalize and the TF backend: a zero vector stays zero."""
    from backends.jax.blip import _normalize
    from blip_core.numerics import NORM_EPS
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], np.float32)
    got = np.asarray(_normalize(jnp.asarray(x)))
    np.testing.assert_allclose(got, x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS), rtol=1e-6)
    assert np.isfinite(got).all() and not got[1].any()


# -- the weight spec's layouts and the input checks of backends.jax._base --------------------------------------
def test_conv_layout_is_hwio_and_inverts():
    """CONV2D moves torch's OIHW kernel to Flax's HWIO: a jax convolution with the moved kernel is torch's
    conv2d; ``inverse`` undoes it; ``perm`` / ``inverse_perm`` / ``canonical_shape`` describe the same move
    (a non-square kernel, every axis of a different size)."""
    from blip_core.weights.spec import CONV2D, LINEAR
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 2, 4)).astype(np.float32)          # O, I, H, W
    x = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    k = CONV2D.forward(w)
    got = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(k), (1, 1), "VALID",
                                       dimension_numbers=("NCHW", "HWIO", "NCHW"))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    np.testing.assert_array_equal(CONV2D.inverse(k), w)
    np.testing.assert_array_equal(k, w.transpose(CONV2D.perm))
    np.testing.assert_array_equal(k.transpose(CONV2D.inverse_perm), w)
    assert CONV2D.canonical_shape(k.shape) == w.shape
    assert LINEAR.canonical_shape((4, 5)) == (5, 4)


@pytest.mark.parametrize("name", ["BlipVisionModel", "BlipForConditionalGeneration"])
def test_loaded_params_map_back_to_the_table_shapes(name):
    """Every loaded jax param, read back through its row's transform (``canonical_shape``), has the row's
    torch shape, and its array is the checkpoint's tensor moved by ``perm`` (conv patch embedding included)."""
    from flax import traverse_util
    from safetensors.numpy import load_file
    d, _, _ = fixture(name)
    model = getattr(J, name).from_pretrained(d)
    state = load_file(os.path.join(d, "model.safetensors"))
    flat = traverse_util.flatten_dict(model.params)
    rows = owned(weight_table(name, model.config))
    assert any(s.kind == "conv_weight" for s in rows)
    for s in rows:
        arr = np.asarray(flat[s.backend_path("jax")])
        assert s.transform.canonical_shape(arr.shape) == tuple(s.shape) == state[s.name].shape, s.name
        want = state[s.name] if s.transform.perm is None else state[s.name].transpose(s.transform.perm)
        np.testing.assert_array_equal(arr, want, err_msg=s.name)


@pytest.mark.parametrize("name", ["BlipTextModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval"])
def test_a_mask_of_another_shape_than_the_ids_is_refused(name):
    """An attention mask one column longer than the ids is an error, not broadcast or cut."""
    d, inputs, _ = fixture(name)
    model = getattr(J, name).from_pretrained(d)
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="does not match the ids shape"):
        model(**dict(inputs, attention_mask=np.ones((ids.shape[0], ids.shape[1] + 1), np.int64)))


@pytest.mark.parametrize("name", ["BlipTextModel", "BlipForConditionalGeneration"])
def test_ids_as_long_as_the_position_table(name):
    """Ids exactly ``max_position_embeddings`` long run and give transformers' outputs; one more is refused."""
    d, inputs, _ = fixture(name)
    model = getattr(J, name).from_pretrained(d)
    hf = getattr(transformers, name).from_pretrained(d).eval()
    tc = model.config if name == "BlipTextModel" else model.config.text_config
    n = tc.max_position_embeddings
    ids = np.random.default_rng(3).integers(3, tc.vocab_size, (1, n)).astype(np.int64)
    kw = {} if name == "BlipTextModel" else {"pixel_values": inputs["pixel_values"][:1]}
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), **{k: torch.from_numpy(v) for k, v in kw.items()})
    ours = model(input_ids=ids, **kw)
    field = "last_hidden_state" if name == "BlipTextModel" else "logits"
    assert max_abs_diff(ours[field], getattr(ref, field).numpy()) <= ATOL
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=np.concatenate([ids, ids[:, :1]], 1), **kw)
