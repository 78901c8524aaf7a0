"""StableHLO export (backends/jax/stablehlo_export.py): serialized ``jax.export`` programs that run without Flax.

The artifacts are reloaded in a separate process where flax, this library's backends, torch,
tensorflow and transformers cannot be imported (``blip_runtime.stablehlo_runner`` with jax and
numpy); caption ids must equal the library's ``generate`` (greedy and beam, two batch sizes: the
batch axis is symbolic; the reference is the torch backend's eager ``generate``, whose ids equal the
JAX backend's by tests/test_parity_generation.py, so that no second XLA program is compiled) and
features must be within the float32 tolerance of the JAX library model.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blip_core import to_numpy
from blip_core.numerics import tolerance

from fixture_utils import ROOT, fixture, require

jax = require("jax")

ATOL, RTOL = tolerance("default", "float32")
BLOCKED = ("flax", "backends", "converters", "blip_apps", "torch", "tensorflow", "transformers")

SCRIPT = r"""
import json, sys
sys.modules.update({m: None for m in %(blocked)r})       # importing any of them now fails
import numpy as np
from blip_runtime.stablehlo_runner import StableHLOBlip
inputs = dict(np.load(sys.argv[1]))
out = {}
for path in sys.argv[2:]:
    model = StableHLOBlip(path)
    if "caption" in model.programs:       # greedy on one image, beam on all: the batch axis is symbolic
        px = inputs["pixel_values"][:1] if "greedy" in path else inputs["pixel_values"]
        out[path] = model.generate(px).tolist()
    else:
        out[path] = {"image": model.get_image_features(inputs["pixel_values"]).tolist(),
                     "text": model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).tolist()}
print(json.dumps(out))
"""


def _run_elsewhere(tmp_path, inputs, paths):
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", SCRIPT % {"blocked": BLOCKED}, str(tmp_path / "inputs.npz"), *paths],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_caption_and_features_run_without_flax(tmp_path):
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    _, cap_inputs, _ = fixture("BlipForConditionalGeneration")
    captioner = J.BlipForConditionalGeneration.from_pretrained(fixture("BlipForConditionalGeneration")[0])
    options = {"greedy": dict(max_new_tokens=8), "beam": dict(max_new_tokens=8, num_beams=3)}
    paths = {k: export_stablehlo(captioner, tmp_path / k, **kw) for k, kw in options.items()}
    model_dir, emb_inputs, _ = fixture("BlipModel")
    embedder = J.BlipModel.from_pretrained(model_dir)
    paths["embed"] = export_stablehlo(embedder, tmp_path / "embed")
    inputs = {"pixel_values": cap_inputs["pixel_values"], "input_ids": emb_inputs["input_ids"],
              "attention_mask": emb_inputs["attention_mask"]}
    assert emb_inputs["pixel_values"].shape == cap_inputs["pixel_values"].shape
    got = _run_elsewhere(tmp_path, inputs, list(paths.values()))

    from backends.torch import BlipForConditionalGeneration
    reference = BlipForConditionalGeneration.from_pretrained(fixture("BlipForConditionalGeneration")[0])
    px = cap_inputs["pixel_values"]
    np.testing.assert_array_equal(np.array(got[paths["greedy"]]),
                                  to_numpy(reference.generate(pixel_values=px[:1], **options["greedy"])))
    np.testing.assert_array_equal(np.array(got[paths["beam"]]),
                                  to_numpy(reference.generate(pixel_values=px, **options["beam"])))
    out = got[paths["embed"]]
    np.testing.assert_allclose(np.array(out["image"]), to_numpy(embedder.get_image_features(px)), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.array(out["text"]),
                               to_numpy(embedder.get_text_features(inputs["input_ids"], inputs["attention_mask"])),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_bundled_caption_model(tmp_path):
    from PIL import Image

    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    model_dir = os.path.join(ROOT, "blip_apps", "models", "caption")
    model = J.BlipForConditionalGeneration.from_pretrained(model_dir)
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    images = [Image.open(os.path.join(samples, f)).convert("RGB") for f in sorted(os.listdir(samples))
              if f.endswith(".png")]
    for kw in (dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=3)):
        runner = StableHLOBlip(export_stablehlo(model, tmp_path / str(len(kw)), processor_dir=model_dir, **kw))
        px = runner.processor(images=images, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(runner.generate(px), to_numpy(model.generate(pixel_values=px, **kw)))
        assert all(c.strip() for c in runner.caption(images))


@pytest.mark.parametrize("beams", [1, 3])
def test_caption_ids_end_where_the_library_stops(tmp_path, beams):
    """An eos the random captioner reaches on its second token: the program's buffer holds 8 new tokens, the
    runner returns the library's ids, cut where the search stopped."""
    import backends.jax as J
    import backends.torch as bt
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    model_dir, inp, _ = fixture("BlipForConditionalGeneration")
    px = inp["pixel_values"][:1]
    reference = bt.BlipForConditionalGeneration.from_pretrained(model_dir)
    free = to_numpy(reference.generate(pixel_values=px, max_new_tokens=8, num_beams=beams))
    options = dict(max_new_tokens=8, num_beams=beams, eos_token_id=int(free[0, 2]))
    want = to_numpy(reference.generate(pixel_values=px, **options))
    assert want.shape[1] < free.shape[1]
    runner = StableHLOBlip(export_stablehlo(J.BlipForConditionalGeneration.from_pretrained(model_dir), tmp_path,
                                            **options))
    np.testing.assert_array_equal(runner.generate(px), want)


