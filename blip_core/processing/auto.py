"""``AutoProcessor`` / ``AutoTokenizer`` / ``AutoConfig``: pick the class from a model directory.

transformers' Auto classes read the class name out of the directory's files; these do the same
for the classes this library has, so documentation code runs with one changed import.
"""
from __future__ import annotations

import os

from ..configs import Blip2Config, load_config
from ..jsonfile import read_json_file
from .processors import PROCESSOR_CONFIG, Blip2Processor, BlipProcessor
from .tokenizer_kinds import load_tokenizer

_PROCESSORS = {"BlipProcessor": BlipProcessor, "Blip2Processor": Blip2Processor}


def _processor_class(directory: str):
    path = os.path.join(directory, PROCESSOR_CONFIG)
    if os.path.isfile(path):
        name = read_json_file(path, what=PROCESSOR_CONFIG).get("processor_class")
        if name in _PROCESSORS:
            return _PROCESSORS[name]
    if os.path.isfile(os.path.join(directory, "config.json")):
        return Blip2Processor if isinstance(load_config(directory), Blip2Config) else BlipProcessor
    raise ValueError(f"cannot tell which processor {directory} holds: no {PROCESSOR_CONFIG} naming "
                     f"{' or '.join(_PROCESSORS)} and no config.json")


class AutoProcessor:
    """``AutoProcessor.from_pretrained(dir)`` -> ``BlipProcessor`` or ``Blip2Processor``."""

    def __init__(self):
        raise TypeError("use AutoProcessor.from_pretrained(directory)")

    @staticmethod
    def from_pretrained(directory, **kwargs):
        return _processor_class(os.fspath(directory)).from_pretrained(os.fspath(directory), **kwargs)


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(dir)`` -> the BERT, GPT-2/OPT or T5 tokenizer the files describe."""

    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(directory)")

    @staticmethod
    def from_pretrained(directory, **kwargs):
        return load_tokenizer(os.fspath(directory), **kwargs)


class AutoConfig:
    """``AutoConfig.from_pretrained(dir)`` -> the config class ``config.json`` describes."""

    def __init__(self):
        raise TypeError("use AutoConfig.from_pretrained(directory)")

    @staticmethod
    def from_pretrained(directory, **kwargs):
        config = load_config(os.fspath(directory))
        for key, value in kwargs.items():
            setattr(config, key, value)
        return config
