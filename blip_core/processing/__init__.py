"""Preprocessing for BLIP and BLIP-2, bit-compatible with Hugging Face transformers 4.57.

* `BlipImageProcessor` - images -> `pixel_values` (N, 3, H, W) float32 (BLIP 384, BLIP-2 224).
* `BertTokenizer`, `GPT2Tokenizer`, `T5Tokenizer`, `load_tokenizer` - on the `tokenizers` package.
* `BlipProcessor`, `Blip2Processor` - both together, with BLIP-2's `<image>` placeholders.

Only numpy, pillow and tokenizers are imported. `return_tensors="np"` always works; "pt", "tf" and
"jax" work once `backends.torch`, `backends.tf` or `backends.jax` is imported (each registers its
tensor type, see `blip_core.registry`).
"""
from .auto import AutoConfig, AutoProcessor, AutoTokenizer
from .image import BatchFeature, BlipImageProcessor, to_framework
from .processors import Blip2Processor, BlipProcessor
from .tokenization import BatchEncoding, PreTrainedTokenizer
from .tokenizer_kinds import (BertTokenizer, GPT2Tokenizer, T5Tokenizer,
                           add_blip_special_tokens, load_tokenizer)

__all__ = ["AutoConfig", "AutoProcessor", "AutoTokenizer", "BatchEncoding", "BatchFeature", "BertTokenizer", "Blip2Processor", "BlipImageProcessor",
           "BlipProcessor", "GPT2Tokenizer", "PreTrainedTokenizer", "T5Tokenizer", "add_blip_special_tokens",
           "load_tokenizer", "to_framework"]
