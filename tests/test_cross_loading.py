"""Loading a checkpoint into another class of its family, and transformers' from_pretrained keywords.

References come from transformers 4.57 itself (the tower of the whole model it loads), never
from the class under test.
"""
import importlib
import logging

import numpy as np
import pytest
import torch
import transformers

from blip_core import BACKENDS, to_numpy
from blip_core.checkpoint import StateDictMismatchError
from blip_core.numerics import tolerance
from fixture_utils import fixture, require


def _backend(name):
    return importlib.import_module(f"backends.{name}")


def _close(got, want):
    atol, rtol = tolerance("default", "float32")
    np.testing.assert_allclose(np.asarray(to_numpy(got), np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def captioner():
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    hf = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=torch.from_numpy(inputs["pixel_values"])).last_hidden_state.numpy()
    return path, inputs, vision


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower_from_a_captioning_checkpoint(captioner, backend, caplog):
    """transformers initialises this tower randomly (with a warning); we take ``vision_model.*``."""
    path, inputs, want = captioner
    with caplog.at_level(logging.INFO, logger="blip"):
        model = _backend(backend).BlipVisionModel.from_pretrained(path)
    _close(model(pixel_values=inputs["pixel_values"]).last_hidden_state, want)
    note = [r.getMessage() for r in caplog.records if "not used by BlipVisionModel" in r.getMessage()]
    assert len(note) == 1 and "text_decoder.bert.embeddings.word_embeddings.weight" in note[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_the_checkpoint_lacks_is_an_error_unless_not_strict(captioner, backend):
    path = captioner[0]
    cls = _backend(backend).BlipModel
    with pytest.raises(StateDictMismatchError, match="strict=False") as err:
        cls.from_pretrained(path)
    assert "text_model.embeddings.word_embeddings.weight" in err.value.missing
    assert "visual_projection.weight" in err.value.missing and not err.value.mismatched
    with pytest.warns(UserWarning, match="drawn from seed 3: .*text_projection.weight"):
        model = cls.from_pretrained(path, strict=False, seed=3)
    from safetensors.numpy import load_file
    stored, loaded = load_file(f"{path}/model.safetensors"), _state(model, backend)
    vision = [k for k in stored if k.startswith("vision_model.")]
    assert vision and all(np.array_equal(loaded[k], stored[k]) for k in vision)
    # the drawn head equals what the same seed gives a fresh model, in every backend
    fresh = _state(cls(model.config, seed=3), backend)
    np.testing.assert_array_equal(fresh["text_projection.weight"], loaded["text_projection.weight"])


def _state(model, backend):
    from blip_core.pretrained import canonical_state
    from blip_core.weights import weight_table
    if backend == "torch":
        return {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if backend == "tf":
        params = {p: v.numpy() for p, v in model.params.items()}
    else:
        from backends.jax._base import flatten
        params = flatten(model.params)
    return canonical_state(weight_table(type(model).__name__, model.config), params, backend)


def test_projection_model_from_the_retrieval_checkpoint():
    """The documented example: ``Blip2VisionModelWithProjection`` out of the ITM checkpoint."""
    path, inputs, _ = fixture("Blip2ForImageTextRetrieval")
    hf = transformers.Blip2VisionModelWithProjection.from_pretrained(path).eval()
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(inputs["pixel_values"])).image_embeds.numpy()
    for backend in BACKENDS:
        cls = getattr(_backend(backend), "Blip2VisionModelWithProjection", None)
        if cls is None:
            continue
        _close(cls.from_pretrained(path)(pixel_values=inputs["pixel_values"]).image_embeds, want)


def test_checkpoint_of_another_family_or_with_unknown_weights_raises(tmp_path):
    import backends.torch as T
    path, _, _ = fixture("Blip2VisionModel")
    with pytest.raises(ValueError, match="BlipVisionConfig"):
        T.BlipVisionModel.from_pretrained(path)
    src, _, _ = fixture("BlipVisionModel")
    model = T.BlipVisionModel.from_pretrained(src)
    model.save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    state["embeddings.not_a_weight"] = np.zeros(3, np.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictMismatchError, match="not_a_weight"):
        T.BlipVisionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_keywords(backend):
    path, inputs, _ = fixture("BlipVisionModel")
    cls = _backend(backend).BlipVisionModel
    model = cls.from_pretrained(path, torch_dtype="bfloat16", device_map="auto", low_cpu_mem_usage=True)
    dtype = next(model.parameters()).dtype if backend == "torch" else model.dtype
    assert "bfloat16" in str(dtype)
    model(pixel_values=inputs["pixel_values"])
    cls.from_pretrained(path, device_map="cpu")
    with pytest.raises(NotImplementedError, match="bfloat16"):
        cls.from_pretrained(path, load_in_8bit=True)
    with pytest.raises(NotImplementedError, match="per-module"):
        cls.from_pretrained(path, device_map={"": 0})
    with pytest.raises(TypeError, match="revision"):
        cls.from_pretrained(path, revision="main")
    with pytest.raises(ValueError, match="disagree"):
        cls.from_pretrained(path, dtype="float32", torch_dtype="bfloat16")


def test_device_names_of_the_jax_and_tf_backends():
    """jax and tf take one spelling of a device (``blip_core.pretrained.device_kind``): ours, ``"cuda:1"``-style,
    or TF's ``"/GPU:0"``; anything else is a ``ValueError`` before any tensor is read."""
    from blip_core.pretrained import device_kind
    assert [device_kind(d) for d in ("cpu", "gpu", "cuda", "cuda:1", "rocm:2", "tpu:0", "/GPU:0", "/device:GPU:3",
                                      "/job:localhost/replica:0/task:0/device:CPU:0")] == [
        ("cpu", 0), ("gpu", 0), ("gpu", 0), ("gpu", 1), ("gpu", 2), ("tpu", 0), ("gpu", 0), ("gpu", 3), ("cpu", 0)]
    for bad in ("mps", "cuda:x", "", "gpu:-1"):
        with pytest.raises(ValueError, match="use 'cpu', 'gpu' or 'cuda'"):
            device_kind(bad)
    path, inputs, _ = fixture("BlipVisionModel")
    for backend in ("jax", "tf"):
        cls = _backend(backend).BlipVisionModel
        for name in ("cpu", "cpu:0", "/CPU:0"):
            model = cls.from_pretrained(path, device=name)
            assert model(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[0] == inputs["pixel_values"].shape[0]
        with pytest.raises(ValueError, match="use 'cpu', 'gpu' or 'cuda'"):
            cls.from_pretrained(path, device="mps")


@pytest.mark.parametrize("spelling", ["cpu:{n}", "/CPU:{n}", "/device:CPU:{n}"])
def test_jax_refuses_a_device_index_past_its_last_device(spelling):
    """jax's devices of a kind are numbered 0..n-1: index n (one past the last) is a ``ValueError`` naming the
    device, before any tensor is read, not an ``IndexError`` from jax's device list."""
    jax = require("jax")
    from backends.jax.loading import resolve_device
    n = len(jax.devices("cpu"))
    assert resolve_device(spelling.format(n=n - 1)) == jax.devices("cpu")[n - 1]
    with pytest.raises(ValueError, match=f"has {n} cpu device"):
        resolve_device(spelling.format(n=n))
    path, _, _ = fixture("BlipVisionModel")
    with pytest.raises(ValueError, match=f"has {n} cpu device"):
        _backend("jax").BlipVisionModel.from_pretrained(path, device=spelling.format(n=n))


@pytest.mark.parametrize("device, name", [("cpu", "/CPU:0"), ("cpu:0", "/CPU:0"), ("gpu", "/GPU:0"),
                                          ("cuda:1", "/GPU:1"), ("rocm:2", "/GPU:2"), ("/device:GPU:3", "/GPU:3"),
                                          ("tpu:1", "/TPU:1"),
                                          ("/job:localhost/replica:0/task:0/device:CPU:0", "/CPU:0"),
                                          (None, None), ("auto", "auto")])
def test_tf_device_names_keep_the_kind_and_the_index(device, name):
    """TensorFlow names a device ``/<KIND>:<index>`` (its device-name spec): every spelling the backends take
    becomes that name with the index asked for; None / "auto" stay TF's default placement."""
    from backends.tf.loading import tf_device
    assert tf_device(device) == name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name, name", [("BlipForConditionalGeneration", "vision_model.encoder.not_a_weight"),
                                            ("BlipVisionModel", "vision_model.encoder.not_a_weight"),
                                            ("BlipVisionModel", "not_a_weight.bias"),
                                            ("BlipTextModel", "text_decoder.cls.not_a_weight")])
def test_a_weight_no_class_of_the_family_has_is_an_error_in_every_backend(tmp_path, backend, cls_name, name):
    """A name no BLIP class uses (a damaged or foreign file) is never dropped as another class's weight: loading
    the whole model, or a tower from it, raises naming it, whether the name is under the tower's prefix or
    outside it (where the rest of the model's names are dropped)."""
    import shutil
    from safetensors.numpy import load_file, save_file
    path, _, _ = fixture("BlipForConditionalGeneration")
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    state = load_file(f"{path}/model.safetensors")
    state[name] = np.zeros(3, np.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictMismatchError, match="not_a_weight"):
        getattr(_backend(backend), cls_name).from_pretrained(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantisation_keywords_that_ask_for_none_are_accepted(backend):
    """transformers' defaults (``load_in_8bit=False``, ``load_in_4bit=False``, ``quantization_config=None``)
    ask for no quantisation: they load the float model, as transformers does."""
    path, inputs, _ = fixture("BlipVisionModel")
    hf = transformers.BlipVisionModel.from_pretrained(path, load_in_8bit=False, load_in_4bit=False,
                                                      quantization_config=None).eval()
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(inputs["pixel_values"])).last_hidden_state.numpy()
    model = _backend(backend).BlipVisionModel.from_pretrained(path, load_in_8bit=False, load_in_4bit=False,
                                                              quantization_config=None)
    _close(model(pixel_values=inputs["pixel_values"]).last_hidden_state, want)
