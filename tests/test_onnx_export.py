"""ONNX export (backends/torch/onnx_export.py) run by blip_runtime's onnxruntime runner, against the torch backend.

Every exported BLIP task on the committed random fixtures and the bundled captioning model: each
stage within the float32 row of the tolerance table (``blip_core.numerics``), generated ids
identical to the torch backend's ``generate`` (greedy, beam, returned sequences, padded prompts and
questions). The reference is the library's torch model, an independent implementation of the
graphs' consumer (the runner's loop is numpy, the graphs are onnxruntime's kernels).
"""
import os

import numpy as np
import pytest

from blip_core import to_numpy
from blip_core.numerics import tolerance

from fixture_utils import ROOT, fixture, require

require("onnxruntime")
torch = require("torch")

ATOL, RTOL = tolerance("default", "float32")
GENERATE = [dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3),
            dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=0.6, repetition_penalty=1.3)]


def _close(got, want):
    np.testing.assert_allclose(got, to_numpy(want), atol=ATOL, rtol=RTOL)


def _same_ids(got, want):
    want = to_numpy(want)
    assert got.shape == want.shape and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def _bundle(tmp_path_factory, name, model_dir=None):
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    model_dir = model_dir or fixture(name)[0]
    model = getattr(bt, name).from_pretrained(model_dir)
    out = export_onnx(model, tmp_path_factory.mktemp(name), processor_dir=model_dir)
    return model, OnnxBlip(out, threads=1)


@pytest.fixture(scope="module")
def caption(tmp_path_factory):
    return _bundle(tmp_path_factory, "BlipForConditionalGeneration")


def test_caption_stages(caption):
    model, runner = caption
    _, inp, _ = fixture("BlipForConditionalGeneration")
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    last, pooled = runner.vision(px)
    ref = model.vision_model(px)
    _close(last, ref.last_hidden_state)
    _close(pooled, ref.pooler_output)
    # the decoder step on the whole text as a prompt: logits of the last position, and the cache it returns
    cross = runner.run("cross_kv", encoder_hidden_states=last)
    step = runner.step_function(masked=False)
    positions = np.where(mask == 0, 1, np.cumsum(mask, 1) - 1)
    logits, cache = step(ids, positions, mask, None, 0, (cross, None))
    want = model.text_decoder(ids, mask, encoder_hidden_states=ref.last_hidden_state, position_ids=positions)
    _close(logits, want.logits[:, -1])
    assert cache[0].shape == (ids.shape[0], model.config.text_config.num_attention_heads, ids.shape[1],
                              model.config.text_config.hidden_size // model.config.text_config.num_attention_heads)


@pytest.mark.parametrize("options", GENERATE, ids=["greedy", "beam3", "beam3_nrs2_penalties"])
def test_caption_ids(caption, options):
    model, runner = caption
    _, inp, _ = fixture("BlipForConditionalGeneration")
    px = inp["pixel_values"]
    _same_ids(runner.generate(px, **options), model.generate(pixel_values=px, **options))


@pytest.mark.parametrize("options", GENERATE[:2], ids=["greedy", "beam3"])
def test_caption_padded_prompt_ids(caption, options):
    """Padded prompt positions hold a real token (7), not pad: only the mask given says they are padding."""
    model, runner = caption
    _, inp, _ = fixture("BlipForConditionalGeneration")
    ids, mask = inp["input_ids"].copy(), inp["attention_mask"].copy()
    mask[1, -3:] = 0
    ids[1, -3:] = 7
    _same_ids(runner.generate(inp["pixel_values"], input_ids=ids, attention_mask=mask, **options),
              model.generate(pixel_values=inp["pixel_values"], input_ids=ids, attention_mask=mask, **options))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    model, runner = _bundle(tmp_path_factory, "BlipForQuestionAnswering")
    _, inp, _ = fixture("BlipForQuestionAnswering")
    mask = inp["attention_mask"].copy()
    mask[0, -2:] = 0                                  # a padded question: the library applies its mask
    return model, runner, inp["pixel_values"], inp["input_ids"], mask


def test_vqa_stages(vqa):
    model, runner, px, ids, mask = vqa
    st = model.stages(ids, px, mask)
    _close(runner.vision(px)[0], st["vision"])
    _close(runner.question_embeds(ids, px, mask), st["text"])


@pytest.mark.parametrize("options", GENERATE, ids=["greedy", "beam3", "beam3_nrs2_penalties"])
def test_vqa_ids(vqa, options):
    model, runner, px, ids, mask = vqa
    _same_ids(runner.generate(ids, px, mask, **options),
              model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, **options))


