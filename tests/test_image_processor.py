"""`BlipImageProcessor` against transformers' slow `BlipImageProcessor`: bit-identical pixel values.

Random images of several sizes and modes (RGB, RGBA, L, P; PIL and uint8 numpy, HWC and CHW,
float arrays in [0, 1]) go through both; the outputs must have the same dtype and shape and a
maximum absolute difference of exactly 0.0.
"""
import json
import warnings

import numpy as np
import PIL.Image
import pytest
import transformers

from blip_core.processing import BlipImageProcessor

SIZES = [(17, 23), (64, 48), (384, 384), (500, 333), (7, 5)]


def random_images(seed=0):
    """(name, image) pairs covering the input kinds transformers accepts."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out += [("rgb_array", rgb), ("rgb_pil", PIL.Image.fromarray(rgb)),
                ("rgba_pil", PIL.Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))),
                ("l_pil", PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))),
                ("p_pil", PIL.Image.fromarray(rgb).convert("P")),
                ("chw_array", np.ascontiguousarray(rgb.transpose(2, 0, 1))),
                ("float01_array", rng.random((h, w, 3), dtype=np.float32)),
                ("float255_array", rgb.astype(np.float64))]
    return out


def assert_bit_identical(ours, ref):
    assert list(ours.keys()) == list(ref.keys()) == ["pixel_values"]
    a, b = ours["pixel_values"], ref["pixel_values"]
    if isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b)
        pairs = list(zip(a, b))
    else:
        pairs = [(a, b)]
    for x, y in pairs:
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.abs(x.astype(np.float64) - y.astype(np.float64)).max() == 0.0


CONFIGS = [{}, {"size": {"height": 224, "width": 224}}, {"size": {"height": 31, "width": 45}, "resample": 2},
           {"resample": PIL.Image.NEAREST, "size": {"height": 40, "width": 40}}]


@pytest.mark.parametrize("config", CONFIGS)
def test_single_images_bit_identical(config):
    ours, ref = BlipImageProcessor(**config), transformers.BlipImageProcessor(**config)
    for name, image in random_images():
        assert_bit_identical(ours(image, return_tensors="np"), ref(image, return_tensors="np"))


def test_batches_bit_identical():
    ours, ref = BlipImageProcessor(), transformers.BlipImageProcessor()
    images = [im for _, im in random_images(1)]
    pil = [im for im in images if isinstance(im, PIL.Image.Image)]
    uint8 = [im for im in images if isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.shape[-1] == 3]
    stacked = np.stack([np.asarray(PIL.Image.fromarray(u).resize((50, 40))) for u in uint8])  # (N, H, W, 3)
    for batch in (pil, uint8, stacked, [pil[:2], pil[2:4]]):
        assert_bit_identical(ours(batch, return_tensors="np"), ref(batch, return_tensors="np"))
        assert_bit_identical(ours(batch), ref(batch))  # no return_tensors: a list of CHW arrays
    assert ours(pil, return_tensors="np")["pixel_values"].shape == (len(pil), 3, 384, 384)


@pytest.mark.parametrize("overrides", [{"do_resize": False}, {"do_rescale": False}, {"do_normalize": False},
                                       {"do_rescale": False, "do_normalize": False},
                                       {"image_mean": 0.5, "image_std": 0.25}, {"rescale_factor": 1 / 127.5},
                                       {"do_convert_rgb": False, "size": {"height": 20, "width": 30}}])
def test_call_overrides_bit_identical(overrides):
    ours, ref = BlipImageProcessor(), transformers.BlipImageProcessor()
    for name, image in random_images(2):
        if overrides.get("do_convert_rgb") is False and name in ("rgba_pil", "l_pil", "p_pil"):
            continue  # rejected by both; see test_bad_inputs_raise_value_error
        assert_bit_identical(ours(image, return_tensors="np", **overrides),
                             ref(image, return_tensors="np", **overrides))


def test_channels_last_output():
    ours, ref = BlipImageProcessor(), transformers.BlipImageProcessor()
    image = random_images(3)[1][1]
    assert_bit_identical(ours(image, return_tensors="np", data_format="channels_last"),
                         ref(image, return_tensors="np", data_format="channels_last"))


def test_framework_tensors():
    import backends.jax  # noqa: F401  each backend registers its return_tensors type when imported
    import backends.tf  # noqa: F401
    import backends.torch  # noqa: F401
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    ours, ref = BlipImageProcessor(size={"height": 32, "width": 32}), transformers.BlipImageProcessor(
        size={"height": 32, "width": 32})
    images = [im for name, im in random_images(4) if name == "rgb_pil"][:2]
    expected = ref(images, return_tensors="np")["pixel_values"]
    for kind, cls in (("pt", torch.Tensor), ("tf", tf.Tensor), ("jax", jnp.ndarray)):
        out = ours(images, return_tensors=kind)["pixel_values"]
        assert isinstance(out, cls) and tuple(out.shape) == (2, 3, 32, 32)
        assert np.array_equal(np.asarray(out), expected) and np.asarray(out).dtype == np.float32
    torch_in = torch.from_numpy(np.array(images[0]))  # framework tensors are accepted as inputs too
    assert_bit_identical(ours(torch_in, return_tensors="np"), ref(torch_in, return_tensors="np"))


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = BlipImageProcessor(size={"height": 224, "width": 224}, resample=PIL.Image.BILINEAR)  # BLIP-2-like
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "BlipImageProcessor" and config["size"] == {"height": 224, "width": 224}
    ref = transformers.BlipImageProcessor.from_pretrained(str(tmp_path))
    assert ref.size == {"height": 224, "width": 224} and ref.resample == PIL.Image.BILINEAR
    for _, image in random_images(5)[:8]:
        assert_bit_identical(ours(image, return_tensors="np"), ref(image, return_tensors="np"))


def test_from_pretrained_reads_transformers_files(tmp_path):
    ref = transformers.BlipImageProcessor(size={"height": 364, "width": 364}, image_mean=[0.5, 0.5, 0.5],
                                          image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    ref.save_pretrained(str(tmp_path))
    ours = BlipImageProcessor.from_pretrained(str(tmp_path))
    assert ours.size == {"height": 364, "width": 364} and ours.image_mean == [0.5, 0.5, 0.5]
    for _, image in random_images(6)[:8]:
        assert_bit_identical(ours(image, return_tensors="np"), ref(image, return_tensors="np"))
    # Older hub files give `size` as an int; it means a square.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 384, "do_resize": True}))
    assert BlipImageProcessor.from_pretrained(str(tmp_path)).size == {"height": 384, "width": 384}


def test_bad_inputs_raise_value_error():
    ours, ref = BlipImageProcessor(), transformers.BlipImageProcessor()
    rng = np.random.default_rng(7)
    rejected_by_both = {
        "empty batch": [],
        "2-D array": rng.integers(0, 256, (16, 16), dtype=np.uint8),
        "5-D array": rng.integers(0, 256, (1, 1, 16, 16, 3), dtype=np.uint8),
        "RGBA array": rng.integers(0, 256, (16, 16, 4), dtype=np.uint8),
        "float outside [0, 1]": rng.random((16, 16, 3)) * 3 - 1,
        "a string": "not an image",
        "list of ints": [1, 2, 3],
    }
    for what, bad in rejected_by_both.items():
        with pytest.raises(ValueError):
            ours(bad)
        with pytest.raises(Exception):
            ref(bad)
    with pytest.raises(ValueError, match="dtype"):
        ours(np.zeros((16, 16, 3), dtype=bool))
    with pytest.raises(ValueError, match="height"):
        ours(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), size={"shortest_edge": 10})
    with pytest.raises(ValueError, match="return_tensors"):
        ours(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), return_tensors="torch")
    with pytest.raises(ValueError, match="image_mean"):
        ours(PIL.Image.new("RGB", (8, 8)), image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="shapes"):
        ours([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], do_resize=False, return_tensors="np")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_holding_nan_or_infinity_is_named_without_a_cast_warning(bad):
    """transformers rejects such an image too; here the message names the problem, and numpy's 'invalid value
    encountered in cast' warning (from testing whole numbers) no longer comes first."""
    img = np.full((16, 16, 3), 0.5, np.float32)
    img[3, 4, 1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="finite"):
            BlipImageProcessor()(img)
    with pytest.raises(Exception):
        transformers.BlipImageProcessor()(img)
