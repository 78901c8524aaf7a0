"""BLIP / BLIP-2 image preprocessing, bit-identical to transformers 4.57's slow `BlipImageProcessor`.

Pipeline per image (the order and dtypes are what make it bit-exact):

1. PIL images are converted to RGB (`do_convert_rgb`); arrays are left as they are.
2. The image becomes a numpy array; its channel axis is inferred once, from the first image
   (channels-first wins when both ends have 1 or 3 entries, as in transformers).
3. Resize with PIL on uint8 data (float data in [0, 1] is scaled to [0, 255] and truncated to
   uint8 first, then scaled back by 1/255 after resizing).
4. Rescale: multiply in float64, then cast to float32.
5. Normalise in the array's own float dtype (float32 after a rescale).
6. Output channels-first; `return_tensors` stacks the batch to NCHW.

It also holds `BatchFeature`, the dict every processor returns, and the conversion to framework
tensors shared by the tokenizers (made by whichever backend registered the tensor type).
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection
from typing import Optional

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..jsonfile import read_json_file
from ..registry import TENSOR_TYPE_BACKENDS, tensor_maker, tensor_mover

__all__ = ["BatchFeature", "BlipImageProcessor", "to_framework"]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_TENSOR_TYPES = (None, "np", *TENSOR_TYPE_BACKENDS)
_CHANNELS_FIRST, _CHANNELS_LAST = "channels_first", "channels_last"


# --------------------------------------------------------------------------- outputs


def _is_ragged(value) -> bool:
    """True when a batch (list of sequences or arrays) has items of different shapes."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    shapes = {np.shape(v) if isinstance(v, np.ndarray) else (len(v) if isinstance(v, (list, tuple)) else ())
              for v in value}
    return len(shapes) > 1


def to_framework(value, tensor_type: Optional[str]):
    """Convert a list (of lists / arrays) to the requested framework's array type.

    Framework tensors are made by the function the backend registered when it was imported
    (``blip_core.registry``); numpy needs no backend.
    Integer lists keep the framework's own default dtype (int64 for numpy/torch, int32 for TensorFlow/JAX), as transformers does.
    """
    if tensor_type is None:
        return value
    if tensor_type not in _TENSOR_TYPES:
        raise ValueError(f"return_tensors must be one of {_TENSOR_TYPES[1:]} or None, got {tensor_type!r}")
    if _is_ragged(value):
        raise ValueError("Unable to create tensor: the batch items have different lengths or shapes; "
                         "use padding=True (text) or resize the images to one size")
    empty = isinstance(value, (list, tuple)) and (len(value) == 0 or
                                                  (isinstance(value[0], (list, tuple)) and len(value[0]) == 0))
    if tensor_type == "np":
        if isinstance(value, np.ndarray):
            return value
        return np.asarray(value, dtype=np.int64 if empty else None)
    return tensor_maker(tensor_type)(value, empty)


def _move_numpy(value: np.ndarray, *args, device=None, dtype=None):
    for arg in args:
        try:
            dtype = np.dtype(arg)
        except TypeError:
            device = arg
    if device not in (None, "cpu"):
        raise ValueError(f"numpy arrays live on the CPU; .to({device!r}) needs return_tensors of a framework")
    return value.astype(dtype) if dtype is not None and value.dtype.kind == "f" else value


class BatchFeature(dict):
    """The dict returned by processors and tokenizers; keys are also readable as attributes."""

    def __init__(self, data: Optional[dict] = None, tensor_type: Optional[str] = None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, item: str):
        try:
            return self[item]
        except KeyError:
            raise AttributeError(item) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        """Move every framework tensor to a device and cast the floating ones to a dtype, as
        transformers' ``BatchFeature.to(device, dtype)``: ids and masks keep their integer type.
        Each backend says what a device is in its framework (torch: ``"cuda:0"``; tf: ``"/GPU:0"``;
        jax: a platform name or ``jax.Device``). numpy arrays accept a dtype, and ``"cpu"``."""
        for key, value in list(self.items()):
            move = tensor_mover(value)
            if move is not None:
                self[key] = move(value, *args, **kwargs)
            elif isinstance(value, np.ndarray):
                self[key] = _move_numpy(value, *args, **kwargs)
        return self

    def convert_to_tensors(self, tensor_type: Optional[str] = None) -> "BatchFeature":
        if tensor_type is None:
            return self
        for key, value in list(self.items()):
            if isinstance(value, (list, tuple, np.ndarray)):
                self[key] = to_framework(value, tensor_type)
        return self


