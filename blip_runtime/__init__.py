"""blip_runtime: run exported BLIP artifacts without this library's backends.

Needs numpy, ``tokenizers``, pillow and (for ONNX bundles) onnxruntime, plus the framework-free
spec layer ``blip_core`` (preprocessing, generation settings, the decoding rulebook). Nothing here
imports torch, tensorflow, jax, transformers, ``backends`` or ``converters``.

* ``blip_runtime.numpy_engine``: the decoding rulebook's array vocabulary in numpy and its loop.
* ``blip_runtime.onnx_runner.OnnxBlip``: an ONNX bundle written by ``blip export --format onnx``;
  a BLIP-2 (OPT or T5) bundle opens as ``blip_runtime.onnx_blip2.OnnxBlip2``.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "OnnxBlip":       # imported on use, so the numpy engine works without onnxruntime
        from .onnx_runner import OnnxBlip
        return OnnxBlip
    if name == "OnnxBlip2":
        from .onnx_blip2 import OnnxBlip2
        return OnnxBlip2
    raise AttributeError(f"module 'blip_runtime' has no attribute {name!r}")


__all__ = ["OnnxBlip", "OnnxBlip2"]