def test_retrieval_itm_and_itc(tmp_path_factory):
    model, runner = _bundle(tmp_path_factory, "BlipForImageTextRetrieval")
    _, inp, _ = fixture("BlipForImageTextRetrieval")
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"].copy()
    mask[1, -2:] = 0
    for use_itm_head in (True, False):
        _close(runner.itm(ids, px, mask, use_itm_head=use_itm_head),
               model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head).itm_score)


def test_embed_features(tmp_path_factory):
    model, runner = _bundle(tmp_path_factory, "BlipModel")
    _, inp, _ = fixture("BlipModel")
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    _close(runner.get_image_features(px), model.get_image_features(px))
    _close(runner.get_text_features(ids, mask), model.get_text_features(ids, mask))
    assert runner.manifest["logit_scale"] == pytest.approx(float(model.logit_scale.detach()))


def test_bundled_caption_model(tmp_path_factory):
    """The demo model: captions of the bundled held-out pictures, ids equal to the library's."""
    from PIL import Image
    model_dir = os.path.join(ROOT, "blip_apps", "models", "caption")
    model, runner = _bundle(tmp_path_factory, "BlipForConditionalGeneration", model_dir)
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    images = [Image.open(os.path.join(samples, f)).convert("RGB") for f in sorted(os.listdir(samples))
              if f.endswith(".png")]
    px = runner.processor(images=images, return_tensors="np")["pixel_values"]
    for options in (dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)):
        got = runner.generate(px, **options)
        _same_ids(got, model.generate(pixel_values=px, **options))
    captions = runner.caption(images, num_beams=3, max_new_tokens=20)
    assert captions == runner.processor.batch_decode(got, skip_special_tokens=True)
    assert all(c.strip() for c in captions)


def test_export_refuses_other_dtypes_and_classes(tmp_path):
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    model = bt.BlipForConditionalGeneration.from_pretrained(fixture("BlipForConditionalGeneration")[0],
                                                            dtype="bfloat16")
    with pytest.raises(ValueError, match="float32"):
        export_onnx(model, tmp_path / "a")
    vision = bt.BlipVisionModel.from_pretrained(fixture("BlipVisionModel")[0])
    with pytest.raises(ValueError, match="supports"):
        export_onnx(vision, tmp_path / "b")


def test_export_leaves_the_callers_modes_as_they_were(tmp_path):
    """The graphs are exported in eval mode, but the model handed in keeps each module's mode: a model exported
    between training steps goes on training (with one frozen part still in eval mode)."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    model = bt.BlipModel.from_pretrained(fixture("BlipModel")[0])
    model.train()
    model.vision_model.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    runner = OnnxBlip(export_onnx(model, tmp_path / "embed"), threads=1)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not model.vision_model.training
    px = fixture("BlipModel")[1]["pixel_values"]
    with torch.no_grad():
        _close(runner.get_image_features(px), model.eval().get_image_features(px))


def _pixels_of_size(size, batch=2, seed=2):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def test_other_image_size(tmp_path_factory):
    """``image_size`` at export: the bundle takes that size and equals the library's
    ``interpolate_pos_encoding=True`` outputs; its processor resizes to it."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    model_dir = fixture("BlipForConditionalGeneration")[0]
    model = bt.BlipForConditionalGeneration.from_pretrained(model_dir)
    size = 2 * model.config.vision_config.image_size - model.config.vision_config.patch_size
    runner = OnnxBlip(export_onnx(model, tmp_path_factory.mktemp("sized"), image_size=size), threads=1)
    px = _pixels_of_size(size)
    _close(runner.vision(px)[0], model.vision_model(px, interpolate_pos_encoding=True).last_hidden_state)
    for options in GENERATE[:2]:
        _same_ids(runner.generate(px, **options), model.generate(pixel_values=px, interpolate_pos_encoding=True,
                                                                 **options))
    from blip_core.processing import BlipImageProcessor
    assert runner.image_size == size
    assert BlipImageProcessor.from_pretrained(runner.path).size == {"height": size, "width": size}
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        runner.generate(_pixels_of_size(model.config.vision_config.image_size))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        export_onnx(model, tmp_path_factory.mktemp("bad"), image_size=size + 1)


