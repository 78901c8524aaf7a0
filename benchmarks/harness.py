"""The benchmark context: builds every impl from one checkpoint, runs a case interleaved, prints and records it.

A workload module (``vision.py``, ``caption.py``, ...) asks ``ctx.build(arch, config)`` for its
models, wraps one call per impl in a closure and hands them to ``ctx.run_case``, which times them
interleaved, checks the outputs agree with the reference, computes the compute floor and prints
one row per impl with framework version, device, dtype and thread count beside each figure.
"""
from __future__ import annotations

import gc
import importlib
import os
import shutil
import tempfile
import time

import numpy as np

from . import common
from .common import FRAMEWORK, OURS, Unavailable, fmt_s

HF_CONFIG = {"BlipVisionModel": "BlipVisionConfig", "Blip2VisionModelWithProjection": "Blip2Config",
             "Blip2ForConditionalGeneration": "Blip2Config"}   # everything else: BlipConfig


class Context:
    """Options and state of one benchmark run (see ``run_all.py`` for the command line)."""

    def __init__(self, impls, dtype="float32", threads=None, quick=False, budget_s=30.0, max_reps=10, log=print):
        self.impls, self.dtype, self.threads, self.quick = list(impls), dtype, threads, quick
        self.budget_s, self.max_reps, self.log = budget_s, max_reps, log
        self.tmp = tempfile.mkdtemp(prefix="blip-bench-")
        self.itemsize = 4 if dtype == "float32" else 2
        self.cases, self.rates, self.bandwidth = [], {}, None
        self.sections = {}   # workload -> an extra table outside the impl grid (``lowprec``)
        self.failed = {}   # (impl, workload, mode) -> error: later cases of that mode are not retried

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- frameworks ------------------------------------------------------------------------------
    def framework(self, impl: str):
        return common.framework(FRAMEWORK[impl], self.threads)

    def refresh_rates(self, fw_names) -> None:
        """Measure each framework's matmul rate and the memory bandwidth again, keeping the best seen.

        The machine's load changes during a run; the floors use the best rate of the whole run (a
        floor must not be beaten), measured before every workload so it tracks what the cases saw."""
        for fw_name in fw_names:
            prev = self.rates.get(fw_name, {})
            if "error" in prev:
                continue
            try:
                common.framework(fw_name, self.threads)
                r = common.matmul_rate(fw_name, n=256 if self.quick else 2048, dtype=self.dtype)
            except Exception as exc:   # noqa: BLE001
                self.rates[fw_name] = {"error": common.error_text(exc)}
                continue
            seen = prev.get("measured_flops_per_s", []) + [round(r["best_flops_per_s"])]
            self.rates[fw_name] = dict(r, best_flops_per_s=max(seen), measured_flops_per_s=seen)
            self.log(f"  matmul {fw_name}: {r['n']}x{r['n']} {r['dtype']} {r['best_flops_per_s'] / 1e9:.1f} GFLOP/s "
                     f"now, best this run {max(seen) / 1e9:.1f}")
        bw = common.memory_bandwidth(16 if self.quick else 256)
        seen = (self.bandwidth or {}).get("measured_bytes_per_s", []) + [round(bw["best_bytes_per_s"])]
        self.bandwidth = dict(bw, best_bytes_per_s=max(seen), measured_bytes_per_s=seen)
        self.log(f"  memory bandwidth: read {bw['read_best_bytes_per_s'] / 1e9:.1f}, copy {bw['copy_best_bytes_per_s'] / 1e9:.1f}"
                 f" GB/s now, best this run {max(seen) / 1e9:.1f}")

    def rate(self, fw_name: str):
        """Best matmul FLOP/s of a framework so far, or None where it does not import."""
        if fw_name not in self.rates:
            self.refresh_rates([fw_name])
        return self.rates[fw_name].get("best_flops_per_s")

    def _floors(self, record) -> None:
        bw = (self.bandwidth or {}).get("best_bytes_per_s")
        for r in record["results"].values():
            if r["status"] != "ok":
                continue
            rate = self.rate(r["framework"])
            r["floor_s"] = record["flops"] / rate if rate else None
            r["floor_fraction"] = r["floor_s"] / r["median_s"] if r["floor_s"] else None
            wb = record.get("weight_bytes")
            r["bandwidth_floor_s"] = wb / bw if wb and bw else None
            terms = record.get("floor_terms")
            if terms and rate and bw:   # decoding: the input side at the matmul rate + the steps' weight reads
                r["compute_bandwidth_floor_s"] = common.compute_bandwidth_floor_s(terms, rate, bw)["total_s"]
                r["time_over_compute_bandwidth_floor"] = r["median_s"] / r["compute_bandwidth_floor_s"]

    def finalize(self) -> None:
        """Recompute every floor with the best rates of the whole run (the per-case tables used those so far)."""
        for record in self.cases:
            self._floors(record)

    # -- models ----------------------------------------------------------------------------------
    def ours_class(self, backend: str, arch: str):
        self.framework(backend)
        try:
            module = importlib.import_module(f"backends.{backend}")
        except Exception as exc:   # noqa: BLE001
            raise Unavailable(f"import backends.{backend} failed: {common.error_text(exc)}") from None
        try:
            return getattr(module, arch)
        except AttributeError:
            raise Unavailable(f"backends.{backend} has no {arch} yet") from None
        except Exception as exc:   # noqa: BLE001 - a lazily imported module that is missing or broken
            raise Unavailable(f"backends.{backend}.{arch} does not import: {common.error_text(exc)}") from None

    def _hf(self, arch: str, tf: bool = False):
        self.framework("hf-tf" if tf else "hf-torch")
        try:
            import transformers
        except Exception as exc:   # noqa: BLE001
            raise Unavailable(f"cannot import transformers: {exc}") from None
        name = ("TF" if tf else "") + arch
        if not hasattr(transformers, name):
            raise Unavailable(f"transformers {transformers.__version__} has no {name}")
        return transformers, getattr(transformers, name)

    def _hf_config(self, transformers, arch: str, path: str, tf: bool):
        cfg = getattr(transformers, HF_CONFIG.get(arch, "BlipConfig")).from_pretrained(path)
        if tf:   # transformers' TF input signature wants num_channels, which BLIP configs lack
            vc = getattr(cfg, "vision_config", cfg)
            vc.num_channels = 3
        return cfg

    def build(self, arch: str, config):
        """``({impl: model}, {impl: skip reason}, {impl: load seconds})`` sharing one set of random weights.

        Our first importable backend builds the weights (``Cls(config, seed=0)``) and saves them;
        every impl then loads that directory with ``from_pretrained`` (which also puts torch modules
        in inference mode, as in transformers). transformers' TF loader cannot read PyTorch
        safetensors in 4.57, so it reads a ``pytorch_model.bin`` written by transformers' PyTorch.
        """
        path = os.path.join(self.tmp, arch)
        models, skipped, load_s, source = {}, {}, {}, None
        for backend in OURS:
            try:
                cls = self.ours_class(backend, arch)
                model = cls(config, seed=0)
                model.save_pretrained(path)
            except Exception as exc:   # noqa: BLE001
                if not isinstance(exc, Unavailable):
                    skipped.setdefault(backend, f"building {arch} failed: {common.error_text(exc)}")
                continue
            source = backend
            del model   # every impl, this one included, loads the saved files: same weights, inference mode
            break
        if source is None:   # none of ours has the class yet: let transformers draw the weights
            try:
                transformers, cls = self._hf(arch)
                config.save_pretrained(path)
                cls(self._hf_config(transformers, arch, path, False)).save_pretrained(path)
                source = "hf-torch"
            except Exception as exc:   # noqa: BLE001
                reason = f"no implementation could build {arch}: {exc}"
                return {}, {k: skipped.get(k, reason) for k in self.impls}, {}
        self.log(f"  weights: {arch} built by {source} (seed 0) in {path}")
        for impl in self.impls:
            if impl in models or impl in skipped:
                continue
            t0 = time.perf_counter()
            try:
                models[impl] = self._load(impl, arch, path)
                load_s[impl] = time.perf_counter() - t0
            except Unavailable as exc:
                skipped[impl] = str(exc)
            except Exception as exc:   # noqa: BLE001
                skipped[impl] = f"loading failed: {common.error_text(exc)}"
        for impl, reason in skipped.items():
            self.log(f"  {impl}: skipped ({reason})")
        return models, {k: v for k, v in skipped.items() if k in self.impls}, load_s

    def _load(self, impl: str, arch: str, path: str):
        if impl in OURS:
            return self.ours_class(impl, arch).from_pretrained(path, dtype=self.dtype)
        tf = impl == "hf-tf"
        if tf and self.dtype != "float32":
            raise Unavailable("transformers' TF classes are benchmarked in float32 only")
        transformers, cls = self._hf(arch, tf)
        if not tf:
            torch = self.framework("hf-torch")
            return cls.from_pretrained(path, dtype=getattr(torch, self.dtype)).eval()
        bin_path = path + "-bin"
        if not os.path.isdir(bin_path):
            _, pt_cls = self._hf(arch)
            pt = pt_cls.from_pretrained(path)
            pt.save_pretrained(bin_path, safe_serialization=False)
            del pt
        return cls.from_pretrained(bin_path, config=self._hf_config(transformers, arch, bin_path, True), from_pt=True)

    # -- inputs ----------------------------------------------------------------------------------
    def native(self, impl: str, x: np.ndarray):
        """Our backends take numpy through the public API; references get their own tensors up front."""
        if impl in OURS:
            return x
        if impl == "hf-torch":
            torch = self.framework(impl)
            t = torch.from_numpy(np.ascontiguousarray(x))
            if t.is_floating_point():
                return t.to(getattr(torch, self.dtype))
            return t.long()
        tf = self.framework(impl)
        return tf.constant(x.astype(np.int32) if x.dtype.kind in "iu" else x)

    def wrap(self, impl: str, fn):
        """Inference conditions: torch calls run under ``no_grad`` (transformers' generate does the same)."""
        if FRAMEWORK[impl] != "torch":
            return fn
        torch = self.framework(impl)

        def call():
            with torch.no_grad():
                return fn()
        return call

    # -- one case --------------------------------------------------------------------------------
    def run_case(self, workload: str, case: str, calls: dict, skipped: dict, flops: dict, params: dict,
                 mode: str, check: str = "allclose", load_s=None, unit=None, weight_bytes=None, floor_terms=None):
        """Time ``calls`` ({impl: zero-arg callable}) interleaved and record one case.

        ``flops``: {part: FLOPs}; ``check``: "allclose" (max abs diff) or "ids" (exact) against hf-torch
        (else the first impl that ran); ``unit``: (name, count) for a throughput column (e.g. pairs);
        ``weight_bytes``: bytes of weights the workload must read at least (decoding), for a bandwidth floor;
        ``floor_terms``: FLOPs and bytes of ``common.compute_bandwidth_floor_s`` (decoding workloads).
        """
        total = float(sum(flops.values()))
        skipped = dict(skipped)
        for impl in list(calls):
            key = (impl, workload, mode)
            if key in self.failed:
                skipped[impl] = f"not retried: failed in an earlier {mode} case ({self.failed[key]})"
                del calls[impl]
        self.log(f"\n== {workload} | {case} | {total / 1e9:.2f} GFLOP | {self.dtype} | "
                 f"threads {self.threads or 'default'} | impls {', '.join(calls) or 'none'}")
        stats = common.measure({k: self.wrap(k, fn) for k, fn in calls.items()}, self.budget_s, self.max_reps,
                               log=self.log)
        results = {}
        for impl in self.impls:
            if impl in skipped or impl not in stats:
                results[impl] = {"status": "skipped", "reason": skipped.get(impl, "not requested for this case")}
                continue
            st = stats[impl]
            if st["error"]:
                self.failed[(impl, workload, mode)] = st["error"]
                results[impl] = {"status": "error", "reason": st["error"], "first_call_s": st["first_s"]}
                continue
            fw = common.framework_info(FRAMEWORK[impl])
            times = st["times"]
            med = float(np.median(times))
            peaks = [p for p in st["peaks"] if p is not None]
            r = {"status": "ok", "framework": FRAMEWORK[impl], "version": fw.get("version"),
                 "device": fw.get("device"), "dtype": self.dtype, "threads": fw.get("threads"),
                 "median_s": med, "min_s": float(min(times)), "times_s": [round(t, 6) for t in times],
                 "n": len(times), "first_call_s": st["first_s"],
                 "peak_rss_delta_mb": max(peaks) if peaks else None, "first_call_peak_rss_delta_mb": st["first_peak"],
                 "load_s": (load_s or {}).get(impl), "achieved_gflops_per_s": total / med / 1e9}
            if unit:
                r[f"{unit[0]}_per_s"] = unit[1] / med
            results[impl] = r
        self._check(results, stats, check)
        ratios = {}
        oks = [k for k in self.impls if results[k]["status"] == "ok"]
        for a in oks:
            for b in oks:
                if a != b and (a in OURS and (b not in OURS or OURS.index(a) > OURS.index(b))):
                    ratios[f"{a}/{b}"] = results[a]["median_s"] / results[b]["median_s"]
        record = {"workload": workload, "case": case, "mode": mode, "params": params, "dtype": self.dtype,
                  "flops": total, "flops_breakdown": flops, "weight_bytes": weight_bytes, "floor_terms": floor_terms,
                  "results": results, "ratios": ratios}
        self._floors(record)
        self.cases.append(record)
        self._print(record, unit)
        del stats
        gc.collect()
        return record

    def _check(self, results, stats, check):
        """Record how each output compares with the reference's: the figures must compare like with like."""
        oks = [k for k in self.impls if results[k]["status"] == "ok"]
        if not oks:
            return
        ref = "hf-torch" if "hf-torch" in oks else oks[0]
        want = stats[ref]["out"]
        for impl in oks:
            got, c = stats[impl]["out"], {"against": ref}
            if got.shape != want.shape:
                c["shape_mismatch"] = [list(got.shape), list(want.shape)]
            elif check == "ids":
                c["ids_equal"] = bool(np.array_equal(got, want))
            else:
                c["max_abs_diff"] = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
            results[impl]["check"] = c

    @staticmethod
    def _check_text(impl, c) -> str:
        if not c or c["against"] == impl:
            return "reference" if c else ""
        if "shape_mismatch" in c:
            return f"shape {c['shape_mismatch'][0]} != {c['against']} {c['shape_mismatch'][1]}"
        if "ids_equal" in c:
            return f"ids {'==' if c['ids_equal'] else '!='} {c['against']}"
        return f"max|diff| {c['max_abs_diff']:.1e} vs {c['against']}"

    def _print(self, record, unit):
        head = (f"  {'impl':<9}{'framework':<22}{'device':<14}{'dtype':<9}{'thr':>4}{'median':>11}{'min':>11}"
                f"{'n':>3}{'first':>11}{'peak MiB':>11}{'GFLOP/s':>9}{'floor':>11}{'floor/t':>8}{'bw floor':>10}"
                + (f"{unit[0] + '/s':>10}" if unit else "") + "  check")
        self.log(head)
        self.log("  (median/min/n: timed calls; first: first call, compile included; peak MiB: largest RSS growth "
                 "during a timed call / the first call; floor: FLOPs / best matmul rate; floor/t: floor / median; "
                 "bw floor: weight bytes / memory bandwidth)")
        for impl, r in record["results"].items():
            if r["status"] != "ok":
                self.log(f"  {impl:<9}{r['status']}: {r['reason']}")
                continue
            peak = "/".join("-" if v is None else f"{v:.0f}" for v in (r["peak_rss_delta_mb"],
                                                                      r["first_call_peak_rss_delta_mb"]))
            frac = "-" if r["floor_fraction"] is None else f"{r['floor_fraction']:.2f}"
            extra = f"{r[unit[0] + '_per_s']:>10.2f}" if unit else ""
            self.log(f"  {impl:<9}{r['framework'] + ' ' + str(r['version']):<22}{str(r['device'])[:13]:<14}"
                     f"{r['dtype']:<9}{r['threads']:>4}{fmt_s(r['median_s']):>11}{fmt_s(r['min_s']):>11}{r['n']:>3}"
                     f"{fmt_s(r['first_call_s']):>11}{peak:>11}{r['achieved_gflops_per_s']:>9.1f}"
                     f"{fmt_s(r['floor_s']):>11}{frac:>8}{fmt_s(r['bandwidth_floor_s']):>10}{extra}  {self._check_text(impl, r.get('check'))}")
        if record["ratios"]:
            self.log("  time ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in record["ratios"].items()))
