"""Checkpoint conversion between formats and frameworks, and the parity harness.

* ``convert(src, dst, to="torch"|"tf"|"jax", ...)``: any Hugging Face PyTorch (safetensors,
  sharded, opt-in ``.bin``), TF ``tf_model.h5``, Flax ``flax_model.msgpack`` or original
  BLIP/LAVIS ``.pth`` checkpoint to any framework's native format, streamed, atomic, verified.
* ``converters.parity``: run a checkpoint's stages in several backends (and optionally
  transformers) and compare them against ``blip_core.numerics``' tolerance table.

Nothing here imports torch, tensorflow, jax or transformers at import time.
"""
from .convert import ConversionError, ConversionReport, convert
from .sources import FORMATS, detect_format

__all__ = ["FORMATS", "ConversionError", "ConversionReport", "convert", "detect_format"]
