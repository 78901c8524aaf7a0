"""TensorFlow backend: BLIP as plain ``tf.Module`` models with the weight table's variable names.

Importing this package imports TensorFlow and the spec layer only, never torch or jax.

Example::

    from backends.tf import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained("hf_dir")
    ids = model.generate(pixel_values=pixels, max_new_tokens=20)
"""
import sys as _sys


def _import_tensorflow_without_jax():
    """Import TensorFlow while jax is hidden.

    ``tensorflow.lite.python.util`` imports jax whenever it is installed (for TFLite's JAX
    converter), which would load a second framework with this backend. Hiding it makes that
    optional import fail the way TensorFlow expects; only ``TFLiteConverter.experimental_from_jax``
    is affected, and ``import jax`` works normally afterwards.
    """
    if "tensorflow" in _sys.modules or "jax" in _sys.modules:
        return
    _sys.modules["jax"] = None   # a None entry makes `import jax` raise ImportError
    try:
        import tensorflow  # noqa: F401
    finally:
        if _sys.modules.get("jax", 0) is None:
            del _sys.modules["jax"]


from . import xla_cache as _xla_cache  # noqa: E402  (imports no TensorFlow)

_xla_cache.apply_persistent_cache()     # before TensorFlow parses its XLA flags (blip_core.persistent_cache)
_import_tensorflow_without_jax()

from . import arrays  # noqa: E402,F401  registers return_tensors="tf" with the processors
from .blip import (BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering,  # noqa: E402
                   BlipModel)
from .blip2 import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model,  # noqa: E402
                    Blip2QFormerModel, Blip2TextModelWithProjection, Blip2VisionModel, Blip2VisionModelWithProjection)
from .text import BlipTextModel  # noqa: E402
from .vision import BlipVisionModel  # noqa: E402

__all__ = ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipModel",
           "BlipTextModel", "BlipVisionModel", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
           "Blip2Model", "Blip2QFormerModel", "Blip2TextModelWithProjection", "Blip2VisionModel",
           "Blip2VisionModelWithProjection"]

from blip_core.exports import export_shared  # noqa: E402

export_shared(globals(), "TF")