# --------------------------------------------------------------------------- image helpers


def _size_dict(size, default_to_square: bool) -> dict:
    """transformers' `get_size_dict`: int -> square (or shortest edge), (h, w) -> dict."""
    if isinstance(size, dict):
        out = dict(size)
    elif isinstance(size, int) and not isinstance(size, bool):
        out = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        out = {"height": size[0], "width": size[1]}
    else:
        raise ValueError(f"size must be a dict {{'height': h, 'width': w}}, an int or (h, w); got {size!r}")
    if set(out) != {"height", "width"}:
        raise ValueError(f"size must have exactly the keys 'height' and 'width'; got {sorted(out)}")
    return out


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil_to_8bit(image: "PIL.Image.Image") -> "PIL.Image.Image":
    """16-bit and 32-bit integer grey images as 8-bit ``L``; PIL's own ``convert`` clips them at 255,
    which turns every 16-bit photo white."""
    if image.mode not in _SIXTEEN_BIT + ("I",):
        return image
    arr = np.asarray(image, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"Unsupported {image.mode} image: values [{arr.min()}, {arr.max()}] are not 16-bit")
    if image.mode == "I" and (not arr.size or arr.max() <= 255):
        return PIL.Image.fromarray(arr.astype(np.uint8))
    # 65535 -> 255 with rounding, as the 8-bit value nearest the 16-bit intensity.
    return PIL.Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8))


def _to_array(image) -> np.ndarray:
    """One image (PIL, numpy, or any array-like framework tensor) -> numpy array."""
    if isinstance(image, PIL.Image.Image):
        return np.array(image)
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__") and not isinstance(image, (list, tuple, str)):
        return np.asarray(image)
    raise ValueError(f"Invalid image type {type(image).__name__}: expected a PIL.Image.Image, a numpy array "
                     "or a framework tensor")


def _is_image(x) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray)) or (
        hasattr(x, "__array__") and hasattr(x, "ndim") and not isinstance(x, (list, tuple, str)))


def _flatten_images(images) -> list:
    """Single image / 4-D batch / list / nested list -> flat list of single images."""
    flat: list = []

    def collect(x) -> None:
        if isinstance(x, (list, tuple)):
            for item in x:
                collect(item)
        elif not _is_image(x):
            raise ValueError(f"Invalid image type {type(x).__name__}: expected a PIL.Image.Image, a numpy "
                             "array, a framework tensor or a list of them")
        elif isinstance(x, PIL.Image.Image) or x.ndim == 3:
            flat.append(x)
        elif x.ndim == 4:
            flat.extend(list(x))
        else:
            raise ValueError(f"Invalid image rank {x.ndim} (shape {tuple(x.shape)}): an image array needs 3 "
                             "dimensions (HWC or CHW) and a batch 4")

    collect(images)
    if not flat:
        raise ValueError("No images given: the image list is empty")
    return flat


def _infer_channel_format(arr: np.ndarray) -> str:
    """transformers' rule: channels-first if the first axis has 1 or 3 entries, else channels-last."""
    if arr.ndim != 3:
        raise ValueError(f"Unsupported number of image dimensions: {arr.ndim} (shape {arr.shape}); expected "
                         "3 (HWC or CHW). Grayscale arrays need a channel axis, or pass a PIL image")
    if arr.shape[0] in (1, 3):
        return _CHANNELS_FIRST
    if arr.shape[2] in (1, 3):
        return _CHANNELS_LAST
    raise ValueError(f"Unable to infer the channel axis of an image of shape {arr.shape}: numpy images "
                     "must have 1 or 3 channels (convert RGBA arrays to RGB, or pass a PIL image)")


def _check_dtype(arr: np.ndarray) -> None:
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"Unsupported image dtype {arr.dtype}: use uint8 in [0, 255] or floats in [0, 1]")


