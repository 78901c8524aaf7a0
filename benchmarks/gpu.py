"""Captioning on a GPU (issue 19's GPU table): our torch, tf and jax backends against transformers' PyTorch.

    python benchmarks/gpu.py --out results.json        # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --quick      # the same code on tiny configs, on the CPU

BLIP base (random weights, seed 0, 384 px; one checkpoint that every impl loads onto the device),
greedy ``generate`` with 20 new tokens forced, float32 and bfloat16, batch 1 and 32; the pixels
are on the device before the timed calls (no host-to-device copy inside them). Every impl of a case
is timed interleaved with the others (``common.measure``: a first call untimed, then rounds in a
rotated order; the median). Each impl runs with its defaults: float32 products in float32 (torch's
default; our jax backend's for float32 models, ``backends.jax._base.float32_products``). The floor of
a case: the image side at the device's measured matrix rate plus 20 steps, each bound by its weight
bytes at the measured copy bandwidth or its FLOPs. ``--profile``: one batch-1 ``generate`` of each
torch impl under ``torch.profiler`` (host time, device time, kernel launches); ``--checks-only``: the
checks below without the timed cases.

Checks printed beside the timings, each against an independent reference:
  * teacher-forced logits in float32 on the device against transformers' float32 on the host CPU;
  * greedy ids at batch 32 (random weights): share of rows equal to transformers' on the device, per dtype;
  * the bundled trained captioner on 200 held-out synthetic images: share of greedy captions equal in
    bfloat16 and float32, per impl (the figure issue 19 asks to print beside a low-precision speed).

Impls that cannot be imported (tensorflow is not on every GPU machine) are reported, not timed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

from blip_core import to_numpy   # noqa: E402

from . import common   # noqa: E402
from .caption import NEW_TOKENS, caption_floor_terms, config   # noqa: E402
from .lowprec import BUNDLED, heldout_pixels   # noqa: E402

IMPLS = ("torch", "tf", "jax", "hf-torch")
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 32)


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("torch", "jax", "jaxlib", "flax", "tensorflow", "transformers", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


class Impl:
    """One implementation on one device: loading, moving inputs there, and the calls the workload makes."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        if name == "jax":
            import jax
            from backends.jax.loading import resolve_device
            self.jax = jax
            self.jdev = resolve_device(device)
        elif name == "tf":
            import tensorflow as tf
            from backends.tf.loading import tf_device
            self.tf, self._tf_device = tf, tf_device(device)
            if device.startswith("cuda") and not tf.config.list_logical_devices("GPU"):
                raise RuntimeError("tensorflow sees no GPU")
        else:
            import torch
            self.torch = torch

    def load(self, path: str, dtype: str, cls: str = "BlipForConditionalGeneration"):
        if self.name == "torch":
            import backends.torch as B
            return getattr(B, cls).from_pretrained(path, dtype=dtype, device=self.device).eval()
        if self.name == "jax":
            import backends.jax as B
            return getattr(B, cls).from_pretrained(path, dtype=dtype, device=self.jdev)
        if self.name == "tf":
            import backends.tf as B
            return getattr(B, cls).from_pretrained(path, dtype=dtype, device=self.device)
        import transformers
        tcls = getattr(transformers, cls)
        tdtype = getattr(self.torch, dtype)
        try:
            model = tcls.from_pretrained(path, dtype=tdtype)
        except TypeError:       # transformers before `dtype=`
            model = tcls.from_pretrained(path, torch_dtype=tdtype)
        return model.to(self.device).eval()

    def put(self, x: np.ndarray, dtype: str = None):
        """``x`` on the device (floating inputs in ``dtype``: transformers casts nothing for its caller)."""
        if self.name == "jax":
            return self.jax.device_put(x, self.jdev)
        if self.name == "tf":
            with self.tf.device(self._tf_device):
                return self.tf.constant(x)
        t = self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(getattr(self.torch, dtype)) if dtype and t.is_floating_point() and self.name == "hf-torch" else t

    def call(self, fn):
        """``fn()`` (under no_grad in torch, on the device in tf)."""
        if self.name == "tf":
            with self.tf.device(self._tf_device):
                return fn()
        if self.name == "jax":
            return fn()
        with self.torch.no_grad():
            return fn()