def test_refuses_other_classes(tmp_path):
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    model = J.BlipVisionModel.from_pretrained(fixture("BlipVisionModel")[0])
    with pytest.raises(ValueError, match="supports"):
        export_stablehlo(model, tmp_path)


@pytest.mark.parametrize("name", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_refuses_a_sampling_program_without_a_seed(tmp_path, name):
    """Sampling bakes its seed into the program: ``do_sample=True`` without ``seed`` is refused, nothing written."""
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    model = getattr(J, name).from_pretrained(fixture(name)[0])
    with pytest.raises(ValueError, match="seed"):
        export_stablehlo(model, tmp_path / "out", do_sample=True, max_new_tokens=3)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


@pytest.mark.parametrize("name", ["BlipForImageTextRetrieval", "BlipModel"])
@pytest.mark.parametrize("options", [dict(max_new_tokens=5), dict(num_beams=3, do_sample=True, seed=0)],
                         ids=["length", "beams-sampling"])
def test_refuses_generation_options_for_models_that_do_not_generate(tmp_path, name, options):
    """Retrieval and embedding programs generate nothing: generation options given to their export are refused,
    nothing written."""
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    model = getattr(J, name).from_pretrained(fixture(name)[0])
    with pytest.raises(ValueError, match="generation options"):
        export_stablehlo(model, tmp_path / "out", **options)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def _vqa_inputs():
    _, inp, _ = fixture("BlipForQuestionAnswering")
    mask = inp["attention_mask"].copy()
    mask[0, -2:] = 0                      # a padded question: the library masks the decoder's cross-attention
    return inp["pixel_values"], inp["input_ids"], mask


def test_vqa_beam_program_at_another_image_size(tmp_path):
    """The VQA generate program (beam 3) exported for another image size: answer ids equal the
    library's with ``interpolate_pos_encoding=True`` (reference: the torch backend's generate, whose
    ids equal the JAX backend's, so that no second XLA program is compiled; the JAX reference runs in
    the slow test below). The artifact's processor resizes to the size."""
    import backends.jax as J
    import backends.torch as bt
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    model_dir = fixture("BlipForQuestionAnswering")[0]
    vc = J.BlipForQuestionAnswering.from_pretrained(model_dir).config.vision_config
    size = 2 * vc.image_size - vc.patch_size
    options = dict(max_new_tokens=6, num_beams=3)
    runner = StableHLOBlip(export_stablehlo(J.BlipForQuestionAnswering.from_pretrained(model_dir), tmp_path,
                                            image_size=size, **options))
    px, ids, mask = _vqa_inputs()
    px = np.random.default_rng(0).standard_normal(px.shape[:2] + (size, size)).astype(np.float32)
    reference = bt.BlipForQuestionAnswering.from_pretrained(model_dir)
    np.testing.assert_array_equal(runner.generate(ids, px, mask),
                                  to_numpy(reference.generate(input_ids=ids, pixel_values=px, attention_mask=mask,
                                                              interpolate_pos_encoding=True, **options)))
    with open(tmp_path / "preprocessor_config.json") as fh:
        assert json.load(fh)["size"] == {"height": size, "width": size}
    assert runner.manifest["image_size"] == size
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        runner.generate(ids, _vqa_inputs()[0], mask)


@pytest.mark.parametrize("resized", [False, True])
def test_retrieval_programs(tmp_path, resized):
    """ITM logits and the ITC cosine (image_embeds @ text_embeds.T) within the float32 tolerance of the
    JAX library model, padded text included, at the model's image size and exported for another one
    (the reference with ``interpolate_pos_encoding=True``)."""
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    model_dir, inp, _ = fixture("BlipForImageTextRetrieval")
    model = J.BlipForImageTextRetrieval.from_pretrained(model_dir)
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    vc = model.config.vision_config
    size = 2 * vc.image_size - vc.patch_size if resized else None
    if resized:
        px = np.random.default_rng(1).standard_normal(px.shape[:2] + (size, size)).astype(np.float32)
    runner = StableHLOBlip(export_stablehlo(model, tmp_path, image_size=size))
    extra = dict(interpolate_pos_encoding=True) if resized else {}
    for head in (True, False):
        np.testing.assert_allclose(runner.itm(ids, px, mask, use_itm_head=head),
                                   to_numpy(model(input_ids=ids, pixel_values=px, attention_mask=mask,
                                                  use_itm_head=head, **extra).itm_score), atol=ATOL, rtol=RTOL)
    # ITC takes different numbers of images and texts: (images, texts)
    np.testing.assert_allclose(runner.itm(ids[:1], px, mask[:1], use_itm_head=False),
                               to_numpy(model(input_ids=ids[:1], pixel_values=px, attention_mask=mask[:1],
                                              use_itm_head=False, **extra).itm_score), atol=ATOL, rtol=RTOL)


def test_vqa_greedy_program_masks_the_question(tmp_path):
    """The VQA greedy program at the model's size on a question whose last two tokens are masked (real
    tokens under the mask, so only the mask tells): the library's ids (the torch backend's generate)."""
    import backends.jax as J
    import backends.torch as bt
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    model_dir = fixture("BlipForQuestionAnswering")[0]
    runner = StableHLOBlip(export_stablehlo(J.BlipForQuestionAnswering.from_pretrained(model_dir), tmp_path,
                                            max_new_tokens=6))
    px, ids, mask = _vqa_inputs()
    reference = bt.BlipForQuestionAnswering.from_pretrained(model_dir)
    want = to_numpy(reference.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=6))
    np.testing.assert_array_equal(runner.generate(ids, px, mask), want)
    unmasked = to_numpy(reference.generate(input_ids=ids, pixel_values=px, max_new_tokens=6))
    assert not np.array_equal(unmasked, want)        # the mask decides the answer here


