"""JAX/Flax backend of BLIP and BLIP-2: the transformers 4.57 classes, natively in Flax linen.

Importing this package imports jax and flax only (never torch or tensorflow)::

    from backends.jax import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained("hf_dir")          # or (config, seed=0)
    ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=20)
"""
from . import arrays  # noqa: F401  registers return_tensors="jax" with the processors
from .blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipModel
from .blip2 import Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerModel, Blip2VisionModel
from .blip2_retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from .text import BlipTextModel
from .vision import BlipVisionModel

__all__ = ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipModel",
           "BlipTextModel", "BlipVisionModel", "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval",
           "Blip2Model", "Blip2QFormerModel", "Blip2TextModelWithProjection", "Blip2VisionModel",
           "Blip2VisionModelWithProjection"]

from blip_core.exports import export_shared  # noqa: E402

export_shared(globals(), "Flax")