def device_rates(device: str) -> dict:
    """The device's measured ceilings through torch: float32 (no TF32) and bfloat16 matrix rates, copy bandwidth."""
    import torch
    n = 8192 if device.startswith("cuda") else 1024
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def median_s(fn, warmup: int = 2, reps: int = 6) -> float:
        times = []
        for i in range(warmup + reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))
    out = {}
    for dt in ("float32", "bfloat16"):
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=g).to(getattr(torch, dt))
        b = torch.randn(n, n, device=device, generator=g).to(getattr(torch, dt))
        out[f"matmul_{dt}_flops_per_s"] = 2.0 * n ** 3 / median_s(lambda: a @ b)
    x = torch.randn(256 << 20, device=device)       # 1 GiB, read and written
    y = torch.empty_like(x)
    out["copy_bytes_per_s"] = 2.0 * x.numel() * 4 / median_s(lambda: y.copy_(x))
    out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32) if device.startswith("cuda") else None
    return out


def _generated(ids) -> np.ndarray:
    """The last ``NEW_TOKENS`` ids of each row (the forced new tokens, whatever an impl puts before them)."""
    return np.asarray(to_numpy(ids))[:, -NEW_TOKENS:]


def _trim(row, eos: int) -> list:
    row = list(map(int, row))
    return row[:row.index(eos) + 1] if eos in row else row