@pytest.mark.slow
def test_bundled_vqa_and_retrieval_models(tmp_path):
    """The demo VQA and retrieval models on the bundled pictures and questions: answer ids equal the JAX
    backend's generate (greedy and beam), ITM/ITC within tolerance; then the VQA greedy program at
    another image size against the JAX backend with ``interpolate_pos_encoding=True``."""
    from PIL import Image

    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_runtime.stablehlo_runner import StableHLOBlip
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    with open(os.path.join(samples, "metadata.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    images = [Image.open(os.path.join(samples, r["file_name"])).convert("RGB") for r in rows]
    model_dir = os.path.join(ROOT, "blip_apps", "models", "vqa")
    model = J.BlipForQuestionAnswering.from_pretrained(model_dir)
    for i, kw in enumerate((dict(max_new_tokens=5), dict(max_new_tokens=5, num_beams=3))):
        runner = StableHLOBlip(export_stablehlo(model, tmp_path / f"vqa{i}", processor_dir=model_dir, **kw))
        enc = runner.processor(images=images, text=[r["question"] for r in rows], padding=True, return_tensors="np")
        got = runner.generate(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
        np.testing.assert_array_equal(got, to_numpy(model.generate(input_ids=enc["input_ids"],
                                                                   pixel_values=enc["pixel_values"],
                                                                   attention_mask=enc["attention_mask"], **kw)))
        assert runner.answer(images, [r["question"] for r in rows]) == runner.processor.batch_decode(
            got, skip_special_tokens=True)
    size = 2 * model.config.vision_config.image_size
    runner = StableHLOBlip(export_stablehlo(model, tmp_path / "vqa-sized", processor_dir=model_dir, image_size=size,
                                            max_new_tokens=5))
    enc = runner.processor(images=images, text=[r["question"] for r in rows], padding=True, return_tensors="np")
    assert enc["pixel_values"].shape[-1] == size
    np.testing.assert_array_equal(
        runner.generate(enc["input_ids"], enc["pixel_values"], enc["attention_mask"]),
        to_numpy(model.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                                attention_mask=enc["attention_mask"], interpolate_pos_encoding=True, max_new_tokens=5)))

    model_dir = os.path.join(ROOT, "blip_apps", "models", "retrieval")
    model = J.BlipForImageTextRetrieval.from_pretrained(model_dir)
    runner = StableHLOBlip(export_stablehlo(model, tmp_path / "itm", processor_dir=model_dir))
    enc = runner.processor(images=images, text=[r["text"] for r in rows], padding=True, return_tensors="np")
    for head in (True, False):
        np.testing.assert_allclose(runner.itm(enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                              use_itm_head=head),
                                   to_numpy(model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                                                  attention_mask=enc["attention_mask"], use_itm_head=head).itm_score),
                                   atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("config_of", ["Blip2ForConditionalGeneration", "Blip2Model"])   # OPT, T5
def test_blip2_captioner(tmp_path, config_of):
    """BLIP-2 OPT (the fixture) and T5 (the Blip2Model fixture's config, random weights): beam ids."""
    import backends.jax as J
    from backends.jax.stablehlo_export import export_stablehlo
    from blip_core.configs import load_config
    from blip_runtime.stablehlo_runner import StableHLOBlip
    from converters.inputs import make_inputs
    cfg = load_config(fixture(config_of)[0])
    model = J.Blip2ForConditionalGeneration(cfg, seed=0)
    inp = make_inputs("Blip2ForConditionalGeneration", cfg, 0)
    ids, mask, px = inp["input_ids"], inp["attention_mask"], inp["pixel_values"]
    options = dict(max_new_tokens=5, num_beams=2)
    runner = StableHLOBlip(export_stablehlo(model, tmp_path, prompt_length=ids.shape[1], **options))
    np.testing.assert_array_equal(runner.generate(px, ids, mask),
                                  to_numpy(model.generate(pixel_values=px, input_ids=ids, attention_mask=mask,
                                                          **options)))
