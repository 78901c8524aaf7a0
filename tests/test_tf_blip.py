"""TensorFlow BLIP against transformers 4.57 PyTorch: every class and output, checkpoints, training, errors.

Reference models are built and saved by transformers (tiny random configs; B varies every width,
the activation and label smoothing), with weights spread wider than the default init so every
input matters. Ours load the same directory. Golden values always come from transformers.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import torch

import backends.tf as B
from blip_core.configs import BlipConfig
from blip_core.numerics import max_abs_diff, tolerance

from fixture_utils import require
transformers = require("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_configs import blip_config, hf_blip_model  # noqa: E402

ATOL = tolerance("default", "float32")[0]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "A": dict(),
    "B": dict(vision=dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=20,
                          image_size=24, patch_size=6),
              text=dict(vocab_size=101, hidden_size=24, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=30, hidden_act="gelu_new", label_smoothing=0.1)),
}
# VQA's answer decoder cross-attends question states through image-width weights: equal widths.
CONFIGS["C"] = dict(CONFIGS["B"], vision=dict(CONFIGS["B"]["vision"], hidden_size=24, num_attention_heads=3))


def hf_model(cls_name, cfg_key, seed=0):
    cfg = blip_config(**CONFIGS[cfg_key])
    return hf_blip_model(cls_name, cfg, seed=seed, spread=0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, directory it saved to) per (class, config), built on first use."""
    cache = {}

    def get(cls_name, cfg_key="A"):
        if (cls_name, cfg_key) not in cache:
            model = hf_model(cls_name, cfg_key)
            d = str(tmp_path_factory.mktemp(f"{cls_name}_{cfg_key}"))
            model.save_pretrained(d)
            cache[cls_name, cfg_key] = (model, d)
        return cache[cls_name, cfg_key]
    return get


def inputs(cfg_key, batch=2, length=7, seed=0, size=None):
    cfg = blip_config(**CONFIGS[cfg_key])
    rng = np.random.default_rng(seed)
    s = size or cfg.vision_config.image_size
    px = rng.standard_normal((batch, 3, s, s)).astype(np.float32)
    ids = rng.integers(1, cfg.text_config.vocab_size - 5, (batch, length)).astype(np.int64)
    ids[:, 0] = cfg.text_config.bos_token_id
    mask = np.ones_like(ids)
    mask[-1, length - 2:] = 0
    return px, ids, mask


def T(x):
    return torch.tensor(np.asarray(x))