def test_float16_bundle_and_bfloat16_refusal(tmp_path_factory):
    """A float16 model exports and runs (stages within the float16 row of the float32 library, caption
    ids as the float32 bundle's on the fixture); bfloat16 is refused with the reason. The CLI refuses
    both for ONNX (float16 measured no faster on onnxruntime's CPU provider: benchmarks/onnx_lowprec.py)."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_core.numerics import effective_tolerance
    from blip_runtime import OnnxBlip
    model_dir, inp, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(model_dir)
    half = bt.BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float16)
    runner = OnnxBlip(export_onnx(half, tmp_path_factory.mktemp("fp16")), threads=1)
    assert runner.manifest["dtype"] == "float16"
    px = inp["pixel_values"]
    want = to_numpy(model.vision_model(px).last_hidden_state)
    atol, rtol = effective_tolerance(want, "default", "float16")
    np.testing.assert_allclose(runner.vision(px)[0].astype(np.float32), want, atol=atol, rtol=rtol)
    _same_ids(runner.generate(px, max_new_tokens=8), model.generate(pixel_values=px, max_new_tokens=8))
    bf16 = bt.BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no bfloat16 kernels"):
        export_onnx(bf16, tmp_path_factory.mktemp("bf16"))


@pytest.mark.slow
def test_bundled_models_at_another_image_size(tmp_path_factory):
    """The demo captioning, VQA and retrieval models exported at 1.5x their size: the bundle's processor
    resizes the bundled pictures to it; ids (greedy, beam) equal and scores within tolerance of the torch
    backend with ``interpolate_pos_encoding=True``."""
    import json

    from PIL import Image

    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    with open(os.path.join(samples, "metadata.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    images = [Image.open(os.path.join(samples, r["file_name"])).convert("RGB") for r in rows]
    for name, sub, text in (("BlipForConditionalGeneration", "caption", None), ("BlipForQuestionAnswering", "vqa",
                            "question"), ("BlipForImageTextRetrieval", "retrieval", "text")):
        model_dir = os.path.join(ROOT, "blip_apps", "models", sub)
        model = getattr(bt, name).from_pretrained(model_dir)
        vc = model.config.vision_config
        size = vc.image_size + vc.image_size // 2
        runner = OnnxBlip(export_onnx(model, tmp_path_factory.mktemp(sub), processor_dir=model_dir, image_size=size))
        enc = runner.processor(images=images, text=[r[text] for r in rows] if text else None, padding=True,
                               return_tensors="np")
        px = enc["pixel_values"]
        assert px.shape[-2:] == (size, size)
        if sub == "caption":
            for options in (dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)):
                _same_ids(runner.generate(px, **options),
                          model.generate(pixel_values=px, interpolate_pos_encoding=True, **options))
        elif sub == "vqa":
            ids, mask = enc["input_ids"], enc["attention_mask"]
            for options in (dict(max_new_tokens=5), dict(max_new_tokens=5, num_beams=3)):
                _same_ids(runner.generate(ids, px, mask, **options),
                          model.generate(input_ids=ids, pixel_values=px, attention_mask=mask,
                                         interpolate_pos_encoding=True, **options))
        else:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            for head in (True, False):
                _close(runner.itm(ids, px, mask, use_itm_head=head),
                       model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=head,
                             interpolate_pos_encoding=True).itm_score)


@pytest.fixture(scope="module")
def embed(tmp_path_factory):
    return _bundle(tmp_path_factory, "BlipModel")


def test_embed_manifest_holds_the_checkpoints_logit_scale(embed):
    """The manifest's ``logit_scale`` is the checkpoint's stored (log-space) parameter, read from its safetensors."""
    from safetensors.numpy import load_file
    _, runner = embed
    stored = load_file(os.path.join(fixture("BlipModel")[0], "model.safetensors"))["logit_scale"]
    assert runner.manifest["logit_scale"] == pytest.approx(float(stored), rel=1e-6)


def test_embed_features_and_logit_scale_give_the_models_logits(embed):
    """A consumer's CLIP logits, normalised features times ``exp(logit_scale)`` of the manifest, are the
    library model's ``logits_per_image``."""
    model, runner = embed
    _, inp, _ = fixture("BlipModel")
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    image = runner.get_image_features(px)
    text = runner.get_text_features(ids, mask)
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    _close(image @ text.T * np.exp(runner.manifest["logit_scale"]),
           model(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image)


@pytest.mark.parametrize("name", ["BlipModel", "BlipForImageTextRetrieval"])
def test_a_resized_bundle_resizes_the_given_processor(tmp_path_factory, name):
    """Exported for another image size with a model directory's processor files: the bundle's preprocessor
    config is that directory's with the size replaced by the export's (its other fields kept)."""
    import json

    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_apps.cli import BUNDLED
    processor_dir = os.path.join(BUNDLED, "retrieval")
    model = getattr(bt, name).from_pretrained(fixture(name)[0])
    vc = model.config.vision_config
    size = 2 * vc.image_size - vc.patch_size
    out = export_onnx(model, tmp_path_factory.mktemp("sized"), processor_dir=processor_dir, image_size=size)
    with open(os.path.join(processor_dir, "preprocessor_config.json")) as fh:
        want = json.load(fh)
    with open(os.path.join(out, "preprocessor_config.json")) as fh:
        got = json.load(fh)
    assert want["size"] != {"height": size, "width": size}
    assert got == dict(want, size={"height": size, "width": size})
    assert os.path.isfile(os.path.join(out, "vocab.txt"))
