"""JAX/Flax backend of BLIP: the transformers 4.57 classes, natively in Flax linen.

Importing this package imports jax and flax only (never torch or tensorflow)::

    from backends.jax import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained("hf_dir")          # or (config, seed=0)
    ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=20)
"""
from . import arrays  # noqa: F401  registers return_tensors="jax" with the processors
from .blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipModel
from .text import BlipTextModel
from .vision import BlipVisionModel

__all__ = ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipModel",
           "BlipTextModel", "BlipVisionModel"]

from blip_core.exports import export_shared  # noqa: E402

export_shared(globals(), "Flax")