def _needs_rescale_for_pil(arr: np.ndarray) -> bool:
    """Whether an array must be multiplied by 255 before it can become a uint8 PIL image."""
    if arr.dtype == np.uint8:
        return False
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("Image values must be finite to be resized; this image holds NaN or infinity")
    if np.allclose(arr, arr.astype(int)):
        if np.all(arr >= 0) and np.all(arr <= 255):
            return False
        raise ValueError(f"Image values must lie in [0, 255] to be resized, got [{arr.min()}, {arr.max()}]")
    if np.all(arr >= 0) and np.all(arr <= 1):
        return True
    raise ValueError(f"Float image values must lie in [0, 1] (or be whole numbers in [0, 255]) to be "
                     f"resized, got [{arr.min()}, {arr.max()}]")


def _rescale(arr: np.ndarray, scale: float) -> np.ndarray:
    # Upcast before multiplying so uint8 never overflows; the cast to float32 comes last.
    return (arr.astype(np.float64) * scale).astype(np.float32)


def _resize_hwc(arr: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an HWC array with PIL, via uint8, the way transformers' `resize` does."""
    scaled = _needs_rescale_for_pil(arr)
    pil_in = arr[..., 0] if arr.shape[-1] == 1 else arr  # PIL has no (H, W, 1) images
    if scaled:
        pil_in = _rescale(pil_in, 255)
    pil = PIL.Image.fromarray(pil_in.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=PIL.Image.Resampling(resample), reducing_gap=None))
    if out.ndim == 2:
        out = out[..., None]
    return _rescale(out, 1 / 255) if scaled else out


def _normalize(arr: np.ndarray, mean, std) -> np.ndarray:
    channels = arr.shape[-1]
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    stats = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        if isinstance(value, Collection) and not isinstance(value, str):
            if len(value) != channels:
                raise ValueError(f"{name} must have {channels} elements for a {channels}-channel image, "
                                 f"got {len(value)}")
        else:
            value = [value] * channels
        stats.append(np.array(value, dtype=arr.dtype))
    return (arr - stats[0]) / stats[1]


# --------------------------------------------------------------------------- processor

_OPTIONS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb")
# Not a transformers option: written to the config only when set, so default files stay identical.
_EXTRA_OPTIONS = ("apply_exif_orientation",)


