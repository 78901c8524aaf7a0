"""Load time and peak memory of ``from_pretrained`` on full-size synthetic checkpoints (issue 22).

    python benchmarks/load.py                                  # BLIP-2 OPT-2.7b and BLIP-large, all impls
    python benchmarks/load.py --models blip2-opt-2.7b --dtypes bfloat16 --impls torch,hf-torch
    python benchmarks/load.py --models blip2-small --check-logits   # a few hundred MB, quick
    python benchmarks/load.py --models blip2-mid --impls tf,jax     # 1 GB with the full-size tensor shapes
    python benchmarks/run_all.py --load [--load-models ...]          # the same, after the other workloads

Each model's checkpoint is written once with random values (cheaply: a pool of random numbers
tiled into every tensor, streamed to disk shard by shard, never the whole model in memory), then
every (impl, dtype) loads it in a fresh process: our ``torch``, ``tf`` and ``jax`` backends and
transformers 4.57's PyTorch class (``hf-torch``). A child reports the seconds of the
``from_pretrained`` call alone, its resident memory after importing the framework (baseline) and
its peak (``ru_maxrss``, from the start to the end of the load), and the bytes of the loaded
parameters; then the seconds to read every weight once ("touch": one value per 4 KB, as a first
forward must; transformers' and our torch loads of a file in the target dtype are lazy memory
maps whose pages are read only then, the TF and JAX loads have read everything already). The
files are read once before each measurement so every loader starts from the same warm page
cache, as far as memory allows. ``--check-logits`` also runs one float32 forward and compares the
logits with transformers'. The checkpoints are deleted at the end unless ``--keep``.

Targets (issue 22): for each backend and dtype, load time <= transformers' in the same run, and
peak <= 1.10 x the loaded model's bytes, counted above the baseline ("extra") and as a whole.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

IMPLS = ("torch", "tf", "jax", "hf-torch")
DTYPES = ("bfloat16", "float32")
# name -> (preset, overrides, stored dtype, shards)
MODELS = {
    "blip2-opt-2.7b": ("blip2-opt-2.7b", {"image_token_index": 50265}, "bfloat16", 4),
    "blip-large": ("blip-large-captioning", {}, "float32", 1),
    # a few hundred MB with the shapes' kinds of the big one (tests and quick runs)
    "blip2-small": ("blip2-opt-2.7b", {"image_token_index": 50265, "vision_config.num_hidden_layers": 1, "qformer_config.num_hidden_layers": 1,
                                      "text_config.num_hidden_layers": 2, "text_config.hidden_size": 512,
                                      "text_config.ffn_dim": 2048, "text_config.num_attention_heads": 8},
                    "bfloat16", 2),
    # ~1 GB bfloat16 with the full-size tensor shapes of the language model (profiling the per-tensor costs)
    "blip2-mid": ("blip2-opt-2.7b", {"image_token_index": 50265, "vision_config.num_hidden_layers": 2,
                                    "qformer_config.num_hidden_layers": 2, "text_config.num_hidden_layers": 4},
                  "bfloat16", 2),
}
TARGET_RATIO = 1.10
# Each (impl, dtype) is loaded this many times, the impls in a rotated order each time (page-cache and order
# effects fall on every impl alike); the table gives the median time (and the largest peak memory).
REPEATS = 3
# --check-logits runs a float32 forward only for models up to this size: a 2.7B float32 forward beside
# other work does not fit a 24 GiB machine (checked at 2.7B size by the author: 3.3e-6).
LOGITS_MAX_BYTES = 4 * 10**9


# -- the synthetic checkpoint --------------------------------------------------------------------------------
def build_checkpoint(directory: str, model: str, seed: int = 0) -> dict:
    """Write ``model``'s config.json and random safetensors shards (+ index) to ``directory``."""
    from blip_core.checkpoint import SAFE_WEIGHTS_INDEX_NAME
    from blip_core.checkpoint.dtypes import NAME_TO_SAFETENSORS, numpy_dtype
    from blip_core.checkpoint.files import shard_file_names
    from blip_core.presets import preset_config
    from blip_core.weights import weight_table

    preset, overrides, stored, num_shards = MODELS[model]
    arch, cfg = preset_config(preset, overrides)
    table = weight_table(arch, cfg)
    dtype = numpy_dtype(stored)
    rows = [(s.name, tuple(s.shape), s.kind) for s in table.values() if s.tied_to is None]
    total = sum(int(np.prod(shape)) * dtype.itemsize for _, shape, _ in rows)
    # shards of about total / num_shards bytes, filled in table order
    limit, shards, size = -(-total // num_shards), [[]], 0
    for row in rows:
        nbytes = int(np.prod(row[1])) * dtype.itemsize
        if shards[-1] and size + nbytes > limit and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += nbytes
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(dtype)
    os.makedirs(directory, exist_ok=True)
    names = shard_file_names(len(shards))
    weight_map = {}
    for file_name, part in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in part:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": NAME_TO_SAFETENSORS[stored], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-(8 + len(head)) % 8)
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name, shape, kind in part:
                n = int(np.prod(shape))
                if kind == "norm_weight":      # LayerNorm scales near 1, as trained models have them
                    f.write((np.ones(n, np.float32) + pool[:n].astype(np.float32)).astype(dtype).tobytes())
                    continue
                start = int(rng.integers(0, pool.size))
                while n:                      # tile the pool from a random start, a chunk at a time
                    k = min(n, pool.size - start)
                    f.write(pool[start:start + k].tobytes())
                    n, start = n - k, 0
    if len(names) > 1:
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    cfg.save_pretrained(directory)
    params = sum(int(np.prod(shape)) for _, shape, _ in rows)
    return {"architecture": arch, "parameters": params, "bytes": total, "stored_dtype": stored,
            "shards": len(names), "largest_tensor_bytes": max(int(np.prod(s)) for _, s, _ in rows) * dtype.itemsize}


def warm(directory: str) -> None:
    """Read every weights file once, so each loader starts from the same page cache."""
    buf = bytearray(64 << 20)
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".bin")):
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# -- one measurement in a fresh process ---------------------------------------------------------------------
_CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("USE_TF", "0"); os.environ.setdefault("USE_FLAX", "0"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, sys.argv[1])
impl, directory, arch, dtype, logits_out, warm_dir, device = sys.argv[2:9]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # jax's device memory: what it uses, not 75%
import numpy as np
BIN = {"allow_pickle_bin": True} if any(n.endswith(".bin") for n in os.listdir(directory)) else {}   # opted in for .bin dirs
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
if impl == "hf-torch":
    import torch, transformers
    cls = getattr(transformers, arch)
    load = lambda: cls.from_pretrained(directory, torch_dtype=getattr(torch, dtype), **({"device_map": device} if device not in ("", "cpu") else {}))
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
elif impl == "torch":
    import torch, backends.torch as B
    load = lambda: getattr(B, arch).from_pretrained(directory, dtype=dtype, device=device or None, **BIN)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