def close(ours, ref, what):
    err = max_abs_diff(ours, ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref)
    assert err <= ATOL, f"{what}: max abs diff {err:.3g} > {ATOL}"


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_vision_model(saved, cfg_key):
    ref, d = saved("BlipVisionModel", cfg_key)
    px, _, _ = inputs(cfg_key)
    ours = B.BlipVisionModel.from_pretrained(d)
    out = ours(pixel_values=px)
    with torch.no_grad():
        r = ref(pixel_values=T(px))
    close(out.last_hidden_state, r.last_hidden_state, "last_hidden_state")
    close(out.pooler_output, r.pooler_output, "pooler_output")
    assert set(ours.stages(pixel_values=px)) == {"vision", "vision_pooled"}


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_vision_model_resizes_a_non_square_grid_of_the_tables_patch_count(saved, cfg_key):
    """A non-square image with as many patches as the table (an 8x2 grid from a 4x4 table) gets its positions
    resized to its own grid, as transformers: only the square grid of that count keeps the table."""
    ref, d = saved("BlipVisionModel", cfg_key)
    ours = B.BlipVisionModel.from_pretrained(d)
    cfg = blip_config(**CONFIGS[cfg_key]).vision_config
    g, p = cfg.image_size // cfg.patch_size, cfg.patch_size
    px = np.random.default_rng(4).standard_normal((2, 3, 2 * g * p, g * p // 2)).astype(np.float32)
    out = ours(pixel_values=px, interpolate_pos_encoding=True)
    with torch.no_grad():
        r = ref(pixel_values=T(px), interpolate_pos_encoding=True)
    close(out.last_hidden_state, r.last_hidden_state, "non-square last_hidden_state")
    close(out.pooler_output, r.pooler_output, "non-square pooler_output")


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_text_model(saved, cfg_key):
    ref, d = saved("BlipTextModel", cfg_key)
    px, ids, mask = inputs(cfg_key)
    ours = B.BlipTextModel.from_pretrained(d)
    enc = np.random.default_rng(3).standard_normal((2, 5, ours.config.encoder_hidden_size)).astype(np.float32)
    for kw in (dict(), dict(encoder_hidden_states=enc), dict(encoder_hidden_states=enc, is_decoder=True)):
        out = ours(input_ids=ids, attention_mask=mask, **kw)
        with torch.no_grad():
            r = ref(input_ids=T(ids), attention_mask=T(mask), **{k: T(v) if k != "is_decoder" else v
                                                                  for k, v in kw.items()})
        close(out.last_hidden_state, r.last_hidden_state, f"last_hidden_state {sorted(kw)}")
        close(out.pooler_output, r.pooler_output, f"pooler_output {sorted(kw)}")


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_blip_model(saved, cfg_key):
    ref, d = saved("BlipModel", cfg_key)
    px, ids, mask = inputs(cfg_key)
    ours = B.BlipModel.from_pretrained(d)
    out = ours(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    with torch.no_grad():
        r = ref(input_ids=T(ids), pixel_values=T(px), attention_mask=T(mask), return_loss=True)
        img_f, txt_f = ref.get_image_features(T(px)), ref.get_text_features(T(ids), T(mask))
    for f in ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        close(getattr(out, f), getattr(r, f), f)
    for sub in ("text_model_output", "vision_model_output"):
        for f in ("last_hidden_state", "pooler_output"):
            close(getattr(getattr(out, sub), f), getattr(getattr(r, sub), f), f"{sub}.{f}")
    close(ours.get_image_features(px), img_f, "get_image_features")
    close(ours.get_text_features(ids, mask), txt_f, "get_text_features")
    assert {"vision", "text", "logits_per_image", "loss"} <= set(
        ours.stages(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True))


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_captioning(saved, cfg_key):
    ref, d = saved("BlipForConditionalGeneration", cfg_key)
    px, ids, mask = inputs(cfg_key)
    labels = ids.copy()
    labels[-1, -2:] = -100
    ours = B.BlipForConditionalGeneration.from_pretrained(d)
    out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        r = ref(pixel_values=T(px), input_ids=T(ids), attention_mask=T(mask), labels=T(labels))
    for f in ("loss", "logits", "image_embeds", "last_hidden_state"):
        close(getattr(out, f), getattr(r, f), f)
    st = ours.stages(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert set(st) == {"vision", "lm_hidden", "logits", "loss"}
    close(st["logits"], r.logits, "stages logits")


@pytest.mark.parametrize("cfg_key", ["A", "B"])
def test_retrieval(saved, cfg_key):
    ref, d = saved("BlipForImageTextRetrieval", cfg_key)
    px, ids, mask = inputs(cfg_key)
    ours = B.BlipForImageTextRetrieval.from_pretrained(d)
    for head in (True, False):
        out = ours(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=head)
        with torch.no_grad():
            r = ref(input_ids=T(ids), pixel_values=T(px), attention_mask=T(mask), use_itm_head=head)
        for f in ("itm_score", "last_hidden_state", "question_embeds"):
            close(getattr(out, f), getattr(r, f), f"{f} (itm head {head})")


@pytest.mark.parametrize("cfg_key", ["A", "C"])
def test_question_answering(saved, cfg_key):
    ref, d = saved("BlipForQuestionAnswering", cfg_key)
    px, ids, dec_mask = inputs(cfg_key)
    _, labels, _ = inputs(cfg_key, length=5, seed=1)
    ours = B.BlipForQuestionAnswering.from_pretrained(d)
    # The question is unpadded here: transformers ignores the decoder's cross-attention mask.
    out = ours(input_ids=ids, pixel_values=px, labels=labels)
    st = ours.stages(input_ids=ids, pixel_values=px, decoder_input_ids=labels, decoder_attention_mask=dec_mask[:, :5])
    with torch.no_grad():
        r = ref(input_ids=T(ids), pixel_values=T(px), labels=T(labels))
        img = ref.vision_model(T(px)).last_hidden_state
        q = ref.text_encoder(T(ids), encoder_hidden_states=img).last_hidden_state
        dec = ref.text_decoder(T(labels), attention_mask=T(dec_mask[:, :5]), encoder_hidden_states=q)
    for f in ("loss", "image_embeds", "last_hidden_state"):
        close(getattr(out, f), getattr(r, f), f)
    close(st["text"], q, "question states")
    close(st["logits"], dec.logits, "answer logits")


def test_vqa_padded_question_matches_unpadded(saved):
    """Our decoder masks question padding (transformers 4.57 PyTorch does not): padding changes nothing."""
    _, d = saved("BlipForQuestionAnswering", "A")
    ours = B.BlipForQuestionAnswering.from_pretrained(d)
    px, ids, _ = inputs("A", batch=1, length=5)
    padded = np.concatenate([ids, np.zeros((1, 3), np.int64)], 1)
    mask = np.concatenate([np.ones((1, 5), np.int64), np.zeros((1, 3), np.int64)], 1)
    dec = np.array([[96, 7, 8, 9]])
    a = ours.stages(input_ids=ids, pixel_values=px, decoder_input_ids=dec)["logits"]
    b = ours.stages(input_ids=padded, pixel_values=px, attention_mask=mask, decoder_input_ids=dec)["logits"]
    assert max_abs_diff(a, b) <= ATOL


def test_interpolate_pos_encoding(saved):
    ref, d = saved("BlipForConditionalGeneration", "A")
    ours = B.BlipForConditionalGeneration.from_pretrained(d)
    rng = np.random.default_rng(5)
    px = rng.standard_normal((2, 3, 48, 40)).astype(np.float32)   # 6x5 patches from a 4x4 grid
    ids = np.array([[96, 5, 6, 7], [96, 8, 9, 10]])
    out = ours(pixel_values=px, input_ids=ids, interpolate_pos_encoding=True)
    with torch.no_grad():
        r = ref(pixel_values=T(px), input_ids=T(ids), interpolate_pos_encoding=True)
    close(out.image_embeds, r.image_embeds, "image_embeds (interpolated)")
    close(out.logits, r.logits, "logits (interpolated)")
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixel_values=px, input_ids=ids)


def test_tf_h5_written_by_transformers_tf(saved, tmp_path):
    """transformers' TF BLIP converts our PyTorch checkpoint to tf_model.h5 (losing the LM-head tie
    in its own model); loading that file gives the PyTorch outputs, tie included."""
    ref, d = saved("BlipForConditionalGeneration", "A")
    tf_dir = str(tmp_path / "tf")
    cfg = transformers.BlipConfig.from_pretrained(d)
    cfg.vision_config.num_channels = 3   # TF BLIP's serving signature needs it; hub configs lack it
    tfm = transformers.TFBlipForConditionalGeneration.from_pretrained(d, config=cfg, from_pt=True)
    tfm.save_pretrained(tf_dir)
    assert os.listdir(tf_dir) and not any(f.endswith(".safetensors") for f in os.listdir(tf_dir))
    px, ids, mask = inputs("A")
    out = B.BlipForConditionalGeneration.from_pretrained(tf_dir)(pixel_values=px, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        r = ref(pixel_values=T(px), input_ids=T(ids), attention_mask=T(mask))
    close(out.logits, r.logits, "logits from tf_model.h5")
    # the file really holds transformers' untied (random) decoder: its own TF model is off
    hf_tf_logits = tfm(pixel_values=px, input_ids=ids, attention_mask=mask).logits.numpy()
    assert max_abs_diff(hf_tf_logits, r.logits.numpy()) > 1e-2


def test_bin_needs_opt_in(saved, tmp_path):
    ref, _ = saved("BlipForConditionalGeneration", "A")
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.exists(tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="allow_pickle_bin"):
        B.BlipForConditionalGeneration.from_pretrained(str(tmp_path))
    ours = B.BlipForConditionalGeneration.from_pretrained(str(tmp_path), allow_pickle_bin=True)
    px, ids, _ = inputs("A")
    with torch.no_grad():
        r = ref(pixel_values=T(px), input_ids=T(ids))
    close(ours(pixel_values=px, input_ids=ids).logits, r.logits, "logits from .bin")


def test_save_pretrained_loads_in_transformers(tmp_path):
    cfg = blip_config()
    from blip_core.configs import config_from_dict
    ours = B.BlipForConditionalGeneration(config_from_dict(cfg.to_dict()), seed=3)
    ours.save_pretrained(str(tmp_path))
    ref, info = transformers.BlipForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    px, ids, _ = inputs("A")
    with torch.no_grad():
        r = ref.eval()(pixel_values=T(px), input_ids=T(ids))
    close(ours(pixel_values=px, input_ids=ids).logits, r.logits, "logits after save")
    again = B.BlipForConditionalGeneration.from_pretrained(str(tmp_path))
    assert all(np.array_equal(v.numpy(), again.params[k].numpy()) for k, v in ours.params.items())


def test_tied_lm_head_is_the_embedding(saved):
    _, d = saved("BlipForConditionalGeneration", "A")
    ours = B.BlipForConditionalGeneration.from_pretrained(d)
    head = ours.text_decoder.cls
    assert head.word_embeddings is ours.params["text_decoder/bert/embeddings/word_embeddings/embeddings"]
    assert head.bias is ours.params["text_decoder/cls/predictions/bias"]
    assert not any("decoder/kernel" in p for p in ours.params)
    px, ids, _ = inputs("A")
    before = ours(pixel_values=px, input_ids=ids).logits.numpy()
    head.word_embeddings.assign_add(tf.one_hot([42], head.word_embeddings.shape[0], axis=0)[:, :1]
                                    * tf.ones_like(head.word_embeddings))
    after = ours(pixel_values=px, input_ids=ids).logits.numpy()
    assert np.abs(after[..., 42] - before[..., 42]).max() > 1e-3   # the head reads the edited row


def test_seeded_init():
    from blip_core.configs import config_from_dict
    cfg = config_from_dict(blip_config().to_dict())
    a, b, c = (B.BlipForQuestionAnswering(cfg, seed=s) for s in (0, 0, 1))
    key = "text_encoder/encoder/layer_0/attention/self/query/kernel"
    assert np.array_equal(a.params[key].numpy(), b.params[key].numpy())
    assert not np.array_equal(a.params[key].numpy(), c.params[key].numpy())
    assert np.all(a.params["vision_model/post_layernorm/gamma"].numpy() == 1.0)


def _grads(model, loss_fn):
    names = list(model.params)
    with tf.GradientTape() as tape:
        loss = loss_fn()
    grads = dict(zip(names, tape.gradient(loss, [model.params[n] for n in names])))
    for n, g in grads.items():
        assert g is None or np.isfinite(tf.convert_to_tensor(g).numpy()).all(), n
    return {n for n, g in grads.items() if g is not None}


def test_gradients_for_every_loss(saved):
    px, ids, mask = inputs("A")
    cap = B.BlipForConditionalGeneration.from_pretrained(saved("BlipForConditionalGeneration")[1])
    assert _grads(cap, lambda: cap(pixel_values=px, input_ids=ids, labels=ids).loss) == set(cap.params)
    vqa = B.BlipForQuestionAnswering.from_pretrained(saved("BlipForQuestionAnswering")[1])
    assert _grads(vqa, lambda: vqa(input_ids=ids, pixel_values=px, labels=ids[:, :4]).loss) == set(vqa.params)
    itc = B.BlipModel.from_pretrained(saved("BlipModel")[1])
    got = _grads(itc, lambda: itc(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True).loss)
    assert got == {n for n in itc.params if "crossattention" not in n}   # no image states go in
    itm = B.BlipForImageTextRetrieval.from_pretrained(saved("BlipForImageTextRetrieval")[1])
    got = _grads(itm, lambda: tf.reduce_sum(itm(input_ids=ids, pixel_values=px).itm_score[:, 1]))
    assert got == {n for n in itm.params if not n.startswith(("vision_proj", "text_proj"))}


def test_training_steps_reduce_caption_loss(saved):
    """A few SGD steps inside a tf.function (graph tensors as inputs) lower the captioning loss."""
    model = B.BlipForConditionalGeneration.from_pretrained(saved("BlipForConditionalGeneration")[1])
    px, ids, _ = inputs("A")
    variables = list(model.params.values())
    eager = float(model(pixel_values=px, input_ids=ids, labels=ids).loss)

    @tf.function(autograph=False)
    def step(px, ids):
        with tf.GradientTape() as tape:
            loss = model(pixel_values=px, input_ids=ids, labels=ids).loss
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.05 * tf.convert_to_tensor(g))
        return loss

    losses = [float(step(tf.constant(px), tf.constant(ids))) for _ in range(4)]
    assert abs(losses[0] - eager) <= ATOL
    assert losses[-1] < 0.8 * losses[0], losses


def test_bfloat16_forward(saved):
    _, d = saved("BlipForConditionalGeneration", "A")
    px, ids, _ = inputs("A")
    f32 = B.BlipForConditionalGeneration.from_pretrained(d)(pixel_values=px, input_ids=ids, labels=ids)
    m16 = B.BlipForConditionalGeneration.from_pretrained(d, dtype="bfloat16")
    assert all(v.dtype == tf.bfloat16 for v in m16.params.values())
    out = m16(pixel_values=px, input_ids=ids, labels=ids)
    assert out.logits.dtype == tf.bfloat16
    atol, rtol = tolerance("default", "bfloat16")
    np.testing.assert_allclose(tf.cast(out.logits, tf.float32).numpy(), f32.logits.numpy(), atol=atol, rtol=rtol)
    assert abs(float(out.loss) - float(f32.loss)) <= atol + rtol * abs(float(f32.loss))
    got = _grads(m16, lambda: m16(pixel_values=px, input_ids=ids, labels=ids).loss)   # finite bf16 gradients
    assert got == set(m16.params)


def test_bfloat16_save_keeps_dtype(saved, tmp_path):
    from blip_core.checkpoint import read_safetensors
    m16 = B.BlipForConditionalGeneration.from_pretrained(saved("BlipForConditionalGeneration")[1], dtype="bfloat16")
    m16.save_pretrained(str(tmp_path))
    assert {a.dtype.name for a in read_safetensors(str(tmp_path / "model.safetensors")).values()} == {"bfloat16"}
    again = B.BlipForConditionalGeneration.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert all(np.array_equal(tf.cast(v, tf.float32).numpy(), tf.cast(again.params[k], tf.float32).numpy())
               for k, v in m16.params.items())


def test_bad_inputs_raise(saved):
    cap = B.BlipForConditionalGeneration.from_pretrained(saved("BlipForConditionalGeneration")[1])
    px, ids, mask = inputs("A")
    cases = [
        (dict(pixel_values=px[:, :, :16], input_ids=ids), "interpolate_pos_encoding"),
        (dict(pixel_values=px[:, :1], input_ids=ids), "3 channels"),
        (dict(pixel_values=px, input_ids=np.full_like(ids, 99)), "outside the vocabulary"),
        (dict(pixel_values=px, input_ids=-ids), "outside the vocabulary"),
        (dict(pixel_values=px, input_ids=ids.astype(np.float32)), "integer"),
        (dict(pixel_values=px, input_ids=ids, attention_mask=mask[:, :3]), "attention_mask"),
        (dict(pixel_values=px, input_ids=ids[:1]), "batch"),
        (dict(pixel_values=px, input_ids=ids, labels=ids[:, :3]), "labels"),
        (dict(pixel_values=px), "input_ids"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cap(**kw)
    vqa = B.BlipForQuestionAnswering.from_pretrained(saved("BlipForQuestionAnswering")[1])
    with pytest.raises(ValueError, match="decoder_input_ids"):
        vqa(input_ids=ids, pixel_values=px)
    narrow = BlipConfig(text_config=dict(hidden_size=24, num_attention_heads=2),
                        vision_config=dict(hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match="text_config.hidden_size"):   # the config's VQA invariant
        B.BlipForQuestionAnswering(narrow)
    with pytest.raises(ValueError, match="dtype"):
        B.BlipForConditionalGeneration.from_pretrained(saved("BlipForConditionalGeneration")[1], dtype="int8")


def test_import_does_not_load_torch_or_jax():
    code = ("import sys; import backends.tf; "
            "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-2000:]


def test_embeddings_normalise_by_the_shared_rule():
    """x / max(||x||, NORM_EPS), as torch's F.normalize and the JAX backend: a zero vector stays zero."""
    from backends.tf.blip import _normalize
    from blip_core.numerics import NORM_EPS
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], np.float32)
    got = _normalize(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS), rtol=1e-6)
    assert np.isfinite(got).all() and not got[1].any()