class BlipImageProcessor:
    """PIL/numpy images -> `pixel_values` (N, 3, H, W) float32, exactly as transformers computes them.

    Differences from transformers, where its result is wrong: a PIL image is always read as
    height x width x channels (transformers takes a PIL image 3 or 1 pixels high for channels-first
    and transposes it), 16-bit grey images are scaled to 8 bits (PIL clips them, giving white) and an
    image without pixels is refused. EXIF orientation is ignored by default, as transformers does;
    ``apply_exif_orientation=True`` rotates photos the way a viewer shows them.

    Example::

        proc = BlipImageProcessor(size={"height": 224, "width": 224})     # BLIP-2 size
        proc([pil_image, uint8_hwc_array], return_tensors="np")["pixel_values"].shape  # (2, 3, 224, 224)
    """

    model_input_names = ["pixel_values"]

    def __init__(self, do_resize: bool = True, size: Optional[dict] = None, resample: int = PIL.Image.BICUBIC,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean=None, image_std=None, do_convert_rgb: bool = True,
                 apply_exif_orientation: bool = False, **kwargs):
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else {"height": 384, "width": 384}, True)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = image_mean if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = image_std if image_std is not None else list(OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb
        self.apply_exif_orientation = bool(apply_exif_orientation)
        # Unknown keys of a loaded config (processor_class, ...) are kept and written back.
        kwargs.pop("image_processor_type", None)
        self.extra = dict(kwargs)

    def __call__(self, images, return_tensors: Optional[str] = None, data_format: str = _CHANNELS_FIRST,
                 input_data_format: Optional[str] = None, **overrides) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, data_format=data_format,
                               input_data_format=input_data_format, **overrides)

    def preprocess(self, images, return_tensors: Optional[str] = None, data_format: str = _CHANNELS_FIRST,
                   input_data_format: Optional[str] = None, **overrides) -> BatchFeature:
        unknown = set(overrides) - set(_OPTIONS) - set(_EXTRA_OPTIONS)
        if unknown:
            raise TypeError(f"Unknown image processor options: {sorted(unknown)}; valid: {list(_OPTIONS)}")
        if return_tensors not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {_TENSOR_TYPES[1:]} or None, got {return_tensors!r}")
        opt = {k: (overrides[k] if overrides.get(k) is not None else getattr(self, k))
               for k in _OPTIONS + _EXTRA_OPTIONS}
        # Like transformers, an int size given per call means "shortest edge", which BLIP cannot resize to.
        size = _size_dict(opt["size"], default_to_square=False) if opt["do_resize"] else None
        if opt["do_rescale"] and opt["rescale_factor"] is None:
            raise ValueError("rescale_factor must be set when do_rescale is True")
        if opt["do_normalize"] and (opt["image_mean"] is None or opt["image_std"] is None):
            raise ValueError("image_mean and image_std must be set when do_normalize is True")
        for name, fmt in (("data_format", data_format), ("input_data_format", input_data_format)):
            if fmt not in (_CHANNELS_FIRST, _CHANNELS_LAST) and not (name == "input_data_format" and fmt is None):
                raise ValueError(f"{name} must be 'channels_first' or 'channels_last', got {fmt!r}")

        images = _flatten_images(images)
        if opt["apply_exif_orientation"]:
            images = [PIL.ImageOps.exif_transpose(im) if isinstance(im, PIL.Image.Image) else im for im in images]
        if opt["do_convert_rgb"]:
            images = [_pil_to_8bit(im).convert("RGB") if isinstance(im, PIL.Image.Image) and im.mode != "RGB"
                      else im for im in images]
        from_pil = [isinstance(im, PIL.Image.Image) for im in images]
        arrays = [_to_array(im) for im in images]
        for arr in arrays:
            _check_dtype(arr)
            if arr.ndim != 3:
                raise ValueError(f"Unsupported number of image dimensions: {arr.ndim} (shape {arr.shape}); "
                                 "expected 3 (HWC or CHW)")
            if arr.size == 0:
                raise ValueError(f"Image of shape {arr.shape} has no pixels")
        # Like transformers, the first array decides the channel layout of the whole batch; PIL
        # images are height x width x channels whatever their size.
        first = next((a for a, pil in zip(arrays, from_pil) if not pil), None)
        fmt = input_data_format or (_infer_channel_format(first) if first is not None else _CHANNELS_LAST)
        out = []
        for arr, pil in zip(arrays, from_pil):
            if pil and input_data_format is None:
                if arr.shape[-1] not in (1, 3):
                    raise ValueError(f"A {arr.shape[-1]}-channel PIL image needs do_convert_rgb=True (or convert "
                                     "it to RGB first)")
                hwc = arr
            else:
                hwc = arr.transpose(1, 2, 0) if fmt == _CHANNELS_FIRST else arr
            if opt["do_resize"]:
                hwc = _resize_hwc(hwc, size["height"], size["width"], int(opt["resample"]))
            if opt["do_rescale"]:
                hwc = _rescale(hwc, opt["rescale_factor"])
            if opt["do_normalize"]:
                hwc = _normalize(hwc, opt["image_mean"], opt["image_std"])
            out.append(hwc.transpose(2, 0, 1) if data_format == _CHANNELS_FIRST else hwc)
        return BatchFeature({"pixel_values": out}, tensor_type=return_tensors)

    # ----------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({k: getattr(self, k) for k in _OPTIONS})
        out.update({k: True for k in _EXTRA_OPTIONS if getattr(self, k)})
        out["image_processor_type"] = "BlipImageProcessor"
        return out

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> "BlipImageProcessor":
        config = dict(config)
        config.update(overrides)
        config.pop("feature_extractor_type", None)
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "BlipImageProcessor":
        """Read `preprocessor_config.json` from a directory (or the JSON file itself)."""
        file = os.path.join(path, PREPROCESSOR_CONFIG) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {PREPROCESSOR_CONFIG} in {path}")
        return cls.from_dict(read_json_file(file, what=PREPROCESSOR_CONFIG), **overrides)

    def save_pretrained(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, PREPROCESSOR_CONFIG)
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    def __repr__(self) -> str:
        return f"BlipImageProcessor({json.dumps(self.to_dict(), sort_keys=True)})"