elif impl == "tf":
    import tensorflow as tf, backends.tf as B
    tf.constant(1.0) + 1
    load = lambda: getattr(B, arch).from_pretrained(directory, dtype=dtype, device=device or None, **BIN)
    nbytes = lambda m: sum(v.shape.num_elements() * v.dtype.size for v in m.params.values())
    touch = lambda m: [tf.reduce_max(tf.reshape(v, [-1])[::STRIDE]).numpy() for v in m.params.values()]
else:
    import jax, backends.jax as B
    jax.numpy.ones(2).block_until_ready()
    load = lambda: getattr(B, arch).from_pretrained(directory, dtype=dtype, device=device or None, **BIN)
    nbytes = lambda m: sum(a.nbytes for a in jax.tree_util.tree_leaves(m.params))
    touch = lambda m: [np.asarray(a).reshape(-1)[::STRIDE].max() for a in jax.tree_util.tree_leaves(m.params)]
if impl in ("torch", "hf-torch"):    # numpy views of the parameters (bfloat16 seen as int16): no copy
    touch = lambda m: [p.detach().view(-1).view(torch.int16 if p.dtype == torch.bfloat16 else p.dtype).numpy()[::STRIDE].max()
                       for p in m.parameters()]
STRIDE = 1024      # elements: at most 4 KB apart, so every page of every weight is read
device_stats = lambda: {}
if device.startswith("cuda") and impl in ("torch", "hf-torch"):
    torch.zeros(1, device=device)          # the device's context: in the baseline, not in the load
    touch = lambda m: torch.cuda.synchronize()
    device_stats = lambda: {"device_peak_bytes": torch.cuda.max_memory_allocated(), "device_bytes": torch.cuda.memory_allocated(),
                            "param_devices": sorted({str(p.device) for p in model.parameters()})}
