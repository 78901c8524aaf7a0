"""SavedModels of VQA, retrieval and embeddings (backends/tf/saved_model_export.py) against the library.

Each SavedModel is loaded back with plain ``tf.saved_model.load`` and its signatures called as a
deployment would (named tensors in, a dict out); outputs must be within the float32 row of the
tolerance table of the TF model's own forward, and VQA answer ids identical to its ``generate``
(greedy and beam, padded questions, another question length than at export). The captioning
SavedModel has its own tests (tests/test_tf_export.py).
"""
import os

import numpy as np
import pytest

from blip_core import to_numpy
from blip_core.numerics import tolerance

from fixture_utils import ROOT, fixture, require

tf = require("tensorflow")

ATOL, RTOL = tolerance("default", "float32")


def _load(tmp_path_factory, name, model_dir=None, **options):
    import backends.tf as B
    from backends.tf.saved_model_export import export_saved_model
    model = getattr(B, name).from_pretrained(model_dir or fixture(name)[0])
    out = export_saved_model(model, tmp_path_factory.mktemp(name), **options)
    return model, tf.saved_model.load(out)


def _feeds(name, pad_row=0):
    _, inp, _ = fixture(name)
    mask = inp["attention_mask"].copy()
    mask[pad_row, -2:] = 0
    return inp["pixel_values"], inp["input_ids"].astype(np.int64), mask.astype(np.int64)


def _call(loaded, signature, **arrays):
    out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in arrays.items()})
    return {k: v.numpy() for k, v in out.items()}


def _vqa_case(tmp_path_factory, options, model_dir=None, inputs=None, jit_compile=False):
    """Answer ids of the SavedModel against the torch backend's ``generate`` (ids are equal across
    backends, tests/test_parity_generation.py), for two question lengths."""
    import backends.torch as bt
    name = "BlipForQuestionAnswering"
    _, loaded = _load(tmp_path_factory, name, model_dir, jit_compile=jit_compile, **options)
    reference = bt.BlipForQuestionAnswering.from_pretrained(model_dir or fixture(name)[0])
    px, ids, mask = inputs if inputs is not None else _feeds(name)
    for length in (ids.shape[1], ids.shape[1] - 1):        # the text length is not fixed at export
        got = _call(loaded, "serving_default", pixel_values=px, input_ids=ids[:, :length],
                    attention_mask=mask[:, :length])["sequences"]
        want = to_numpy(reference.generate(input_ids=ids[:, :length], pixel_values=px,
                                           attention_mask=mask[:, :length], **options))
        np.testing.assert_array_equal(got, want)


def test_vqa_beam_ids(tmp_path_factory):
    _vqa_case(tmp_path_factory, dict(max_new_tokens=6, num_beams=3))


def test_vqa_greedy_ids(tmp_path_factory):
    _vqa_case(tmp_path_factory, dict(max_new_tokens=6))


@pytest.mark.slow
def test_vqa_xla_export_ids(tmp_path_factory):
    _vqa_case(tmp_path_factory, dict(max_new_tokens=6, num_beams=3), jit_compile=True)


@pytest.mark.slow
def test_bundled_vqa_model(tmp_path_factory):
    import json

    from PIL import Image

    from blip_core.processing import BlipProcessor
    model_dir = os.path.join(ROOT, "blip_apps", "models", "vqa")
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    with open(os.path.join(samples, "metadata.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:4]
    images = [Image.open(os.path.join(samples, r["file_name"])).convert("RGB") for r in rows]
    enc = BlipProcessor.from_pretrained(model_dir)(images=images, text=[r["question"] for r in rows], padding=True,
                                                   return_tensors="np")
    inputs = (enc["pixel_values"], enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))
    _vqa_case(tmp_path_factory, dict(max_new_tokens=5, num_beams=3), model_dir, inputs, jit_compile=True)


def test_retrieval_signatures(tmp_path_factory):
    name = "BlipForImageTextRetrieval"
    model, loaded = _load(tmp_path_factory, name)
    px, ids, mask = _feeds(name, pad_row=1)
    assert set(loaded.signatures) == {"serving_default", "itm", "itc", "image_embeds", "text_embeds"}
    itm = _call(loaded, "itm", pixel_values=px, input_ids=ids, attention_mask=mask)["itm_score"]
    want = model(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score
    np.testing.assert_allclose(itm, to_numpy(want), atol=ATOL, rtol=RTOL)
    itc = _call(loaded, "itc", pixel_values=px, input_ids=ids, attention_mask=mask)["cosine"]
    want = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
    np.testing.assert_allclose(itc, to_numpy(want), atol=ATOL, rtol=RTOL)
    image_feat = _call(loaded, "image_embeds", pixel_values=px)["image_feat"]
    text_feat = _call(loaded, "text_embeds", input_ids=ids, attention_mask=mask)["text_feat"]
    np.testing.assert_allclose(image_feat @ text_feat.T, itc, atol=ATOL, rtol=RTOL)


def test_embedding_signatures(tmp_path_factory):
    name = "BlipModel"
    model, loaded = _load(tmp_path_factory, name)
    px, ids, mask = _feeds(name)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    got = _call(loaded, "logits", pixel_values=px, input_ids=ids, attention_mask=mask)
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        np.testing.assert_allclose(got[key], to_numpy(out[key]), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(_call(loaded, "image_features", pixel_values=px)["image_features"],
                               to_numpy(model.get_image_features(px)), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(_call(loaded, "text_features", input_ids=ids, attention_mask=mask)["text_features"],
                               to_numpy(model.get_text_features(ids, mask)), atol=ATOL, rtol=RTOL)


def test_options_refused_for_non_generating_models(tmp_path):
    import backends.tf as B
    from backends.tf.saved_model_export import export_saved_model
    model = B.BlipModel.from_pretrained(fixture("BlipModel")[0])
    with pytest.raises(ValueError, match="generation options"):
        export_saved_model(model, tmp_path, num_beams=3)


def test_options_refused_for_retrieval(tmp_path):
    """Generation options mean nothing to a retrieval model: refused, naming them, nothing written."""
    import backends.tf as B
    from backends.tf.saved_model_export import export_saved_model
    model = B.BlipForImageTextRetrieval.from_pretrained(fixture("BlipForImageTextRetrieval")[0])
    with pytest.raises(ValueError, match="generation options.*max_new_tokens"):
        export_saved_model(model, tmp_path / "out", max_new_tokens=5)
    assert not os.path.exists(tmp_path / "out" / "saved_model.pb")


@pytest.mark.parametrize("options", [dict(do_sample=True), dict(do_sample=True, top_k=5, max_new_tokens=4)],
                         ids=["sample", "top-k"])
def test_sampling_vqa_export_needs_a_seed(tmp_path, options):
    """Sampling bakes its seed into the graph: a VQA export with ``do_sample=True`` and no ``seed`` is refused,
    nothing written."""
    import backends.tf as B
    from backends.tf.saved_model_export import export_saved_model
    model = B.BlipForQuestionAnswering.from_pretrained(fixture("BlipForQuestionAnswering")[0])
    with pytest.raises(ValueError, match="seed"):
        export_saved_model(model, tmp_path / "out", jit_compile=False, **options)
    assert not os.path.exists(tmp_path / "out" / "saved_model.pb")
