"""PyTorch backend: BLIP and BLIP-2 as ``torch.nn.Module``s whose parameter names are the Hugging Face keys.

Example::

    from backends.torch import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained("path/to/hf_dir", dtype="bfloat16")
    ids = model.generate(pixel_values, num_beams=3, max_new_tokens=20)
"""
from . import arrays  # noqa: F401  registers return_tensors="pt" with the processors
from .blip2 import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model, Blip2QFormerModel,
                    Blip2TextModelWithProjection, Blip2VisionModel, Blip2VisionModelWithProjection)
from .blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipModel
from .text import BlipTextModel
from .vision import BlipVisionModel

__all__ = ["Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval", "Blip2Model", "Blip2QFormerModel",
           "Blip2TextModelWithProjection", "Blip2VisionModel", "Blip2VisionModelWithProjection",
           "BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipModel",
           "BlipTextModel", "BlipVisionModel"]
# The building blocks (vision.BlipVisionTransformer, text.BlipTextLMHeadModel, _base.PreTrainedModel) stay
# importable from their modules; the package exports the classes every backend has.

from blip_core.exports import export_shared  # noqa: E402

export_shared(globals())
