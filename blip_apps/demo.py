"""``blip demo``: the main job on the bundled models, with nothing downloaded.

Loads the three bundled tiny BLIP models (``blip_apps/models/{caption,vqa,retrieval}``, trained with
``blip train`` on synthetic shapes) in every requested backend, then on the bundled held-out
sample images (``assets/samples``: drawn from a stream of the generator that training never saw)
captions each image, answers its question and ranks the sample captions for it (BLIP's score: ITM
logit of "match" plus ITC cosine), printing
what each backend says, whether the backends agree, how many answers are right and the time taken.

``build_demo_model`` still writes a small *random* model over the 105-word demo vocabulary (the
command-line tests use it).
"""
from __future__ import annotations

import json
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
SAMPLES = os.path.join(ASSETS, "samples")
MODELS = os.path.join(os.path.dirname(ASSETS), "models")


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


def _samples():
    from PIL import Image
    with open(os.path.join(SAMPLES, "metadata.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows, [Image.open(os.path.join(SAMPLES, r["file_name"])).convert("RGB") for r in rows]


def _run_backend(backend, rows, images):
    """Captions, answers and best-matching caption index per image, with the seconds each part took."""
    from blip_core.processing import BlipProcessor

    from . import load
    out, t0 = {}, time.perf_counter()
    models = {task: load(os.path.join(MODELS, task), backend=backend) for task in ("caption", "vqa", "retrieval")}
    out["load_s"] = time.perf_counter() - t0
    processor = BlipProcessor.from_pretrained(os.path.join(MODELS, "caption"))
    pixels = processor(images=images, return_tensors="np")["pixel_values"]
    t0 = time.perf_counter()
    ids = to_numpy(models["caption"].generate(pixel_values=pixels, max_new_tokens=12))
    out["captions"] = [processor.decode(r.tolist(), skip_special_tokens=True).strip() for r in ids]
    q = processor.tokenizer([r["question"] for r in rows], padding=True, return_tensors="np")
    ids = to_numpy(models["vqa"].generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                                          pixel_values=pixels, max_new_tokens=4))
    out["answers"] = [processor.decode(r.tolist(), skip_special_tokens=True).strip() for r in ids]
    texts = [r["text"] for r in rows]
    t = processor.tokenizer(texts, padding=True, return_tensors="np")
    n = len(rows)
    img_idx, txt_idx = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
    logits = to_numpy(models["retrieval"](input_ids=t["input_ids"][txt_idx], pixel_values=pixels[img_idx],
                                          attention_mask=t["attention_mask"][txt_idx], use_itm_head=True).itm_score)
    logits = np.asarray(logits, np.float64).reshape(n, n, 2)
    p_match = 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))
    itc = np.asarray(to_numpy(models["retrieval"](input_ids=t["input_ids"], pixel_values=pixels,
                                                  attention_mask=t["attention_mask"], use_itm_head=False).itm_score))
    out["best"] = (logits[..., 1] + itc).argmax(1).tolist()       # BLIP's retrieval score: ITM logit + ITC cosine
    out["p_match"] = p_match
    out["run_s"] = time.perf_counter() - t0
    return out


def run_demo(backends=BACKENDS, out=None) -> int:
    """Print the demo; 0 when every backend ran and all agree. ``out`` is accepted for compatibility."""
    rows, images = _samples()
    print(f"bundled models: {MODELS}/{{caption,vqa,retrieval}}; {len(rows)} held-out synthetic images "
          f"from {SAMPLES}")
    results = {}
    for backend in backends:
        try:
            results[backend] = _run_backend(backend, rows, images)
        except (ImportError, NotImplementedError) as exc:
            print(f"{backend:>5}: unavailable ({exc})")
            continue
        r = results[backend]
        print(f"{backend:>5}: loaded 3 models in {r['load_s']:.1f} s; captioned, answered and matched "
              f"{len(rows)} images in {r['run_s']:.1f} s (first call, compilation included)")
    if not results:
        return 1
    names = list(results)
    texts = [r["text"] for r in rows]
    for i, row in enumerate(rows):
        print(f"\n[{i + 1}] {row['file_name']}  truth: {row['text']!r}")
        print("    caption   " + " | ".join(f"{b}: {results[b]['captions'][i]}" for b in names))
        print(f"    Q: {row['question']}  (truth: {row['answer']})  "
              + " | ".join(f"{b}: {results[b]['answers'][i]}" for b in names))
        print("    best match of the sample captions (ITM logit + ITC cosine)  "
              + " | ".join(f"{b}: {texts[results[b]['best'][i]]!r} p={results[b]['p_match'][i].max():.3f}"
                           for b in names))
    first = results[names[0]]
    agree = {key: all(results[b][key] == first[key] for b in names) for key in ("captions", "answers", "best")}
    p_diff = max(float(np.abs(results[b]["p_match"] - first["p_match"]).max()) for b in names)
    print(f"\nbackends agree ({', '.join(names)}): captions {agree['captions']}, answers {agree['answers']}, "
          f"matches {agree['best']} (largest ITM probability difference {p_diff:.1e})")
    for b in names:
        r = results[b]
        print(f"{b:>5} correct: captions {sum(c == t for c, t in zip(r['captions'], texts))}/{len(rows)}, "
              f"answers {sum(a == row['answer'] for a, row in zip(r['answers'], rows))}/{len(rows)}, "
              f"matches {sum(j == i for i, j in enumerate(r['best']))}/{len(rows)}")
    return 0 if all(agree.values()) and len(results) == len(backends) else 1


if __name__ == "__main__":
    sys.exit(run_demo())
