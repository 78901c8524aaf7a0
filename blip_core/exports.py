"""The framework-free public names that every backend package re-exports.

``from backends.tf import BlipProcessor, BlipConfig, BlipForConditionalGeneration`` works as
``from transformers import ...`` does: configs, processors, tokenizers and the Auto classes come
from here, the model classes from the backend.
"""
from .configs import (Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipConfig, BlipTextConfig,
                      BlipVisionConfig, OPTConfig, T5Config)
from .processing import (AutoConfig, AutoProcessor, AutoTokenizer, BatchEncoding, BatchFeature, BertTokenizer,
                         Blip2Processor, BlipImageProcessor, BlipProcessor, GPT2Tokenizer, T5Tokenizer)

SHARED = {obj.__name__: obj for obj in (
    Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipConfig, BlipTextConfig, BlipVisionConfig, OPTConfig,
    T5Config, AutoConfig, AutoProcessor, AutoTokenizer, BatchEncoding, BatchFeature, BertTokenizer, Blip2Processor,
    BlipImageProcessor, BlipProcessor, GPT2Tokenizer, T5Tokenizer)}


def export_shared(namespace: dict, prefix: str = "") -> None:
    """Add the shared names to a backend package's namespace and ``__all__``; with ``prefix``
    (``"TF"``, ``"Flax"``) also transformers' prefixed aliases of the backend's model classes."""
    models = [n for n in namespace["__all__"] if n.startswith("Blip")]
    namespace.update(SHARED)
    names = list(SHARED)
    if prefix:
        for name in models:
            namespace[prefix + name] = namespace[name]
            names.append(prefix + name)
    namespace["__all__"] = list(namespace["__all__"]) + names
