"""Where the first JAX caption of a new process spends its time, with a warm stored-program cache.

A first process (empty cache folder) traces, compiles and stores the generate program; a second one
(the same folder) is timed: building the model (random weights; the stored program is loaded meanwhile on
a thread of its own, ``program_cache.preload``), what the call still waits for the program
(``program_cache.load``: the preload's rest, or read, check, deserialize when nothing was preloaded), XLA
compiles on the side (count and seconds, from ``jax.monitoring``; 0 expected), traces of the model (0
expected), the first call, and the second call (the steady cost). first - second - load is what the first
execution costs beyond a steady one.

    python benchmarks/jax_first_call.py            # BLIP base, 384 px, greedy, 20 new tokens forced
    python benchmarks/jax_first_call.py --quick    # tiny config
    python benchmarks/jax_first_call.py --no-preload   # the program loaded by the call, as before preloading
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(quick: bool, preload: bool = True) -> dict:
    import jax
    import numpy as np

    from backends.jax import BlipForConditionalGeneration, program_cache

    from .caption import config
    events = {"compiles": 0, "compile_s": 0.0, "load_s": 0.0}

    def on_duration(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            events["compiles"] += 1
            events["compile_s"] += secs
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    load = program_cache.load

    def timed_load(name):
        t = time.perf_counter()
        try:
            return load(name)
        finally:
            events["load_s"] += time.perf_counter() - t
    program_cache.load = timed_load
    take = program_cache._take_preloaded

    def noted_take(top, name):
        events["preloaded"] = take(top, name)
        return events["preloaded"]
    program_cache._take_preloaded = noted_take
    if not preload:
        program_cache.preload = lambda model: None
    cfg = config(quick)
    t = time.perf_counter()
    model = BlipForConditionalGeneration(cfg, seed=0)
    events["model_s"] = time.perf_counter() - t
    size = cfg.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    kw = dict(max_new_tokens=20, min_new_tokens=20)
    events.update(compiles=0, compile_s=0.0)           # building the model is not the call
    times = []
    for _ in range(2):
        t = time.perf_counter()
        np.asarray(model.generate(pixel_values=px, **kw))
        times.append(time.perf_counter() - t)
    return dict(events, preloaded=events.get("preloaded") is not None, first_s=times[0], second_s=times[1],
                traces=model.trace_count("generate"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jax_first_call.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="tiny config")
    p.add_argument("--no-preload", action="store_true", help="no program loaded while the model is built")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.quick, not args.no_preload)))
        return 0
    with tempfile.TemporaryDirectory(prefix="blip-first-call-") as tmp:
        env = dict(os.environ, BLIP_COMPILE_CACHE=tmp)
        cmd = [sys.executable, "-m", "benchmarks.jax_first_call", "--child"] + (["--quick"] if args.quick else []) \
            + (["--no-preload"] if args.no_preload else [])
        for which in ("cold", "warm"):
            load = os.getloadavg()[0]
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rest = r["first_s"] - r["second_s"] - r["load_s"]
            print(f"{which}: model {r['model_s']:.2f} s (program preloaded meanwhile: {r['preloaded']}); "
                  f"first {r['first_s']:.2f} s = stored-program load {r['load_s']:.2f} s + XLA compiles "
                  f"{r['compiles']} ({r['compile_s']:.2f} s) + run; second {r['second_s']:.2f} s; "
                  f"first - second - load {rest:.2f} s; traces {r['traces']} (load average {load:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