def run(args, log=print) -> dict:
    import torch
    device = args.device
    start = time.perf_counter()
    log = (lambda text, _log=log: _log(f"[{time.perf_counter() - start:6.1f} s] {text}"))
    cfg = config(args.quick)
    results = {"environment": {"machine": platform.node(), "python": platform.python_version(),
                               "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                               "packages": _versions(), "command": " ".join(["python benchmarks/gpu.py"] + sys.argv[1:]),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "impls": {}, "cases": [], "checks": {}}
    env = results["environment"]
    log(f"device {env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    env["rates"] = device_rates(device)
    r = env["rates"]
    log(f"matmul float32 {r['matmul_float32_flops_per_s'] / 1e12:.1f} TFLOP/s, bfloat16 "
        f"{r['matmul_bfloat16_flops_per_s'] / 1e12:.1f} TFLOP/s, copy {r['copy_bytes_per_s'] / 1e9:.0f} GB/s")

    impls = {}
    for name in args.impls:
        try:
            impls[name] = Impl(name, device)
            results["impls"][name] = {"status": "ok"}
        except Exception as exc:   # noqa: BLE001 - an impl that cannot start is reported, the others run
            results["impls"][name] = {"status": "error", "error": common.error_text(exc)}
            log(f"{name}: unavailable: {common.error_text(exc)}")
    results["impls"].setdefault("hf-tf", {"status": "not run", "error": "transformers' TF classes are not timed here"})

    work = tempfile.mkdtemp(prefix="blip-gpu-")
    path = os.path.join(work, "caption")
    from backends.torch import BlipForConditionalGeneration
    BlipForConditionalGeneration(cfg, seed=0).save_pretrained(path)
    size = cfg.vision_config.image_size
    rng = np.random.default_rng(1)

    def save():
        if args.out:
            common.write_json(args.out, results)

    for dtype in args.dtypes:
        if args.checks_only and dtype != "float32":
            continue
        models, load_s = {}, {}
        for name, impl in impls.items():
            try:
                t0 = time.perf_counter()
                models[name] = impl.load(path, dtype)
                load_s[name] = time.perf_counter() - t0
            except Exception as exc:   # noqa: BLE001
                log(f"{name} {dtype}: load failed: {common.error_text(exc)}")
                traceback.print_exc()
                results["impls"][name].setdefault("load_errors", {})[dtype] = common.error_text(exc)
        for batch in () if args.checks_only else args.batches:
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            calls = {}
            for name, model in models.items():
                impl = impls[name]
                x = impl.put(pixels, dtype)
                kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
                calls[name] = (lambda m=model, x=x, impl=impl, kw=kw:
                               impl.call(lambda: m.generate(pixel_values=x, **kw)))
            stats = common.measure(calls, args.budget, args.max_reps, min_reps=args.min_reps, log=log)
            itemsize = 4 if dtype == "float32" else 2
            rate = r[f"matmul_{dtype}_flops_per_s"]
            floor = common.compute_bandwidth_floor_s(caption_floor_terms(cfg, batch, 1, NEW_TOKENS, itemsize), rate,
                                                     r["copy_bytes_per_s"])
            case = {"dtype": dtype, "batch": batch, "new_tokens": NEW_TOKENS, "image_size": size,
                    "floor_s": floor["total_s"], "floor": floor, "results": {}}
            ref = stats.get("hf-torch", {}).get("out")
            for name, st in stats.items():
                med = float(np.median(st["times"])) if st["times"] else None
                row = {"median_s": med, "times": st["times"], "first_s": st["first_s"], "error": st["error"],
                       "captions_per_s": batch / med if med else None, "load_s": load_s.get(name),
                       "over_floor": med / floor["total_s"] if med else None}
                if st["out"] is not None and ref is not None:
                    row["ids_equal_hf_torch"] = float(np.mean(np.all(_generated(st["out"]) == _generated(ref), axis=1)))
                case["results"][name] = row
            hf = case["results"].get("hf-torch", {}).get("median_s")
            for name, row in case["results"].items():
                row["speedup_vs_hf_torch"] = hf / row["median_s"] if hf and row["median_s"] else None
            results["cases"].append(case)
            save()
            log(f"  {dtype:<9} batch {batch:<3} floor {floor['total_s'] * 1e3:8.2f} ms | " + " | ".join(
                f"{n} " + (f"{row['median_s'] * 1e3:.1f} ms ({row['captions_per_s']:.1f}/s, x{row['speedup_vs_hf_torch'] or 0:.2f}"
                           f" hf, ids={row.get('ids_equal_hf_torch')})" if row["median_s"] else f"error {row['error']}")
                for n, row in case["results"].items()))
        if dtype == "float32":
            results["checks"]["logits"] = _check_logits(impls, models, cfg, path, log)
            save()
        del models
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    # the agreement first: it is the figure issue 19 asks for beside a low-precision speed (stop 31's GPU call ran
    # out of time after the profiles, before it)
    results["checks"]["bundled_agreement"] = _agreement(impls, args, model_dir=BUNDLED, log=log)
    save()
    if args.profile:
        results["profile"] = _profile(impls, path, cfg, args, log)
        save()
    return results


def _profile(impls, path, cfg, args, log) -> dict:
    """One batch-1 greedy ``generate`` of each torch impl and dtype under ``torch.profiler``: wall time, host
    time in torch's operators, device time in kernels, kernel launches; the top operators go to ``--profile``."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    size = cfg.vision_config.image_size
    pixels = np.random.default_rng(3).standard_normal((1, 3, size, size)).astype(np.float32)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    out, tables = {}, []
    for name in [n for n in impls if n in ("torch", "hf-torch")]:
        impl = impls[name]
        for dtype in args.dtypes:
            try:
                model = impl.load(path, dtype)
                x = impl.put(pixels, dtype)
                kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
                impl.call(lambda: to_numpy(model.generate(pixel_values=x, **kw)))
                with profile(activities=acts) as prof:
                    t0 = time.perf_counter()
                    impl.call(lambda: to_numpy(model.generate(pixel_values=x, **kw)))
                    wall = time.perf_counter() - t0
                ev = prof.key_averages()
                # kernels only, as the profiler's own "Self CUDA time total" (an operator's row repeats its kernels' time)
                dev = sum(e.self_device_time_total for e in ev
                          if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e6
                launches = sum(e.count for e in ev if "LaunchKernel" in e.key)
                ops = sum(e.count for e in ev if e.key.startswith("aten::"))
                out[f"{name}:{dtype}"] = {"wall_s": wall, "device_kernel_s": dev, "launches": launches, "aten_calls": ops}
                log(f"  profile {name} {dtype}: wall {wall * 1e3:.1f} ms, kernels {dev * 1e3:.1f} ms, "
                    f"{launches} launches, {ops} aten calls")
                tables.append(f"== {name} {dtype}\n" + ev.table(sort_by="self_cpu_time_total", row_limit=15))
                del model
            except Exception as exc:   # noqa: BLE001
                out[f"{name}:{dtype}"] = {"error": common.error_text(exc)}
                log(f"  profile {name} {dtype}: {common.error_text(exc)}")
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write("\n\n".join(tables))
    return out


def _check_logits(impls, models, cfg, path, log) -> dict:
    """float32 teacher-forced logits on the device against transformers' float32 on the host CPU."""
    import torch
    import transformers
    rng = np.random.default_rng(2)
    size = cfg.vision_config.image_size
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    ids = rng.integers(5, cfg.text_config.vocab_size - 5, size=(2, 8)).astype(np.int64)
    ids[:, 0] = cfg.text_config.bos_token_id
    ref_model = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids)).logits.numpy()
    out = {}
    for name, model in models.items():
        impl = impls[name]
        try:
            got = impl.call(lambda: model(pixel_values=impl.put(pixels, "float32"), input_ids=impl.put(ids)).logits)
            got = np.asarray(to_numpy(got), np.float64)
            out[name] = {"max_abs_diff": float(np.max(np.abs(got - ref))),
                         "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
        except Exception as exc:   # noqa: BLE001
            out[name] = {"error": common.error_text(exc)}
    log("  float32 logits on the device vs transformers float32 on the CPU: " + ", ".join(
        f"{n} " + (f"max|diff| {v['max_abs_diff']:.2e}, rel {v['rel_l2']:.1e}" if "error" not in v else v["error"])
        for n, v in out.items()))
    return out


def _agreement(impls, args, model_dir: str, log) -> dict:
    """The bundled captioner on held-out images: bfloat16 captions equal to float32's, per impl; and each impl's
    float32 captions equal to transformers' float32 on the device."""
    from blip_core.configs import load_config
    eos = load_config(model_dir).text_config.sep_token_id
    pixels = heldout_pixels(model_dir, args.heldout)
    caps = {}
    for name, impl in impls.items():
        for dtype in args.dtypes:
            try:
                model = impl.load(model_dir, dtype)
                rows = []
                for i in range(0, len(pixels), 50):
                    ids = impl.call(lambda: model.generate(pixel_values=impl.put(pixels[i:i + 50], dtype),
                                                           max_new_tokens=NEW_TOKENS))
                    rows.extend(_trim(r, eos) for r in np.asarray(to_numpy(ids)))
                caps[(name, dtype)] = rows
                del model
            except Exception as exc:   # noqa: BLE001
                log(f"  agreement: {name} {dtype}: {common.error_text(exc)}")
    out = {"images": len(pixels), "bfloat16_vs_float32": {}, "float32_vs_hf_torch": {}}
    strip = lambda rows: [r[-NEW_TOKENS - 1:] for r in rows]   # noqa: E731  (ours may keep the prompt differently)
    for name in impls:
        a, b = caps.get((name, "float32")), caps.get((name, "bfloat16"))
        if a and b:
            out["bfloat16_vs_float32"][name] = float(np.mean([x == y for x, y in zip(a, b)]))
        h = caps.get(("hf-torch", "float32"))
        if a and h:
            out["float32_vs_hf_torch"][name] = float(np.mean([x == y for x, y in zip(strip(a), strip(h))]))
    log(f"  bundled captioner, {len(pixels)} held-out images: bfloat16 = float32 "
        + ", ".join(f"{n} {100 * v:.1f}%" for n, v in out["bfloat16_vs_float32"].items())
        + "; float32 = transformers float32: "
        + ", ".join(f"{n} {100 * v:.1f}%" for n, v in out["float32_vs_hf_torch"].items()))
    return out


def markdown(results: dict) -> str:
    """The README table of a results file."""
    env = results["environment"]
    r = env["rates"]
    names = [n for n in IMPLS if any(n in c["results"] for c in results["cases"])]
    lines = [f"Device: {env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
             f"Command: `{env['command']}` ({env['date']}). Measured ceilings: matmul float32 "
             f"{r['matmul_float32_flops_per_s'] / 1e12:.0f} TFLOP/s, bfloat16 {r['matmul_bfloat16_flops_per_s'] / 1e12:.0f} "
             f"TFLOP/s, copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s.",
             "",
             "Median ms per greedy `generate` of 20 new tokens (captions/s; speed-up over transformers' PyTorch; "
             "floor / measured).",
             "",
             "| dtype | batch | floor | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for c in results["cases"]:
        cells = []
        for n in names:
            row = c["results"].get(n)
            if not row or not row.get("median_s"):
                cells.append("error" if row else "n/a")
                continue
            cells.append(f"{row['median_s'] * 1e3:.1f} ms ({row['captions_per_s']:.0f}/s; "
                         f"{row['speedup_vs_hf_torch']:.2f}x; {100 * c['floor_s'] / row['median_s']:.0f}%)")
        lines.append(f"| {c['dtype']} | {c['batch']} | {c['floor_s'] * 1e3:.2f} ms | " + " | ".join(cells) + " |")
    lg = results["checks"].get("logits", {})
    ag = results["checks"].get("bundled_agreement", {})
    if lg:
        lines += ["", "float32 logits on the device against transformers float32 on the CPU (max |diff|): " + ", ".join(
            f"{n} {v['max_abs_diff']:.1e}" for n, v in lg.items() if "max_abs_diff" in v) + "."]
    if ag:
        lines += [f"Bundled captioner, {ag['images']} held-out images, bfloat16 captions equal to float32's: " + ", ".join(
            f"{n} {100 * v:.1f}%" for n, v in ag["bfloat16_vs_float32"].items()) + "."]
    return "\n".join(lines)


def _environment() -> None:
    """Settings read when the frameworks are imported: set by ``main`` only (importing this module changes nothing)."""
    # jax takes most of the device's memory at its first use unless told not to; torch shares the device here
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_TF", "0")        # transformers' PyTorch classes only
    os.environ.setdefault("USE_FLAX", "0")


def main(argv=None) -> int:
    _environment()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (a dry run of the code)")
    p.add_argument("--impls", default=",".join(IMPLS), type=lambda s: s.split(","))
    p.add_argument("--dtypes", default=",".join(DTYPES), type=lambda s: s.split(","))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--budget", type=float, default=3.0, help="timed seconds per impl per case")
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--heldout", type=int, default=200, help="held-out images for the agreement check")
    p.add_argument("--quick", action="store_true", help="tiny configs")
    p.add_argument("--checks-only", action="store_true", help="the float32 checks and the agreement, no timed cases")
    p.add_argument("--profile", action="store_true", help="profile one batch-1 generate of each torch impl")
    p.add_argument("--profile-out", default=None, help="write the profiles' top operators here")
    common.add_results_arguments(p)
    args = p.parse_args(argv)
    if common.print_saved_table(args, markdown):
        return 0
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
            return 2
    results = run(args)
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
