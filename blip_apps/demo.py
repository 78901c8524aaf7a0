"""``blip demo``: the main job on the bundled default, with nothing downloaded.

Builds a small randomly initialised BLIP captioner (seeded) with a bundled 105-word vocabulary,
saves it in Hugging Face's format, then captions the bundled picture in every requested backend
and shows that all backends produce the same token ids. The weights are random, so the caption
is a random walk through the vocabulary: the point is the pipeline and the agreement, not the
words.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np

from blip_core import BACKENDS, to_numpy

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEMO_IMAGE = os.path.join(ASSETS, "demo.png")
DEMO_VOCAB = os.path.join(ASSETS, "demo_vocab.txt")


def demo_config():
    """A small captioner: 4-layer ViT on 64x64 images, 2-layer text decoder over the demo vocabulary."""
    from blip_core.configs import BlipConfig
    with open(DEMO_VOCAB, encoding="utf-8") as fh:
        vocab = [line.rstrip("\n") for line in fh]
    n = len(vocab)          # [DEC] and [ENC] are added after the vocabulary, as in BLIP
    return BlipConfig(
        # transformers' vision default initializer_range (1e-10) would make a random tower ignore the image
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=16, initializer_range=0.02),
        text_config=dict(vocab_size=n + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=n,
                         sep_token_id=vocab.index("[SEP]"), pad_token_id=vocab.index("[PAD]")),
        projection_dim=32, image_text_hidden_size=32)


def build_demo_model(directory: str, seed: int = 0, architecture: str = "BlipForConditionalGeneration") -> str:
    """Write a demo model (config, safetensors weights, tokenizer, image processor) to ``directory``.

    ``architecture`` is any BLIP class; the captioner is the default.
    """
    import backends.torch
    from blip_core.processing import BertTokenizer, BlipImageProcessor, BlipProcessor, add_blip_special_tokens

    config = demo_config()
    os.makedirs(directory, exist_ok=True)
    getattr(backends.torch, architecture)(config, seed=seed).save_pretrained(directory)
    vocab_dir = tempfile.mkdtemp()
    try:
        shutil.copy(DEMO_VOCAB, os.path.join(vocab_dir, "vocab.txt"))
        tokenizer = add_blip_special_tokens(BertTokenizer.from_pretrained(vocab_dir))
    finally:
        shutil.rmtree(vocab_dir, ignore_errors=True)
    size = config.vision_config.image_size
    BlipProcessor(BlipImageProcessor(size={"height": size, "width": size}), tokenizer).save_pretrained(directory)
    return directory


def run_demo(backends=BACKENDS, out=None) -> int:
    from PIL import Image
    from blip_core.processing import BlipProcessor

    from . import load

    directory = out or tempfile.mkdtemp(prefix="blip-demo-")
    print(f"building a random BLIP captioner (seed 0) in {directory}")
    build_demo_model(directory)
    processor = BlipProcessor.from_pretrained(directory)
    image = Image.open(DEMO_IMAGE).convert("RGB")
    inputs = processor(images=image, return_tensors="np")
    print(f"image: {DEMO_IMAGE} -> pixel_values {tuple(inputs['pixel_values'].shape)}")
    results = {}
    for backend in backends:
        try:
            model = load(directory, backend=backend)
        except (ImportError, NotImplementedError) as exc:
            print(f"{backend:>5}: unavailable ({exc})")
            continue
        for mode, kwargs in (("greedy", {}), ("beam-3", {"num_beams": 3})):
            model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=12, **kwargs)   # warm-up / compile
            t0 = time.perf_counter()
            ids = to_numpy(model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=12, **kwargs))
            ms = 1000 * (time.perf_counter() - t0)
            text = processor.decode(ids[0].tolist(), skip_special_tokens=True)
            results[(backend, mode)] = ids
            print(f"{backend:>5} {mode:>6}: {ms:7.1f} ms  ids={ids[0].tolist()}  caption={text!r}")
    modes = {m for _, m in results}
    agree = all(np.array_equal(results[k], next(v for kk, v in results.items() if kk[1] == k[1])) for k in results)
    print(f"backends agree on every decoding mode ({', '.join(sorted(modes))}): {agree}")
    if out is None:
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if results and agree else 1


if __name__ == "__main__":
    sys.exit(run_demo())
