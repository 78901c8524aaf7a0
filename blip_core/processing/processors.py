"""`BlipProcessor` and `Blip2Processor`: an image processor and a tokenizer behind one call.

Call conventions are transformers 4.57's: `processor(images=..., text=..., return_tensors=...,
padding=..., ...)`. Keyword arguments are routed by name: image options to the image processor,
text options to the tokenizer, `return_tensors` to both; unknown names are ignored with a warning,
as transformers does.

BLIP-2 specifics (transformers' `processing_blip_2.py`): the tokenizer gains the special token
`<image>`; when `num_query_tokens` is set and images are given, every sample gets
`num_query_tokens` image-token ids (and ones in its attention mask) prepended *after* padding and
truncation, so they are never cut; `max_length` counts them.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from tokenizers import AddedToken

from ..jsonfile import read_json_file
from .image import BatchFeature, BlipImageProcessor
from .tokenization import PreTrainedTokenizer
from .tokenizer_kinds import load_tokenizer

__all__ = ["BlipProcessor", "Blip2Processor"]

PROCESSOR_CONFIG = "processor_config.json"
_IMAGE_KEYS = {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
               "image_std", "do_convert_rgb", "data_format", "input_data_format"}
_TEXT_KEYS = {"text_pair", "add_special_tokens", "padding", "truncation", "max_length", "stride",
              "is_split_into_words", "pad_to_multiple_of", "return_token_type_ids", "return_attention_mask",
              "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
              "return_length", "verbose", "padding_side"}
# Processor defaults for the tokenizer (transformers' BlipProcessorKwargs / Blip2ProcessorKwargs).
_TEXT_DEFAULTS = {"add_special_tokens": True, "padding": False, "stride": 0, "return_overflowing_tokens": False,
                  "return_special_tokens_mask": False, "return_offsets_mapping": False,
                  "return_token_type_ids": False, "return_length": False, "verbose": True}


class BlipProcessor:
    """BLIP: `BlipImageProcessor` + `BertTokenizer`.

    Example::

        proc = BlipProcessor.from_pretrained("blip_dir")
        batch = proc(images=[img1, img2], text=["a photo of", "a photo of"], padding=True, return_tensors="np")
        sorted(batch)   # ['attention_mask', 'input_ids', 'pixel_values']
    """

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: PreTrainedTokenizer, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("A processor needs both an image_processor and a tokenizer")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.extra = dict(kwargs)

    # ----------------------------------------------------------------- kwargs routing

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        """-> (text kwargs, image kwargs), with the processor's and the tokenizer's defaults."""
        text = dict(_TEXT_DEFAULTS)
        for key in _TEXT_KEYS & set(self.tokenizer.init_kwargs):
            text[key] = getattr(self.tokenizer, key, self.tokenizer.init_kwargs[key])
        images: dict = {}
        kwargs = dict(kwargs)
        for group, target in (("text_kwargs", text), ("images_kwargs", images)):
            target.update(kwargs.pop(group, None) or {})
        common = dict(kwargs.pop("common_kwargs", None) or {})
        for key, value in kwargs.items():
            if key == "return_tensors":
                common[key] = value
            elif key in _TEXT_KEYS:
                text[key] = value
            elif key in _IMAGE_KEYS:
                images[key] = value
            else:
                warnings.warn(f"Keyword argument {key!r} is not a valid argument for {type(self).__name__} "
                              "and is ignored", stacklevel=3)
        text.update(common)
        images.update(common)
        return text, images

    def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs):
        """Images -> `pixel_values`; text -> `input_ids`, `attention_mask` (no `token_type_ids`)."""
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        text_kwargs, image_kwargs = self._split_kwargs(kwargs)
        text_encoding = self.tokenizer(text, **text_kwargs) if text is not None else None
        if images is None:
            return text_encoding
        encoding = self.image_processor(images, **image_kwargs)
        if text_encoding is not None:
            encoding.update(text_encoding)
        return encoding

    # ----------------------------------------------------------------- decoding

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list:
        return self.tokenizer.batch_decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list:
        names = [n for n in self.tokenizer.model_input_names if n != "token_type_ids"]
        return names + list(self.image_processor.model_input_names)

    # ----------------------------------------------------------------- save / load

    def _processor_config(self) -> Optional[dict]:
        """What goes into processor_config.json (None: no file, as transformers for BLIP)."""
        return None

    def save_pretrained(self, directory: str) -> None:
        """Write preprocessor_config.json, the tokenizer files and (BLIP-2) processor_config.json."""
        os.makedirs(directory, exist_ok=True)
        name = type(self).__name__
        self.image_processor.extra["processor_class"] = name
        self.tokenizer.init_kwargs["processor_class"] = name
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        config = self._processor_config()
        if config is not None:
            config = {**self.extra, **config, "processor_class": name}
            with open(os.path.join(directory, PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs):
        """Load the image processor, the tokenizer and processor_config.json from a directory."""
        image_processor = BlipImageProcessor.from_pretrained(directory)
        tokenizer = load_tokenizer(directory)
        config = {}
        path = os.path.join(directory, PROCESSOR_CONFIG)
        if os.path.isfile(path):
            config = read_json_file(path, what=PROCESSOR_CONFIG)
        # Non-legacy transformers files may nest the sub-processors' configs here; they are read above.
        for key in ("processor_class", "image_processor", "tokenizer", "auto_map"):
            config.pop(key, None)
        config.update(kwargs)
        return cls(image_processor, tokenizer, **config)


class Blip2Processor(BlipProcessor):
    """BLIP-2: `BlipImageProcessor` (224) + the language model's tokenizer (OPT or T5).

    With `num_query_tokens=Q` and images, each text sample becomes `[<image>] * Q + tokens`.
    """

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: PreTrainedTokenizer,
                 num_query_tokens: Optional[int] = None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        existing = tokenizer.extra_special_tokens.get("image_token")
        if existing is not None:
            self.image_token = existing if isinstance(existing, str) else existing.get("content")
        else:
            self.image_token = "<image>"
            tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        if num_query_tokens is not None and (not isinstance(num_query_tokens, int) or num_query_tokens < 0):
            raise ValueError(f"num_query_tokens must be a non-negative int, got {num_query_tokens!r}")
        self.num_query_tokens = num_query_tokens

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        text_kwargs, image_kwargs = self._split_kwargs(kwargs)
        return_tensors = text_kwargs.pop("return_tensors", None)
        max_length = text_kwargs.pop("max_length", None)
        if max_length is not None:
            # The placeholders count towards max_length but are never truncated.
            text_kwargs["max_length"] = max_length - (self.num_query_tokens or 0)
        encoding = BatchFeature()
        if text is not None:
            if isinstance(text, str):
                text = [text]
            elif not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise ValueError("Invalid input text. Please provide a string, or a list of strings")
            text_encoding = self.tokenizer(text, **text_kwargs)
            if images is not None and self.num_query_tokens is not None:
                prefix_kwargs = dict(text_kwargs, add_special_tokens=False, padding=False, truncation=False)
                prefix_kwargs.pop("max_length", None)
                prefix = self.tokenizer(self.image_token * self.num_query_tokens, **prefix_kwargs)
                for key in list(text_encoding):
                    text_encoding[key] = [prefix[key] + sample for sample in text_encoding[key]]
            encoding.update(text_encoding)
        if images is not None:
            encoding.update(self.image_processor(images, **image_kwargs))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def _processor_config(self) -> Optional[dict]:
        return {"num_query_tokens": self.num_query_tokens}