elif device and impl == "jax":
    touch = lambda m: jax.block_until_ready(m.params)
    def device_stats():
        st = next(iter(jax.tree_util.tree_leaves(model.params)[0].devices())).memory_stats() or {}
        return {"device_peak_bytes": st.get("peak_bytes_in_use"), "device_bytes": st.get("bytes_in_use"),
                "param_devices": sorted({str(d) for a in jax.tree_util.tree_leaves(model.params) for d in a.devices()})}
base = rss()
if warm_dir:   # one load of another (tiny) checkpoint first: one-time costs of a first load go in the baseline
    load_dir, directory = directory, warm_dir
    del_me = load()
    del del_me
    directory = load_dir
warm_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
u0 = resource.getrusage(resource.RUSAGE_SELF)
t, c = time.perf_counter(), time.process_time()
model = load()
seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
usage = resource.getrusage(resource.RUSAGE_SELF)
peak, after = usage.ru_maxrss * 1024, rss()
t = time.perf_counter()
touch(model)          # what a first forward pays for weights a lazy loader has not read yet
touch_seconds = time.perf_counter() - t
out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "touch_seconds": touch_seconds, "baseline_bytes": base, "warm_baseline_bytes": warm_base, "peak_bytes": peak, "after_bytes": after, "major_faults": usage.ru_majflt - u0.ru_majflt, "minor_faults": usage.ru_minflt - u0.ru_minflt, "system_seconds": usage.ru_stime - u0.ru_stime, "model_bytes": nbytes(model), "device": device or None, **device_stats()}
print("RESULT " + json.dumps(out), flush=True)   # before the forward: a crash there keeps the load figures
if logits_out:
    from blip_core import to_numpy
    from converters.inputs import make_inputs
    from blip_core.configs import load_config
    inputs = make_inputs(arch, load_config(directory), seed=0)
    if impl == "hf-torch":
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v).to(model.device) for k, v in inputs.items()}).logits.float().cpu().numpy()
    else:
        if impl == "torch":
            model = model.eval()
        logits = np.asarray(to_numpy(model(**inputs).logits), np.float32)
    np.save(logits_out, logits[:, -4:])
    print("LOGITS ok", flush=True)
"""


def measure(impl: str, directory: str, arch: str, dtype: str, logits_out: str = "", warm_dir: str = "",
            timeout: float = 1800, device: str = "") -> dict:
    """One load in a fresh process. ``warm_dir``: a checkpoint of the same class loaded first, so
    that ``warm_baseline_bytes`` holds the one-time costs of a first load (lazy imports, kernels).
    ``device`` ("cuda", "gpu"): load onto it (transformers: ``device_map``) and report its peak memory."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, ROOT, impl, directory, arch, dtype, logits_out, warm_dir,
                           device or ""],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
    if line is None:
        return {"status": "error", "error": f"exit code {proc.returncode}{killed}: " + (proc.stderr or proc.stdout)[-2000:]}
    out = dict(json.loads(line[len("RESULT "):]), status="ok")
    if proc.returncode != 0:     # the load finished, the logits forward did not
        out["logits_error"] = f"exit code {proc.returncode}{killed}: {proc.stderr[-500:]}"
    return out


def _avail_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
    return info.get("MemAvailable", 0)


