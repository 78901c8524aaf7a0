"""What every exporter writes beside its programs, whatever the format: the checkpoint's processor
files, and for an artifact that takes another image size than the config's, a processor that
resizes to that size (so a runner's preprocessing feeds the program what it was exported for).

The size rule is the one of ``interpolate_pos_encoding``: the position grid is resized to whole
patches, so the size must be a positive multiple of the patch size.
"""
from __future__ import annotations

import json
import os
import shutil

from .processing.image import PREPROCESSOR_CONFIG, BlipImageProcessor

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                   "vocab.json", "spiece.model", "added_tokens.json", PREPROCESSOR_CONFIG, "processor_config.json")


def export_image_size(vision_config, image_size: int | None = None) -> int:
    """The square pixel size an artifact takes: the config's, or ``image_size`` checked against the patch size."""
    if image_size is None:
        return int(vision_config.image_size)
    size, patch = int(image_size), int(vision_config.patch_size)
    if size < patch or size % patch:
        raise ValueError(f"image size {size} is not a positive multiple of patch_size {patch}: "
                         "interpolate_pos_encoding resizes the position grid to whole patches")
    return size


def write_image_size(out_dir, size: int) -> str:
    """Set ``size`` in ``out_dir``'s preprocessor config (writing the default BLIP one if there is none)."""
    path = os.path.join(os.fspath(out_dir), PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return BlipImageProcessor(size={"height": size, "width": size}).save_pretrained(os.fspath(out_dir))
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["size"] = {"height": int(size), "width": int(size)}
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def copy_processor_files(processor_dir, out_dir, image_size: int | None = None) -> None:
    """Copy the processor files found in ``processor_dir`` (may be None) to ``out_dir``; with
    ``image_size``, the copied (or a default) preprocessor config resizes to it."""
    if processor_dir is not None:
        for name in PROCESSOR_FILES:
            src = os.path.join(os.fspath(processor_dir), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(os.fspath(out_dir), name))
    if image_size is not None:
        write_image_size(out_dir, image_size)
