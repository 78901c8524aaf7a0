"""Cold first caption: a new process loads the captioner, then times its first and second ``generate``.

For each requested impl (our backends and transformers' PyTorch), a fresh Python process imports
the framework, loads the BLIP-base captioner (random weights, the run's checkpoint) and captions one
384 px image (greedy, 20 new tokens forced) twice. Reported: import + load seconds, the first
call (what ``blip caption one.jpg`` feels, model load excluded: tracing, compilation, caches, lazy
allocation) and the second (warm). Whatever persistent caches a backend keeps on disk are left as
they are, so a second run of this workload shows the warm-cache cold start. Run alone with
``python benchmarks/coldstart.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

from . import common   # noqa: E402
from .common import OURS   # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = OURS + ("hf-torch",)
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
impl, path, threads, root = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, root)
from benchmarks import common
threads = int(threads) or None
common.configure_environment(threads, (impl,))
common.framework(common.FRAMEWORK[impl], threads)
import numpy as np
from blip_core import to_numpy
if impl == "hf-torch":
    import torch, transformers
    model = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()
    def run(x):
        with torch.no_grad():
            return model.generate(pixel_values=torch.from_numpy(x), max_new_tokens=20, min_new_tokens=20)
else:
    import importlib
    model = importlib.import_module("backends." + impl).BlipForConditionalGeneration.from_pretrained(path)
    run = lambda x: model.generate(pixel_values=x, max_new_tokens=20, min_new_tokens=20)
size = model.config.vision_config.image_size
x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
t1 = time.perf_counter()
to_numpy(run(x))
t2 = time.perf_counter()
to_numpy(run(x))
t3 = time.perf_counter()
print(json.dumps({"import_load_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2}))
"""


def cold_start(impl: str, path: str, threads=None, timeout: float = 600.0) -> dict:
    """One fresh process for ``impl``: {"import_load_s", "first_s", "second_s"} or {"error"}."""
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, impl, path, str(threads or 0), ROOT],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def run(ctx) -> None:
    from .lowprec import caption_checkpoint
    path = caption_checkpoint(ctx)
    impls = [i for i in ctx.impls if i in IMPLS]
    ctx.log(f"\n== coldstart | new process per impl: import + load, first and second caption "
            f"(greedy, batch 1, 20 tokens) | load {os.getloadavg()[0]:.2f}")
    rows = []
    for impl in impls:
        r = dict(impl=impl, **cold_start(impl, path, ctx.threads))
        rows.append(r)
        if "error" in r:
            ctx.log(f"  {impl:<9}error: {r['error']}")
        else:
            ctx.log(f"  {impl:<9}import+load {common.fmt_s(r['import_load_s']):>9}   first caption "
                    f"{common.fmt_s(r['first_s']):>9}   second {common.fmt_s(r['second_s']):>9}")
    ctx.__dict__.setdefault("sections", {})["coldstart"] = {
        "title": "Cold start: first caption in a new process (BLIP base, greedy batch 1, 20 tokens; load excluded)",
        "load_average": list(os.getloadavg()), "rows": rows}


if __name__ == "__main__":
    from .run_all import main
    sys.exit(main(["--only", "coldstart"] + sys.argv[1:]))