def wait_for_memory(need: int, log=print, tries: int = 10, pause: float = 60.0) -> bool:
    """Wait (a few minutes at most) until ``need`` bytes are available; False if they never were."""
    for i in range(tries):
        if _avail_bytes() >= need:
            return True
        log(f"   waiting for memory: {_avail_bytes() / 1e9:.1f} GB available, {need / 1e9:.1f} GB needed")
        time.sleep(pause)
    return False


# -- the run ------------------------------------------------------------------------------------------------
def run(models, impls, dtypes, workdir=None, keep=False, check_logits=False, log=print, repeats: int = REPEATS,
        device: str = "") -> dict:
    import importlib.metadata as md
    versions = {p: _version(md, p) for p in ("torch", "tensorflow", "jax", "transformers", "numpy")}
    env = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "python": platform.python_version(), "packages": versions, "load_average_start": list(os.getloadavg()),
           "device": device or None}
    log(f"load benchmark on {env['machine']} ({env['cpus']} CPUs, load {env['load_average_start'][0]:.2f}); "
        + ", ".join(f"{k} {v}" for k, v in versions.items()))
    work = workdir or tempfile.mkdtemp(prefix="blip-load-")
    os.makedirs(work, exist_ok=True)
    results = {"environment": env, "models": {}, "rows": []}
    try:
        for model in models:
            directory = os.path.join(work, model)
            t = time.perf_counter()
            info = build_checkpoint(directory, model)
            os.sync()     # written back now, not while the first loader runs (writeback stalls its allocations)
            info["build_s"] = round(time.perf_counter() - t, 1)
            results["models"][model] = info
            log(f"\n== {model}: {info['architecture']}, {info['parameters'] / 1e9:.3f} B parameters, "
                f"{info['stored_dtype']}, {info['shards']} shard(s), {info['bytes'] / 1e9:.2f} GB "
                f"(written in {info['build_s']} s)")
            log(f"   {'impl':<9}{'dtype':<10}{'load s':>8}{'cpu s':>8}{'+touch s':>9}{'model GB':>10}{'base GB':>9}{'peak GB':>9}"
                f"{'extra/model':>12}{'peak/model':>11}  logits max|diff| vs hf-torch")
            for dtype in dtypes:
                logits = {}
                need = info["parameters"] * (4 if dtype == "float32" else 2) + 3 * 10**9   # the model + 3 GB
                runs = {impl: [] for impl in impls}
                for rep in range(repeats):
                    # each repeat starts with the next impl: no impl always runs first (or after another)
                    for impl in impls[rep % len(impls):] + impls[:rep % len(impls)]:
                        if not wait_for_memory(need, log):
                            one = {"status": "skipped", "error": "not enough free memory"}
                        else:
                            warm(directory)
                            out = os.path.join(work, f"logits-{model}-{impl}.npy") if (
                                rep == 0 and check_logits and dtype == "float32"
                                and info["parameters"] * 4 <= LOGITS_MAX_BYTES) else ""
                            one = measure(impl, directory, info["architecture"], dtype, out, device=device)
                            if out and one["status"] == "ok" and os.path.exists(out):
                                logits[impl] = np.load(out)
                        one.update(load_average=list(os.getloadavg()), repeat=rep)
                        runs[impl].append(one)
                        if repeats > 1:
                            _print_row(dict(one, impl=impl, dtype=dtype), log, prefix=f"#{rep + 1} ")
                for impl in impls:
                    row = dict(median_row(runs[impl]), model=model, impl=impl, dtype=dtype)
                    if row["status"] == "ok":     # the worst repeat's memory
                        m = row["model_bytes"]
                        row["extra_over_model"] = max(r["peak_bytes"] - r["baseline_bytes"] for r in runs[impl]
                                                      if r["status"] == "ok") / m
                        row["peak_over_model"] = row["peak_bytes"] / m
                    results["rows"].append(row)
                    _print_row(row, log, prefix="med " if repeats > 1 else "")
                if "hf-torch" in logits:
                    for r in results["rows"]:
                        if r["model"] == model and r["dtype"] == dtype and r["impl"] in logits:
                            r["logits_max_abs_diff"] = float(np.max(np.abs(logits[r["impl"]] - logits["hf-torch"])))
                    log("   logits vs hf-torch: " + ", ".join(
                        f"{r['impl']} {r['logits_max_abs_diff']:.2e}" for r in results["rows"]
                        if r["model"] == model and r["dtype"] == dtype and "logits_max_abs_diff" in r))
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets(results["rows"])
    env["load_average_end"] = list(os.getloadavg())
    log("\n== issue 22 targets: load time <= transformers' (same run); peak <= 1.10 x model bytes")
    for t in results["targets"]:
        log(f"   {'met' if t['met'] else 'MISSED':<7}{t['model']:<16}{t['impl']:<6}{t['dtype']:<10}"
            f"time {t['time_ratio']:.2f} x hf-torch (with the first touch of every weight "
            f"{t['touched_time_ratio']:.2f} x), extra {t['extra_over_model']:.3f}, "
            f"peak {t['peak_over_model']:.3f} x model"
            + (f"; device peak {t['device_peak_over_model']:.3f} x model" if t.get("device_peak_over_model") else ""))
    return results


