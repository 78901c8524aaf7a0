"""TensorFlow BLIP-2 training and numerics: losses and GradientTape gradients against backends.torch,
training steps and retrieval inside ``tf.function``, checkpoints (sharded both ways, seeded init) and
bfloat16 against the tolerance table's bfloat16 row.

Shares the tiny models and helpers of ``test_tf_blip2.py``; golden values come from transformers
and the torch backend.
"""
import os

import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers

import backends.tf as B
from backends.torch import blip2 as torch_blip2
from blip_core.numerics import effective_tolerance
from test_tf_blip2 import (ATOL, CASES, FIXTURE_OUTPUTS, IMG, OPT_TEXT, Q, T5_GELU, TEXT_INPUT,  # noqa: F401
                           _case_inputs, _fixture_inputs, _greedy, _is_t5, _pixels, _prompt, _t, blip2_config, close,
                           pair)


# -- training: losses and gradients against the torch backend -------------------------------------
GRAD_PARAMS = ["query_tokens", "qformer.layernorm.weight", "language_projection.weight",
               "vision_model.post_layernorm.weight", "vision_model.embeddings.patch_embedding.weight"]


@pytest.mark.parametrize("case", ["opt_placeholders", "opt_post_ln", "t5_placeholders", "t5_tied_relu_concat"])
def test_loss_gradients_match_torch(pair, case):
    cfg = CASES[case]
    _, me, path = pair("Blip2ForConditionalGeneration", std=0.2, **cfg)
    mine = torch_blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    px = _pixels(seed=15)
    _, _, ids, mask = _case_inputs(cfg, seed=16)
    if _is_t5(cfg):
        labels = np.random.default_rng(17).integers(0, 99, (2, 4))
        lm_params = ["language_model.shared.weight",
                     "language_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        if not cfg["text"].get("tie_word_embeddings"):     # tied: the head is the shared table (its gradient)
            lm_params.append("language_model.lm_head.weight")
    else:
        labels = np.where(mask[:, Q:] == 1, ids[:, Q:], -100)
        lm_params = ["language_model.model.decoder.embed_tokens.weight",
                     "language_model.model.decoder.embed_positions.weight"]
    names = GRAD_PARAMS + lm_params
    loss_t = mine(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_t.backward()
    table = me.table
    variables = [me.params[table[n].backend_path("tf")] for n in names]
    with tf.GradientTape() as tape:
        loss = me(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss
    grads = tape.gradient(loss, variables)
    assert abs(float(loss) - loss_t.item()) <= ATOL
    state = dict(mine.named_parameters())
    for n, g in zip(names, grads):
        ref = state[n].grad.numpy()
        assert np.abs(ref).max() > 0, n
        close(table[n].from_backend("tf", tf.convert_to_tensor(g).numpy()), ref, f"grad {n}")


# -- checkpoints and dtypes ---------------------------------------------------------------------
def test_sharded_checkpoints_both_ways(pair, tmp_path):
    cfg = CASES["t5_placeholders"]
    hf, _, _ = pair("Blip2ForConditionalGeneration", **cfg)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    me = B.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    me.save_pretrained(str(tmp_path / "ours"), max_shard_size="60KB")
    assert os.path.exists(tmp_path / "ours" / "model.safetensors.index.json")
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    ref_state, back_state = hf.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    assert all(torch.equal(ref_state[k], back_state[k]) for k in ref_state)
    ids, mask = _prompt([3, 3], 3)
    with torch.no_grad():
        ref = hf(pixel_values=_t(_pixels()), input_ids=_t(ids), attention_mask=_t(mask),
                 decoder_input_ids=_t(ids[:, -2:])).logits
    close(me(pixel_values=_pixels(), input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, -2:]).logits, ref)


@pytest.mark.parametrize("case", ["opt_placeholders", "t5_placeholders"])
def test_bfloat16_against_float32(pair, case):
    """bfloat16 forward, loss, gradients and steps within the tolerance table's bfloat16 row."""
    cfg = CASES[case]
    _, me32, path = pair("Blip2ForConditionalGeneration", std=0.2, **cfg)
    me16 = B.Blip2ForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    assert all(v.dtype == tf.bfloat16 for v in me16.params.values())
    px = _pixels(seed=13)
    _, _, ids, mask = _case_inputs(cfg, (4, 2), 4, seed=14)
    labels = np.where(mask[:, Q:] == 1, ids[:, Q:], -100) if not _is_t5(cfg) else ids[:, -3:]
    ref = me32(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    with tf.GradientTape() as tape:
        out = me16(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == tf.bfloat16
    real = None if _is_t5(cfg) else mask[:, Q:].astype(bool)
    a, b = np.asarray(tf.cast(out.logits, tf.float32)), ref.logits.numpy()
    if real is not None:
        a, b = a[real], b[real]
    atol, rtol = effective_tolerance(b, "default", "bfloat16")
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)
    atol, rtol = effective_tolerance(ref.loss.numpy(), "default", "bfloat16")
    assert abs(float(out.loss) - float(ref.loss)) <= atol + rtol * abs(float(ref.loss))
    grads = tape.gradient(out.loss, list(me16.params.values()))
    assert all(np.isfinite(tf.cast(tf.convert_to_tensor(g), tf.float32).numpy()).all() for g in grads if g is not None)
    got16, logits16 = _greedy(me16, px, ids, mask, 3)
    _, logits32 = _greedy(me32, px, ids, mask, 3)
    atol, rtol = effective_tolerance(logits32[0].numpy(), "default", "bfloat16")
    np.testing.assert_allclose(logits16[0].numpy(), logits32[0].numpy(), atol=atol, rtol=rtol)
    assert got16.shape[0] == 2 and int(got16.max()) < 99


@pytest.mark.slow
def test_training_steps_in_a_tf_function(pair):
    """A few SGD steps inside a tf.function (graph tensors as inputs) lower the OPT captioning loss."""
    _, _, path = pair("Blip2ForConditionalGeneration", std=0.2, **CASES["opt_placeholders"])
    model = B.Blip2ForConditionalGeneration.from_pretrained(path)
    assert model.language_model.lm_head is None   # tied: the logits use the embedding variable itself
    px = _pixels(seed=18)
    ids, mask = _prompt([4, 3], 4, seed=19)
    labels = np.where(mask[:, Q:] == 1, ids[:, Q:], -100)
    variables = list(model.params.values())
    eager = float(model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss)

    @tf.function(autograph=False)
    def step(px, ids, mask, labels):
        with tf.GradientTape() as tape:
            loss = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.2 * tf.convert_to_tensor(g))
        return loss

    losses = [float(step(*map(tf.constant, (px, ids, mask, labels)))) for _ in range(4)]
    assert abs(losses[0] - eager) <= ATOL
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    with pytest.raises(tf.errors.InvalidArgumentError, match="placeholder"):
        step(*map(tf.constant, (px, np.where(ids == IMG, 5, ids), mask, labels)))


@pytest.mark.slow      # tests/test_low_precision.py holds the default bfloat16 rows against transformers
@pytest.mark.parametrize("name", sorted(FIXTURE_OUTPUTS))
def test_fixture_in_bfloat16(name):
    """Every class loads in bfloat16 and stays within the tolerance table's bfloat16 row of transformers."""
    directory, inputs, reference = _fixture_inputs(name)
    model = getattr(B, name).from_pretrained(directory, dtype="bfloat16")
    assert all(v.dtype == tf.bfloat16 for v in model.params.values())
    out = FIXTURE_OUTPUTS[name](model, inputs)
    for key, ref in reference.items():
        if key == "greedy_ids":
            continue
        got = np.asarray(tf.cast(out[key], tf.float32))
        assert out[key].dtype == tf.bfloat16, key
        atol, rtol = effective_tolerance(ref, "default", "bfloat16")
        np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol, err_msg=f"{name}.{key}")


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_seeded_init_is_the_torch_backends(tmp_path, text):
    """``Cls(config, seed=...)`` draws the spec layer's weights: the same model as backends.torch's,
    saved in transformers' format."""
    from blip_core.configs import config_from_dict
    hf_cfg = blip2_config(text=OPT_TEXT if text == "opt" else T5_GELU, image_token_index=IMG)
    cfg = config_from_dict(hf_cfg.to_dict())
    me = B.Blip2ForConditionalGeneration(cfg, seed=3)
    mine = torch_blip2.Blip2ForConditionalGeneration(cfg, seed=3)
    state = mine.state_dict()
    for name, spec in me.table.items():
        if spec.tied_to is None:
            np.testing.assert_array_equal(spec.from_backend("tf", me.params[spec.backend_path("tf")].numpy()),
                                          state[name].numpy(), err_msg=name)
    me.save_pretrained(str(tmp_path))
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask = _prompt([3, 2], 3)
    dec = dict(decoder_input_ids=ids[:, -2:]) if text == "t5" else {}
    with torch.no_grad():
        ref = back(pixel_values=_t(_pixels()), input_ids=_t(ids), attention_mask=_t(mask),
                   **{k: _t(v) for k, v in dec.items()}).logits
    out = me(pixel_values=_pixels(), input_ids=ids, attention_mask=mask, **dec).logits
    close(out, ref, "logits", mask.astype(bool) if text == "opt" else None)


def test_retrieval_in_a_tf_function(pair):
    """Graph ids: the placeholders are stripped in the graph and their absence is a graph error."""
    hf, me, _ = pair("Blip2ForImageTextRetrieval", image_token_index=IMG, **TEXT_INPUT)
    px = _pixels(seed=22)
    ids, mask = _prompt([6, 4], 6, vocab=99, seed=23)
    fn = tf.function(lambda px, ids, mask: me(pixel_values=px, input_ids=ids, attention_mask=mask,
                                              use_image_text_matching_head=True).logits_per_image, autograph=False)
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), use_image_text_matching_head=True)
    close(fn(*map(tf.constant, (px, ids, mask))), ref.logits_per_image, "itm in a tf.function")
    with pytest.raises(tf.errors.InvalidArgumentError, match="placeholder"):
        fn(*map(tf.constant, (px, np.where(ids == IMG, 5, ids), mask)))
