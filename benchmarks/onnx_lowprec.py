"""ONNX in float16 on onnxruntime's CPU provider: agreement with float32 and speed, measured.

Why ``blip export --format onnx --dtype float16`` is refused: this script exports the bundled
captioning demo model (``blip_apps/models/caption``) in float32 and in float16 (the torch backend
loaded in half precision, ``backends.torch.onnx_export``), captions the 200 held-out test scenes of
its training data (``blip synthetic shapes --test 200 --seed 0``) greedy and with 3 beams, and
reports the share of captions whose ids equal float32's; then it times the two bundles on the same
pixels, interleaved, for the demo model's ``generate`` and for the BLIP base vision tower
(ViT-B/16 at 384, random weights) alone. onnxruntime's CPU provider has float16 kernels for few
operators: it wraps the others in Cast nodes (float16 -> float32 -> float16), so a float16 graph
does float32 arithmetic plus casts. bfloat16 graphs do not load at all (no CPU kernels for MatMul,
Add, ...). Run ``python benchmarks/onnx_lowprec.py [--images 200] [--reps 5] [--no-base]``; it
prints its numbers with the load average and onnxruntime's version.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = os.path.join(ROOT, "blip_apps", "models", "caption")


def _median_interleaved(calls: dict, reps: int) -> dict:
    for fn in calls.values():          # warm-up
        fn()
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _held_out(n: int):
    from blip_apps import synthetic
    return [synthetic.render(s) for s in synthetic.scenes(n, 0, "test")]


def caption_agreement(images: int, reps: int, threads: int, out: str) -> dict:
    import torch

    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    runners = {}
    for dtype in ("float32", "float16"):
        model = bt.BlipForConditionalGeneration.from_pretrained(CAPTION, dtype=getattr(torch, dtype))
        runners[dtype] = OnnxBlip(export_onnx(model, os.path.join(out, dtype), processor_dir=CAPTION), threads=threads)
    px = runners["float32"].processor(images=_held_out(images), return_tensors="np")["pixel_values"]
    res = {"images": int(px.shape[0])}
    for name, opts in (("greedy", dict(max_new_tokens=20)), ("beam3", dict(max_new_tokens=20, num_beams=3))):
        ids = {k: r.generate(px, **opts) for k, r in runners.items()}
        a, b = ids["float32"], ids["float16"]
        width = max(a.shape[1], b.shape[1])
        a, b = (np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in (a, b))
        res[f"{name}_ids_equal_rate"] = float((a == b).all(axis=1).mean())
    batch = px[:8]
    t = _median_interleaved({k: (lambda r=r: r.generate(batch, max_new_tokens=20)) for k, r in runners.items()}, reps)
    res["generate_b8_greedy_s"] = t
    res["generate_fp16_over_fp32"] = t["float16"] / t["float32"]
    return res


def base_vision(reps: int, threads: int, out: str) -> dict:
    import onnxruntime as ort
    import torch

    from backends.torch import BlipVisionModel
    from backends.torch.onnx_export import VisionGraph, _export
    from blip_core.configs import BlipVisionConfig
    cfg = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16)
    px = np.random.default_rng(0).standard_normal((1, 3, 384, 384)).astype(np.float32)
    sessions = {}
    model = BlipVisionModel(cfg, seed=0).eval()
    for dtype in ("float32", "float16"):
        model = model.to(getattr(torch, dtype))
        path = os.path.join(out, f"vision-{dtype}.onnx")
        _export(VisionGraph(model), [torch.from_numpy(px)], path, ["pixel_values"], ["last_hidden_state", "pooled"],
                {"pixel_values": {0: "batch"}}, 17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions[dtype] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    t = _median_interleaved({k: (lambda s=s: s.run(None, {"pixel_values": px})) for k, s in sessions.items()}, reps)
    return {"vision_b1_s": t, "vision_fp16_over_fp32": t["float16"] / t["float32"]}


def main(argv=None) -> int:
    import onnxruntime as ort
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-base", action="store_true", help="skip the BLIP base vision tower timing")
    args = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, threads {args.threads}, load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as out:
        res = caption_agreement(args.images, args.reps, args.threads, out)
        if not args.no_base:
            res.update(base_vision(args.reps, args.threads, out))
    for k, v in res.items():
        print(f"{k}: {v}")
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