TIME_KEYS = ("seconds", "cpu_seconds", "touch_seconds")


def median_row(runs: list) -> dict:
    """One row from the repeats of an (impl, dtype): median times, largest memory figures, each repeat's seconds
    under ``runs_seconds``; an error if no repeat succeeded."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return dict(runs[0])
    row = dict(ok[0])
    for key in TIME_KEYS:
        if all(key in r for r in ok):
            row[key] = float(np.median([r[key] for r in ok]))
    for key in ("peak_bytes", "after_bytes", "baseline_bytes", "warm_baseline_bytes", "major_faults", "device_peak_bytes"):
        if all(r.get(key) is not None for r in ok):
            row[key] = max(r[key] for r in ok)
    row["load_average"] = [float(np.median([r["load_average"][i] for r in runs])) for i in range(3)]
    row.update(repeats=len(ok), runs_seconds=[r["seconds"] for r in ok], repeat=None)
    return row


def targets(rows) -> list:
    out = []
    for r in rows:
        if r["impl"] == "hf-torch" or r["status"] != "ok":
            continue
        ref = next((x for x in rows if x["impl"] == "hf-torch" and x["model"] == r["model"]
                    and x["dtype"] == r["dtype"] and x["status"] == "ok"), None)
        if ref is None:
            continue
        ratio = r["seconds"] / ref["seconds"]
        touched = (r["seconds"] + r.get("touch_seconds", np.nan)) / (ref["seconds"] + ref.get("touch_seconds", np.nan))
        row = {"model": r["model"], "impl": r["impl"], "dtype": r["dtype"], "time_ratio": ratio,
               "touched_time_ratio": touched,
               "extra_over_model": r["extra_over_model"], "peak_over_model": r["peak_over_model"],
               "met": ratio <= 1.0 and r["extra_over_model"] <= TARGET_RATIO}
        if r.get("device"):
            # onto a device: its peak is the model's memory target; the host's extra is what a host copy would show
            dev = r.get("device_peak_bytes")
            row["device_peak_over_model"] = dev / r["model_bytes"] if dev else None
            row["met"] = ratio <= 1.0 and dev is not None and dev / r["model_bytes"] <= TARGET_RATIO
        out.append(row)
    return out


def markdown(results: dict) -> str:
    """The README table of a results dict (``--out`` JSON)."""
    env = results["environment"]
    dev = env.get("device")
    lines = [f"Machine: {env['machine']}, {env['cpus']} CPUs; load average {env['load_average_start'][0]:.1f} at the "
             f"start, {env.get('load_average_end', [float('nan')])[0]:.1f} at the end; "
             + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
             + (f"; loaded onto device {dev!r} (peak / extra: the host's memory)" if dev else ""), "",
             "| checkpoint | impl | dtype | load s | x transformers | load + touch s | model GB | peak GB | peak / model "
             "| extra / model | logits max abs diff |" + (" device peak / model |" if dev else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if dev else "")]
    for r in results["rows"]:
        name = f"{r['model']} ({results['models'][r['model']]['bytes'] / 1e9:.1f} GB {results['models'][r['model']]['stored_dtype']})"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['impl']} | {r['dtype']} | {r['status']}: {r.get('error', '')[:60]} ||||||||")
            continue
        ref = next((x for x in results["rows"] if x["impl"] == "hf-torch" and x["model"] == r["model"]
                    and x["dtype"] == r["dtype"] and x["status"] == "ok"), None)
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        diff = f"{r['logits_max_abs_diff']:.1e}" if "logits_max_abs_diff" in r else "-"
        touched = f"{r['seconds'] + r['touch_seconds']:.2f}" if "touch_seconds" in r else "-"
        lines.append(f"| {name} | {r['impl']} | {r['dtype']} | {r['seconds']:.2f} | {ratio} | {touched} | {r['model_bytes'] / 1e9:.2f} "
                     f"| {r['peak_bytes'] / 1e9:.2f} | {r['peak_over_model']:.3f} | {r['extra_over_model']:.3f} | {diff} |"
                     + (f" {r['device_peak_bytes'] / r['model_bytes']:.3f} |" if dev and r.get("device_peak_bytes") else
                        (" - |" if dev else "")))
    return "\n".join(lines)


def _print_row(row, log, prefix: str = "") -> None:
    if row["status"] != "ok":
        log(f"   {prefix}{row['impl']:<9}{row['dtype']:<10}{row['status']}: {row.get('error', '')[-600:]}")
        return
    gb = 1e9
    if "extra_over_model" not in row:      # one repeat's figures
        row = dict(row, extra_over_model=(row["peak_bytes"] - row["baseline_bytes"]) / row["model_bytes"],
                   peak_over_model=row["peak_bytes"] / row["model_bytes"])
    log(f"   {prefix}{row['impl']:<9}{row['dtype']:<10}{row['seconds']:>8.2f}{row.get('cpu_seconds', float('nan')):>8.2f}"
        f"{row['seconds'] + row.get('touch_seconds', float('nan')):>9.2f}{row['model_bytes'] / gb:>10.2f}"
        f"{row['baseline_bytes'] / gb:>9.2f}{row['peak_bytes'] / gb:>9.2f}{row['extra_over_model']:>12.3f}"
        f"{row['peak_over_model']:>11.3f}   (load avg {row['load_average'][0]:.1f}, "
        f"{row.get('major_faults', -1)} major page faults)"
        + (f"; on {row.get('param_devices')}: device peak {row['device_peak_bytes'] / gb:.2f} GB = "
           f"{row['device_peak_bytes'] / row['model_bytes']:.3f} x model" if row.get("device_peak_bytes") else ""))


def _version(md, name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}models", type=_csv(tuple(MODELS)), default=["blip2-opt-2.7b", "blip-large"],
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument(f"--{prefix}impls", type=_csv(IMPLS), default=list(IMPLS))
    p.add_argument(f"--{prefix}dtypes", type=_csv(DTYPES), default=list(DTYPES))
    p.add_argument(f"--{prefix}workdir", default=None, help="where the checkpoints go (default: a temp folder)")
    p.add_argument(f"--{prefix}keep", action="store_true", help="keep the checkpoints")
    p.add_argument(f"--{prefix}repeats", type=int, default=REPEATS,
                   help="loads per (impl, dtype), the impls in a rotated order each time; medians reported")
    p.add_argument(f"--{prefix}check-logits", action="store_true",
                   help="float32: one forward per impl, logits compared with transformers'")
    p.add_argument(f"--{prefix}device", default="",
                   help="load onto this device (cuda, cuda:1; transformers: device_map) and report its peak memory")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    common.add_results_arguments(p)
    args = p.parse_args(argv)
    if common.print_saved_table(args, markdown):
        return 0
    results = run(args.models, args.impls, args.dtypes, args.workdir, args.keep, args.check_logits, repeats=args.repeats,
                  device=args.device)
    print("\n" + markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(t["met"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
