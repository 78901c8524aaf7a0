"""Cold start, per-token decode and decoding memory of the compiled backends, each in fresh processes.

* ``first caption``: a new process imports the backend and builds the BLIP-base captioner (random
  weights; both timed apart, not counted) and times its first ``generate`` (384 px, batch 1, greedy,
  20 new tokens forced) and its second one;
  once with an empty persistent compilation cache ("cold") and once more with the cache the first
  process wrote ("warm"), see ``blip_core.persistent_cache``.
* ``decode per token``: one process holds every requested backend and times a 4- and a 20-token greedy
  call back to back, per backend, the backends in a rotated order each round; the median over rounds of
  (t20 - t4) / 16 is the cost of one decode step, compared across backends.
* ``beam memory``: peak resident memory added by batch-8 beam-3 captioning (20 tokens), one process
  per backend (first call, compile included, and a second call).

    python benchmarks/coldstart.py                    # torch, tf, jax on BLIP base
    python benchmarks/coldstart.py --quick --backends tf,jax
    python benchmarks/run_all.py --only coldstart     # the same, recorded with the other workloads
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

import numpy as np   # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 20
BACKENDS = ("torch", "tf", "jax")


# -- children ---------------------------------------------------------------------------------------
def _model(backend: str, quick: bool):
    import importlib
    from .caption import config
    from .common import random_model
    mod = importlib.import_module(f"backends.{backend}")
    cfg = config(quick)
    return random_model(mod.BlipForConditionalGeneration, cfg), cfg.vision_config.image_size


def _timed(model, px, **kw):
    t = time.perf_counter()
    np.asarray(model.generate(pixel_values=px, **kw))
    return time.perf_counter() - t


def child_first(backend: str, quick: bool) -> dict:
    import importlib
    t = time.perf_counter()
    importlib.import_module(f"backends.{backend}")
    imported = time.perf_counter() - t
    model, size = _model(backend, quick)
    load = time.perf_counter() - t
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    first = _timed(model, px, **kw)
    out = {"import_s": imported, "load_s": load, "first_s": first, "second_s": _timed(model, px, **kw)}
    if hasattr(model, "trace_count"):      # jax: 0 when the stored program ran (backends/jax/program_cache.py)
        out["generate_traces"] = model.trace_count("generate")
    elif backend == "tf":                  # tf: the same, backends/tf/program_cache.py
        from backends.tf.generation import trace_count
        out["generate_traces"] = trace_count(model)
    return out


def child_decode(backends, quick: bool, reps: int) -> dict:
    models = {b: _model(b, quick) for b in backends}
    size = next(iter(models.values()))[1]
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    times = {b: {4: [], NEW_TOKENS: []} for b in backends}
    order = list(models)
    for rep in range(reps + 1):                  # the first round compiles, untimed
        # each backend's two calls back to back, the backends in a rotated order: one backend does not always run
        # right after another's call (stop 43: with tf always first, jax's figure moved 18-25 ms between runs)
        for b in order[rep % len(order):] + order[:rep % len(order)]:
            for n in (4, NEW_TOKENS):
                t = _timed(models[b][0], px, max_new_tokens=n, min_new_tokens=n)
                if rep:
                    times[b][n].append(t)
    out = {}
    for b, t in times.items():
        steps = [(full - short) / (NEW_TOKENS - 4) for short, full in zip(t[4], t[NEW_TOKENS])]
        out[b] = {"per_token_s": float(np.median(steps)), "call_4_s": float(np.median(t[4])),
                  "call_20_s": float(np.median(t[NEW_TOKENS]))}
    return out


def child_memory(backend: str, quick: bool) -> dict:
    from .common import PeakRSS, _status_kb
    model, size = _model(backend, quick)
    batch = 2 if quick else 8
    px = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3)
    rss = _status_kb("VmRSS:")
    with PeakRSS() as first:
        _timed(model, px, **kw)
    with PeakRSS() as second:
        _timed(model, px, **kw)
    return {"batch": batch, "rss_after_load_mb": None if rss is None else round(rss / 1024, 1),
            "first_peak_delta_mb": first.delta_mb, "second_peak_delta_mb": second.delta_mb,
            "peak_rss_mb": round((_status_kb("VmHWM:") or 0) / 1024, 1)}


# -- parent -----------------------------------------------------------------------------------------
def _spawn(args: list, cache_dir=None, timeout=1800) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TOKENIZERS_PARALLELISM="false")
    if cache_dir is not None:
        env["BLIP_COMPILE_CACHE"] = cache_dir
        # a parent that imported backends.tf (run_all) exported its own XLA cache folder: the child's is cache_dir
        env["TF_XLA_FLAGS"] = " ".join(f for f in env.get("TF_XLA_FLAGS", "").split()
                                       if not f.startswith("--tf_xla_persistent_cache_directory"))
    cmd = [sys.executable, "-m", "benchmarks.coldstart", "--child"] + args
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(backends, quick: bool, reps: int = 6, log=print) -> dict:
    """Every figure of this module, with the load average before and after each."""
    q = ["--quick"] if quick else []
    res = {"first": {}, "decode": None, "memory": {}}
    for b in backends:
        with tempfile.TemporaryDirectory(prefix="blip-coldstart-") as tmp:
            load = os.getloadavg()[0]
            cold = _spawn(["first", "--backends", b] + q, cache_dir=tmp)
            warm = _spawn(["first", "--backends", b] + q, cache_dir=tmp)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        res["first"][b] = {"cold": cold, "warm": warm, "cache_mb": round(size / 2**20, 1),
                           "load_average": [load, os.getloadavg()[0]]}
        log(f"  {b:<6} first caption: cold {cold['first_s']:.2f} s, warm {warm['first_s']:.2f} s, "
            f"steady {warm['second_s']:.2f} s (cache {size / 2**20:.1f} MB; import {warm['import_s']:.2f} s, "
            f"model {warm['load_s'] - warm['import_s']:.2f} s, not counted; load {load:.2f})")
    compiled = [b for b in backends if b != "torch"] or list(backends)
    load = os.getloadavg()[0]
    res["decode"] = dict(_spawn(["decode", "--backends", ",".join(compiled), "--reps", str(reps)] + q),
                         load_average=[load, os.getloadavg()[0]])
    for b in compiled:
        d = res["decode"][b]
        log(f"  {b:<6} decode: {d['per_token_s'] * 1e3:.1f} ms/token (4 tokens {d['call_4_s']:.2f} s, "
            f"20 tokens {d['call_20_s']:.2f} s; load {load:.2f})")
    for b in backends:
        load = os.getloadavg()[0]
        m = _spawn(["memory", "--backends", b] + q)
        res["memory"][b] = dict(m, load_average=[load, os.getloadavg()[0]])
        log(f"  {b:<6} beam-3 batch {m['batch']}: peak +{m['first_peak_delta_mb']} MB first call, "
            f"+{m['second_peak_delta_mb']} MB second (after load {m['rss_after_load_mb']} MB, peak {m['peak_rss_mb']} MB)")
    return res


def _record(ctx, case, mode, values, params):
    """One case of the run_all results (a time per impl; no FLOP floor)."""
    from .common import FRAMEWORK, framework_info
    results = {}
    for impl in ctx.impls:
        if impl not in values:
            results[impl] = {"status": "skipped", "reason": "not measured by this case"}
            continue
        fw = framework_info(FRAMEWORK[impl])
        results[impl] = {"status": "ok", "framework": FRAMEWORK[impl], "version": fw.get("version"),
                         "device": fw.get("device"), "dtype": "float32", "median_s": values[impl], "n": 1}
    ctx.cases.append({"workload": "coldstart", "case": case, "mode": mode, "params": params, "dtype": "float32",
                      "flops": 0.0, "flops_breakdown": {}, "weight_bytes": None, "results": results, "ratios": {}})


def run(ctx) -> None:
    """``run_all.py --only coldstart``: the figures above as cases of the shared table (ours only)."""
    backends = [b for b in ctx.impls if b in BACKENDS]
    ctx.log(f"\n== coldstart | BLIP {'tiny' if ctx.quick else 'base'} | fresh processes | {', '.join(backends)}")
    res = measure(backends, ctx.quick, reps=1 if ctx.quick else 6, log=ctx.log)
    params = {"new_tokens": NEW_TOKENS, "batch": 1, "details": res}
    for which in ("cold", "warm"):
        _record(ctx, f"first caption, {which} compile cache", which,
                {b: r[which]["first_s"] for b, r in res["first"].items()}, params)
    _record(ctx, "decode, one token (batch 1)", "per_token",
            {b: r["per_token_s"] for b, r in res["decode"].items() if isinstance(r, dict)}, {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="coldstart.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--child", choices=["first", "decode", "memory"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--quick", action="store_true", help="tiny config (smoke run)")
    p.add_argument("--reps", type=int, default=6, help="timed rounds of the decode measurement")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.child == "first":
        print(json.dumps(child_first(backends[0], args.quick)))
    elif args.child == "decode":
        print(json.dumps(child_decode(backends, args.quick, args.reps)))
    elif args.child == "memory":
        print(json.dumps(child_memory(backends[0], args.quick)))
    else:
        from .common import environment
        env = environment([], "float32", None)   # the children import the frameworks
        print(f"coldstart on {env['cpu']} ({env['usable_cpus']} usable CPUs, load {env['load_average'][0]:.2f})")
        res = measure(backends, args.quick, args.reps)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump({"environment": env, "results": res}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
