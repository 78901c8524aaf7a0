"""ONNX Runtime captioning: the torch backend's ONNX export run by ``blip_runtime.OnnxBlip``, against our torch.

The same BLIP base captioner as ``caption.py`` (random weights, 20 new tokens forced, greedy and
beam 3, batch 1 and 8) is exported with ``backends.torch.onnx_export`` and timed interleaved with
our torch backend's ``generate`` on the same pixels, so ``onnxruntime/torch`` is a same-load ratio;
ids are checked equal. Records go to the results as workload ``caption-onnx`` with the columns
``torch`` and ``onnxruntime`` (``benchmarks/report.py`` adds the column). The floor is torch's
(same CPU, same FLOPs). Not in the default set of ``run_all.py``: run
``python benchmarks/run_all.py --only caption,onnx`` (or ``python benchmarks/onnx.py``).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from . import common   # noqa: E402
from .caption import NEW_TOKENS, caption_flops, caption_weight_bytes, config   # noqa: E402

IMPL = "onnxruntime"


def _result(st, flops, framework, version, threads):
    if st["error"]:
        return {"status": "error", "reason": st["error"], "first_call_s": st["first_s"]}
    times = st["times"] or [st["first_s"]]
    med = float(np.median(times))
    peaks = [p for p in st["peaks"] if p is not None]
    return {"status": "ok", "framework": framework, "version": version, "device": "cpu", "dtype": "float32",
            "threads": threads, "median_s": med, "min_s": float(min(times)), "times_s": [round(t, 6) for t in times],
            "n": len(times), "first_call_s": st["first_s"], "peak_rss_delta_mb": max(peaks) if peaks else None,
            "first_call_peak_rss_delta_mb": st["first_peak"], "achieved_gflops_per_s": flops / med / 1e9}


def torch_model(cls, cfg):
    """The torch column's model, in eval mode (``common.random_model``): ``export_onnx`` exports in eval mode but
    leaves the caller's modes as they were."""
    return common.random_model(cls, cfg)


def run(ctx) -> None:
    import onnxruntime

    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    if ctx.dtype != "float32":
        raise ValueError("the ONNX export is float32 only")
    cfg = config(ctx.quick)
    ctx.framework("torch")
    model = torch_model(ctx.ours_class("torch", "BlipForConditionalGeneration"), cfg)
    path = os.path.join(ctx.tmp, "caption-onnx")
    export_onnx(model, path)
    runner = OnnxBlip(path, threads=ctx.threads)
    torch_info = common.framework_info("torch")
    rng = np.random.default_rng(1)
    size = cfg.vision_config.image_size
    for batch in (1,) if ctx.quick else (1, 8):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        for beams in (1, 3):
            mode = "greedy" if beams == 1 else f"beam{beams}"
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams)
            flops = caption_flops(cfg, batch, beams, NEW_TOKENS)
            total = float(sum(flops.values()))
            case = f"{mode}, batch {batch}, {NEW_TOKENS} tokens"
            ctx.log(f"\n== caption-onnx | {case} | {total / 1e9:.2f} GFLOP | float32 | "
                    f"threads {ctx.threads or 'default'}")
            calls = {"torch": ctx.wrap("torch", lambda x=pixels, o=kw: model.generate(pixel_values=x, **o)),
                     IMPL: lambda x=pixels, o=kw: runner.generate(x, **o)}
            stats = common.measure(calls, ctx.budget_s, ctx.max_reps, log=ctx.log)
            results = {"torch": _result(stats["torch"], total, "torch", torch_info.get("version"),
                                        torch_info.get("threads")),
                       IMPL: _result(stats[IMPL], total, "onnxruntime", onnxruntime.__version__, ctx.threads)}
            if all(r["status"] == "ok" for r in results.values()):
                same = bool(np.array_equal(stats[IMPL]["out"], stats["torch"]["out"]))
                results[IMPL]["check"] = {"against": "torch", "ids_equal": same}
                ratios = {f"{IMPL}/torch": results[IMPL]["median_s"] / results["torch"]["median_s"]}
            else:
                ratios = {}
            record = {"workload": "caption-onnx", "case": case, "mode": mode,
                      "params": {"batch": batch, "num_beams": beams, "new_tokens": NEW_TOKENS, "image_size": size},
                      "dtype": "float32", "flops": total, "flops_breakdown": flops,
                      "weight_bytes": caption_weight_bytes(cfg, NEW_TOKENS, 4), "results": results, "ratios": ratios}
            # one CPU and the same FLOPs: onnxruntime's floor is torch's measured matmul rate
            ctx.rates[IMPL] = dict(ctx.rates.get("torch", {}), note="torch's matmul rate (same CPU)")
            ctx._floors(record)
            ctx.cases.append(record)
            for impl, r in results.items():
                text = (f"{r['median_s']:.3f} s median of {r['n']}" if r["status"] == "ok" else r["reason"])
                ctx.log(f"  {impl:<12} {text}" + (f"  ids == torch: {r['check']['ids_equal']}" if "check" in r else ""))
            if ratios:
                ctx.log(f"  onnxruntime / torch: {ratios[f'{IMPL}/torch']:.2f}")


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "onnx", "--backends", "torch"] + sys.argv[1:]))
