"""Images read the way they look: PIL orientation of axes, 16-bit grey, empty arrays, EXIF, bad files."""
import io

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip_core.processing import BlipImageProcessor

PROC = BlipImageProcessor(size={"height": 16, "width": 16})


def _pixels(image, **kw):
    return PROC(image, return_tensors="np", **kw)["pixel_values"]


@pytest.mark.parametrize("height", [1, 3])
def test_short_pil_images_are_height_width_channels(height):
    rgb = np.random.RandomState(0).randint(0, 256, (height, 20, 3), np.uint8)
    out = _pixels(PIL.Image.fromarray(rgb))
    # The same pixels as a channels-last array, stated explicitly, give the same result.
    assert np.array_equal(out, _pixels(rgb, input_data_format="channels_last"))
    assert out.shape == (1, 3, 16, 16)


def test_one_pixel_image_is_processed():
    out = _pixels(PIL.Image.new("RGB", (1, 1), (255, 0, 0)))
    assert out.shape == (1, 3, 16, 16) and out[0, 0].min() > out[0, 1].max()


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (3, 0, 7)])
def test_arrays_without_pixels_are_refused(shape):
    with pytest.raises(ValueError, match="has no pixels"):
        _pixels(np.zeros(shape, np.uint8))


def test_sixteen_bit_grey_keeps_its_intensities():
    grey = np.array([[0, 16384, 32768, 65535]] * 4, np.uint16)
    image = PIL.Image.fromarray(grey)
    assert image.mode == "I;16"
    eight = PIL.Image.fromarray(np.round(grey / 257).astype(np.uint8))
    assert np.array_equal(_pixels(image), _pixels(eight))
    assert not np.array_equal(_pixels(image), _pixels(PIL.Image.new("L", (4, 4), 255)))   # not all white


def _tagged(image, orientation):
    """``image`` saved as a PNG whose EXIF orientation tag is ``orientation``, opened again."""
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    return PIL.Image.open(io.BytesIO(buf.getvalue()))


def test_exif_orientation_is_an_option():
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :8] = 255                           # left half white
    image = PIL.Image.fromarray(rgb)
    loaded = _tagged(image, 3)                 # rotate 180 degrees
    default = _pixels(loaded)                  # transformers' behaviour: EXIF ignored
    assert np.array_equal(default, _pixels(image))
    turned = _pixels(loaded, apply_exif_orientation=True)
    assert np.array_equal(turned, _pixels(image.rotate(180)))
    assert BlipImageProcessor(apply_exif_orientation=True).to_dict()["apply_exif_orientation"] is True
    assert "apply_exif_orientation" not in PROC.to_dict()


# EXIF orientation tag -> the transpose that shows the picture upright (the EXIF 2.3 table)
_UPRIGHT = {2: PIL.Image.Transpose.FLIP_LEFT_RIGHT, 3: PIL.Image.Transpose.ROTATE_180,
            4: PIL.Image.Transpose.FLIP_TOP_BOTTOM, 5: PIL.Image.Transpose.TRANSPOSE,
            6: PIL.Image.Transpose.ROTATE_270, 7: PIL.Image.Transpose.TRANSVERSE, 8: PIL.Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("tag", sorted(_UPRIGHT))
def test_every_exif_orientation_from_a_saved_processor(tmp_path, tag):
    """A processor saved with ``apply_exif_orientation=True`` and read back turns each of the seven tagged
    orientations upright (one white quadrant of a 8x16 picture tells all eight apart)."""
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:4, :8] = 255
    image = PIL.Image.fromarray(rgb)
    BlipImageProcessor(size={"height": 16, "width": 16}, apply_exif_orientation=True).save_pretrained(tmp_path)
    proc = BlipImageProcessor.from_pretrained(tmp_path)
    got = proc(_tagged(image, tag), return_tensors="np")["pixel_values"]
    assert np.array_equal(got, _pixels(image.transpose(_UPRIGHT[tag])))
    assert not np.array_equal(got, _pixels(image))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_any_pil_image_gives_finite_pixels_of_the_configured_size(h, w, seed):
    rgb = np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8)
    out = _pixels(PIL.Image.fromarray(rgb))
    assert out.shape == (1, 3, 16, 16) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(out, _pixels(rgb, input_data_format="channels_last"))


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 5)))
def test_any_array_shape_is_processed_or_refused_with_a_value_error(shape):
    arr = np.full(shape, 128, np.uint8)
    try:
        out = _pixels(arr)
    except ValueError:
        return
    assert arr.size > 0 and out.shape == (1, 3, 16, 16)
