"""Low precision in the PyTorch backend: float32 vs bfloat16 vs int8 captioning, speed and agreement.

Speed: BLIP base (random weights, 384 px, batch 1, greedy, 20 new tokens forced), each variant
loaded from one checkpoint and timed interleaved in this process: the whole ``generate`` and the
vision tower alone, so ``(generate - vision) / 20`` is the decoder's time per token.

Agreement: the bundled trained captioner (``blip_apps/models/caption``) captions the held-out
synthetic images (``blip_apps.synthetic``, test split, seed 0) greedily in each variant; the rate is
the share of images whose caption ids equal float32's. Printed beside the speed (random weights
would say nothing about agreement: their captions are noise). Run alone with
``python benchmarks/lowprec.py`` (it takes run_all's options; ``--quick`` uses tiny configs).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from . import common   # noqa: E402

VARIANTS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}
NEW_TOKENS = 20
MIN_REPS = 3
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blip_apps", "models", "caption")


def heldout_pixels(model_dir: str = BUNDLED, n: int = 200, seed: int = 0) -> np.ndarray:
    """(n, 3, H, W) float32 pixels of the held-out synthetic test split, through the model's processor."""
    from blip_apps import synthetic
    from blip_core.processing import BlipImageProcessor
    proc = BlipImageProcessor.from_pretrained(model_dir)
    images = [synthetic.render(scene) for scene, _ in synthetic.rows(n, seed, "test")]
    return np.asarray(proc(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)


def caption_ids(model, pixels: np.ndarray, batch: int = 50, max_new_tokens: int = NEW_TOKENS) -> list:
    """Greedy caption ids per image (lists, padding after eos removed by the caller's comparison)."""
    from blip_core import to_numpy
    out = []
    for i in range(0, len(pixels), batch):
        ids = to_numpy(model.generate(pixel_values=pixels[i:i + batch], max_new_tokens=max_new_tokens))
        out.extend([list(map(int, row)) for row in ids])
    return out


def agreement(variants=("bfloat16", "int8"), model_dir: str = BUNDLED, n: int = 200) -> dict:
    """{variant: share of held-out images whose greedy caption ids equal float32's} (torch backend)."""
    import torch
    from backends.torch import BlipForConditionalGeneration as Cls
    pixels = heldout_pixels(model_dir, n)
    with torch.no_grad():
        ref = caption_ids(Cls.from_pretrained(model_dir), pixels)
        rates = {}
        for v in variants:
            got = caption_ids(Cls.from_pretrained(model_dir, **VARIANTS[v]), pixels)
            rates[v] = float(np.mean([a == b for a, b in zip(got, ref)]))
    return {"images": int(n), "rates": rates}


def caption_checkpoint(ctx) -> str:
    """The run's BLIP-base captioner checkpoint (random weights, seed 0), written once by our torch backend."""
    from .caption import config
    path = os.path.join(ctx.tmp, "caption-checkpoint")
    if not os.path.isdir(path):
        ctx.framework("torch")
        from backends.torch import BlipForConditionalGeneration
        BlipForConditionalGeneration(config(ctx.quick), seed=0).save_pretrained(path)
    return path


def run(ctx) -> None:
    from .caption import config
    from blip_core import to_numpy
    try:
        torch = ctx.framework("torch")
        from backends.torch import BlipForConditionalGeneration as Cls
    except Exception as exc:   # noqa: BLE001
        ctx.log(f"\n== lowprec skipped: {common.error_text(exc)}")
        return
    cfg = config(ctx.quick)
    path = caption_checkpoint(ctx)
    models = {v: Cls.from_pretrained(path, **kw) for v, kw in VARIANTS.items()}
    size = cfg.vision_config.image_size
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    calls = {}
    for v, m in models.items():
        calls[f"{v}:generate"] = lambda m=m: m.generate(pixel_values=pixels, **kwargs)
        calls[f"{v}:vision"] = lambda m=m: m.vision_model(pixels).last_hidden_state
    ctx.log(f"\n== lowprec | torch float32 / bfloat16 / int8 | greedy, batch 1, {NEW_TOKENS} tokens | "
            f"load {os.getloadavg()[0]:.2f}")

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call
    # at least MIN_REPS calls each, whatever the budget: with one or two, a single slow call on a shared
    # machine decided the row (stop 29's full run: bfloat16 decode 1.01x, 1.44x in a rerun minutes later)
    stats = common.measure({k: no_grad(f) for k, f in calls.items()}, ctx.budget_s, max(ctx.max_reps, MIN_REPS),
                           min_reps=MIN_REPS, log=ctx.log)
    agree = agreement(model_dir=BUNDLED, n=8 if ctx.quick else 200)
    ref_ids = stats["float32:generate"]["out"]
    rows = []
    med = {k: float(np.median(s["times"])) if s["times"] else None for k, s in stats.items()}
    for v in VARIANTS:
        gen, vis = med[f"{v}:generate"], med[f"{v}:vision"]
        err = stats[f"{v}:generate"]["error"] or stats[f"{v}:vision"]["error"]
        per_token = (gen - vis) / NEW_TOKENS if gen is not None and vis is not None else None
        row = {"variant": v, "generate_s": gen, "vision_s": vis, "decode_per_token_s": per_token, "error": err,
               "speedup_generate": med["float32:generate"] / gen if gen and med["float32:generate"] else None,
               "speedup_decode": None, "random_weights_ids_equal_float32": None,
               "heldout_agreement": 1.0 if v == "float32" else agree["rates"].get(v)}
        out = stats[f"{v}:generate"]["out"]
        if out is not None and ref_ids is not None:
            row["random_weights_ids_equal_float32"] = bool(np.array_equal(to_numpy(out), ref_ids))
        rows.append(row)
    base = rows[0]["decode_per_token_s"]
    for r in rows:
        if base and r["decode_per_token_s"]:
            r["speedup_decode"] = base / r["decode_per_token_s"]
    ctx.log(f"  {'variant':<10}{'generate':>10}{'vision':>10}{'decode/token':>14}{'x gen':>7}{'x decode':>9}"
            f"  agreement with float32 (bundled captioner, {agree['images']} held-out images)")
    for r in rows:
        f = lambda v, s=1.0: "-" if v is None else f"{v * s:.3f}"   # noqa: E731
        ctx.log(f"  {r['variant']:<10}{f(r['generate_s']):>10}{f(r['vision_s']):>10}"
                f"{f(r['decode_per_token_s'], 1e3) + ' ms':>14}{f(r['speedup_generate']):>7}"
                f"{f(r['speedup_decode']):>9}  {100 * r['heldout_agreement']:.1f}%"
                + (f"  error: {r['error']}" if r["error"] else ""))
    ctx.sections["lowprec"] = {"title": "PyTorch low precision (BLIP base, random weights, greedy batch 1, 20 tokens; "
                                        "agreement: bundled captioner, held-out synthetic set)",
                               "load_average": list(os.getloadavg()), "threads": torch.get_num_threads(),
                               "heldout_images": agree["images"], "rows": rows}
    del models, stats


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "lowprec", "--backends", "torch"] + sys.argv[1:]))
