"""Shared benchmark machinery: environment, interleaved timing, peak memory, FLOPs, matmul rate, JSON.

Everything here goes through the public API only (``Cls(config, seed=0)``, ``from_pretrained``,
``model(...)``, ``model.generate(...)``, ``blip_core.to_numpy``). Frameworks are imported lazily,
after ``configure_environment`` has set thread counts, so one process can hold torch, TensorFlow and
JAX side by side; a framework or class that does not import is reported as skipped, not fatal.

Implementations ("impls"): our backends ``torch``, ``tf``, ``jax`` and the references
``hf-torch`` / ``hf-tf`` (transformers 4.57 PyTorch and TensorFlow) loaded from the same checkpoint
directory, so all of them hold the same random weights.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import sys
import time

import numpy as np

from blip_core import BACKENDS

OURS = BACKENDS
REFERENCES = ("hf-torch", "hf-tf")
IMPLS = OURS + REFERENCES
FRAMEWORK = {"torch": "torch", "hf-torch": "torch", "tf": "tensorflow", "hf-tf": "tensorflow", "jax": "jax"}
# Impls whose first call at a new shape does one-time work, never a timing sample: tracing or compiling
# (tf, jax), or (our torch) preparing the decoding layouts, a copy of the decoder's weights whose fresh
# pages the first call makes. The cold first call is reported on its own (``coldstart``, ``first_call_s``).
COMPILES = {"torch": True, "hf-torch": False, "tf": True, "hf-tf": True, "jax": True}
EAGER_SAMPLE_S = 3.0   # an eager first call this long is dominated by compute and counts as a sample


class Unavailable(Exception):
    """An impl cannot run a workload (not importable, class missing, dtype unsupported): a skip with a reason."""


def configure_environment(threads=None, impls=IMPLS) -> None:
    """Set process-wide knobs before any framework is imported (thread pools are sized at import)."""
    # transformers' TF classes need Keras 2 (tf-keras); our TF backend uses no Keras, so both coexist.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    # transformers imports every framework it finds; keep the ones no requested reference needs out.
    os.environ.setdefault("USE_FLAX", "0")
    if "hf-tf" not in impls:
        os.environ.setdefault("USE_TF", "0")
    for key, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    if threads:
        n = str(int(threads))
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            os.environ[key] = n
        if int(threads) == 1:   # XLA's CPU client only has a switch for "one thread"
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        if hasattr(os, "sched_setaffinity") and int(threads) < len(os.sched_getaffinity(0)):
            # Pinning the process bounds every framework's pool alike, including JAX's.
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(threads)])


_FRAMEWORKS: dict = {}


def framework(name: str, threads=None):
    """Import ``torch`` / ``tensorflow`` / ``jax`` once, applying the thread count; raise Unavailable."""
    if name not in _FRAMEWORKS:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:   # noqa: BLE001 - any import failure is a skip reason
            _FRAMEWORKS[name] = Unavailable(f"cannot import {name}: {type(exc).__name__}: {exc}")
        else:
            if name == "torch" and threads:
                mod.set_num_threads(int(threads))
            if name == "tensorflow" and threads:
                mod.config.threading.set_intra_op_parallelism_threads(int(threads))
                mod.config.threading.set_inter_op_parallelism_threads(int(threads))
            _FRAMEWORKS[name] = mod
    mod = _FRAMEWORKS[name]
    if isinstance(mod, Unavailable):
        raise mod
    return mod


def framework_info(name: str) -> dict:
    """Version, device and thread count as the framework itself reports them."""
    try:
        mod = framework(name)
    except Unavailable as exc:
        return {"available": False, "reason": str(exc)}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if name == "torch":
        return {"available": True, "version": mod.__version__, "device": "cpu", "threads": mod.get_num_threads()}
    if name == "tensorflow":
        dev = [d.name for d in mod.config.list_logical_devices()]
        intra = mod.config.threading.get_intra_op_parallelism_threads()
        return {"available": True, "version": mod.__version__, "device": ",".join(dev) or "cpu",
                "threads": intra or cpus, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}
    dev = mod.devices()[0]
    one = "intra_op_parallelism_threads=1" in os.environ.get("XLA_FLAGS", "")
    return {"available": True, "version": mod.__version__, "device": f"{dev.platform}:{dev.device_kind}",
            "threads": 1 if one else cpus}


def random_model(cls, config):
    """``cls(config, seed=0)`` (seeded random weights) as ``from_pretrained`` leaves a model: a torch module is put in
    eval mode. One built from a config starts in training mode, where decoding makes no weight layouts
    (``backends/torch/layout.py``): not the model users run. tf and jax models have no modes."""
    model = cls(config, seed=0)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        model.eval()
    return model


def _package_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:   # noqa: BLE001
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tag() -> str:
    """A short file-name-safe machine name: CPU model and usable core count (e.g. ``amd-epyc-2cpu``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    words = "".join(c if c.isalnum() else " " for c in _cpu_model().lower()).split()[:3]
    return "-".join(words + [f"{cpus}cpu"])


def environment(frameworks, dtype: str, threads) -> dict:
    """The machine and software every figure was measured with."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "hostname": platform.node(), "machine": machine_tag(), "platform": platform.platform(),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": cpus,
        "memory_gb": round(mem_gb, 1) if mem_gb else None, "load_average": list(os.getloadavg()),
        "python": platform.python_version(), "dtype": dtype, "threads_requested": threads,
        "frameworks": {fw: framework_info(fw) for fw in frameworks},
        "packages": {p: _package_version(p) for p in ("numpy", "transformers", "tf-keras", "flax", "jaxlib",
                                                        "blip-multiframework")},
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS", "TF_USE_LEGACY_KERAS",
                                               "XLA_FLAGS") if os.environ.get(k) is not None},
    }


# -- peak memory ---------------------------------------------------------------------------------
def _status_kb(field: str):
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so VmHWM measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory added during a block, in MiB (None where the OS cannot tell).

    RSS covers every framework alike (JAX and TF buffers live in host memory on CPU); memory an
    allocator kept from an earlier call is reused without showing up, so this is a lower bound.
    """

    def __enter__(self):
        self.ok = _reset_peak()
        self.base = _status_kb("VmRSS:") if self.ok else None
        self.delta_mb = None
        return self

    def __exit__(self, *exc):
        if self.ok and self.base is not None:
            peak = _status_kb("VmHWM:")
            if peak is not None:
                self.delta_mb = round(max(0, peak - self.base) / 1024, 1)
        return False


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line for a report: the exception type, its first line and (TF style tracebacks) its last one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- interleaved timing --------------------------------------------------------------------------
def measure(calls: dict, budget_s: float, max_reps: int, min_reps: int = 1, log=None) -> dict:
    """Time zero-argument callables in interleaved rounds; the output goes through ``to_numpy`` (a sync).

    Round 0 is the first call of each impl (warm-up; it counts as a sample only for an eager impl
    whose call is long enough that setup is noise). Later rounds rotate the order and run every
    impl that still has fewer than ``min_reps`` samples, or fewer than ``max_reps`` while its own
    timed seconds stay under its share of ``budget_s`` (an equal share per impl: a slow reference
    does not use up the samples of a fast impl, whose median would then rest on one or two calls).
    An exception stops that impl and is recorded.
    """
    from blip_core import to_numpy
    # As timeit does: no collector pauses inside a timed call; long-lived objects (models, frameworks)
    # are frozen out of collection so the collections between calls stay cheap.
    gc.collect()
    gc.freeze()
    stats = {k: {"times": [], "peaks": [], "first_s": None, "first_peak": None, "error": None, "out": None}
             for k in calls}
    order, rnd = list(calls), 0
    spent, share = dict.fromkeys(calls, 0.0), budget_s / max(1, len(calls))
    while rnd <= max_reps + 1:
        active = [k for k in order if stats[k]["error"] is None and (
            rnd == 0 or len(stats[k]["times"]) < min_reps or (spent[k] < share and len(stats[k]["times"]) < max_reps))]
        if not active:
            break
        for k in active:
            st = stats[k]
            st["out"] = None
            gc.collect()
            gc.disable()
            try:
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    out = to_numpy(calls[k]())
                    dt = time.perf_counter() - t0
            except Exception as exc:   # noqa: BLE001 - a failing impl must not stop the others
                st["error"] = error_text(exc)
                if log:
                    log(f"    {k}: error: {st['error']}")
                continue
            finally:
                gc.enable()
            st["out"] = out
            if rnd == 0:
                st["first_s"], st["first_peak"] = dt, mem.delta_mb
                if COMPILES.get(k, True) or dt < EAGER_SAMPLE_S:
                    continue
            st["times"].append(dt)
            st["peaks"].append(mem.delta_mb)
            spent[k] += dt
        order = order[1:] + order[:1]
        rnd += 1
    gc.unfreeze()
    return stats


# -- matmul rate ---------------------------------------------------------------------------------
def matmul_rate(name: str, n: int = 2048, dtype: str = "float32", reps: int = 5) -> dict:
    """FLOP/s of an ``n x n`` matmul in framework ``name`` (best and median of ``reps`` after a warm-up); in torch
    the faster of its two float32 GEMMs (``@``, and oneDNN's, which our inference linears call), so no floor is beaten."""
    fw = framework(name)
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    if name == "torch":
        x = fw.from_numpy(a).to(getattr(fw, dtype))
        runs = {"matmul": lambda: float((x @ x)[0, 0])}                       # MKL in float32
        if fw.backends.mkldnn.is_available() and hasattr(fw.ops.mkldnn, "_linear_pointwise"):
            # oneDNN's inner product, as the backend's inference linears run (twice MKL's rate on some x86 CPUs)
            runs["onednn"] = lambda: float(fw.ops.mkldnn._linear_pointwise(x, x, None, "none", [], "")[0, 0])
        return max((_timed_rate(run, n, reps) for run in runs.values()), key=lambda r: r["best_flops_per_s"]) | {
            "n": n, "dtype": dtype}
    elif name == "tensorflow":
        x = fw.cast(fw.constant(a), dtype)
        run = lambda: float(fw.linalg.matmul(x, x)[0, 0])                     # noqa: E731
    else:
        import jax.numpy as jnp
        x = jnp.asarray(a, dtype=dtype)
        mm = fw.jit(lambda u: u @ u)
        run = lambda: mm(x).block_until_ready()                                # noqa: E731
    return _timed_rate(run, n, reps) | {"n": n, "dtype": dtype}


def _timed_rate(run, n: int, reps: int) -> dict:
    """Best and median FLOP/s of ``run`` (an ``n x n`` matmul) over ``reps`` calls after a warm-up."""
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"best_flops_per_s": flops / min(times), "median_flops_per_s": flops / float(np.median(times))}


def memory_bandwidth(mb: int = 256, reps: int = 5) -> dict:
    """Bytes/s streamed from memory, the ceiling for reading weights in decoding: the better of a read
    (a max reduction over a large array, read once) and a copy (read + write, both bytes counted)."""
    n = mb * 2**20 // 4
    a, b = np.ones(n, np.float32), np.empty(n, np.float32)

    def timed(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times), float(np.median(times))

    read, copy = timed(a.max), timed(lambda: np.copyto(b, a))
    rates = {"read": (a.nbytes / read[0], a.nbytes / read[1]), "copy": (2 * a.nbytes / copy[0], 2 * a.nbytes / copy[1])}
    return {"mb": mb, "best_bytes_per_s": max(r[0] for r in rates.values()),
            "median_bytes_per_s": max(r[1] for r in rates.values()),
            **{f"{k}_best_bytes_per_s": r[0] for k, r in rates.items()}}


def compute_bandwidth_floor_s(terms: dict, rate: float, bandwidth: float) -> dict:
    """The least time of a decoding call: ``terms["once_flops"]`` (the input side, done once) at the matmul
    ``rate``, plus the decoding steps, each bound by the larger of its FLOPs at ``rate`` and the bytes it
    must read (every weight it multiplies) at the memory ``bandwidth``: ``terms["step_flops"]`` and
    ``terms["step_bytes"]``, summed over the steps. At batch 1 the bytes bound the steps. Parts in the dict."""
    steps = max(terms["step_flops"] / rate, terms["step_bytes"] / bandwidth)
    once = terms["once_flops"] / rate
    return {"once_s": once, "steps_s": steps, "steps_bound": "bytes" if terms["step_bytes"] / bandwidth >= terms[
        "step_flops"] / rate else "flops", "total_s": once + steps}


# -- weight bytes: batch-1 decoding reads every weight once per token, a floor of its own --------
def vit_params(vc) -> float:
    d, i = vc.hidden_size, vc.intermediate_size
    return float(3 * vc.patch_size ** 2 * d + vc.num_hidden_layers * (4 * d * d + 2 * d * i))


def decode_weight_bytes(once: float, per_step: float, new_tokens: int, itemsize: int) -> float:
    """Weights read once (image side, cached cross keys/values) plus those every decode step reads."""
    return float(itemsize * (once + new_tokens * per_step))


# -- FLOP counting (multiply-add = 2 FLOPs; matmuls and convolutions only) -----------------------
def vit_flops(vc, batch: int) -> float:
    """Vision tower forward: conv patch embedding plus pre-LN layers (qkv, scores, mix, projection, MLP)."""
    grid = (vc.image_size // vc.patch_size) ** 2
    n, d, i = grid + 1, vc.hidden_size, vc.intermediate_size
    patch = 2 * grid * d * 3 * vc.patch_size ** 2
    layer = 2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d
    return float(batch * (patch + vc.num_hidden_layers * layer))


def bert_layer_flops(t, s, d, i, m=0, e=0, cross_kv=True) -> float:
    """One BERT-style layer on ``t`` new tokens seeing ``s`` self positions, optionally cross-attending
    ``m`` states of width ``e`` (``cross_kv=False``: their keys/values are cached, not recomputed)."""
    f = 2 * t * d * 3 * d + 4 * t * s * d + 2 * t * d * d + 4 * t * d * i
    if m:
        f += 4 * t * d * d + 4 * t * m * d + (4 * m * e * d if cross_kv else 0)
    return float(f)


def decode_flops(layer_fn, layers: int, rows: int, first_rows: int, prompt: int, new_tokens: int) -> float:
    """Incremental decoding: the prompt once per input row, then one token per step for every row.

    The last new token needs no forward pass, so there are ``new_tokens`` forwards in all."""
    total = first_rows * layers * layer_fn(prompt, prompt)
    for j in range(1, new_tokens):
        total += rows * layers * layer_fn(1, prompt + j)
    return float(total)


def qformer_flops(qc, queries: int, vision_tokens: int, vision_width: int, batch: int) -> float:
    """BLIP-2 Q-Former over the learned queries (no text), cross-attention every ``frequency`` layers."""
    total = 0.0
    for layer in range(qc.num_hidden_layers):
        cross = layer % qc.cross_attention_frequency == 0
        total += bert_layer_flops(queries, queries, qc.hidden_size, qc.intermediate_size,
                                  vision_tokens if cross else 0, vision_width)
    return batch * total


def opt_layer_flops(tc):
    h, f = tc.hidden_size, tc.ffn_dim
    return lambda t, s: float(2 * t * h * 3 * h + 4 * t * s * h + 2 * t * h * h + 4 * t * h * f)


# -- tables and JSON ------------------------------------------------------------------------------
def fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def add_results_arguments(p) -> None:
    """``--out`` and ``--markdown`` of a standalone benchmark script (``load.py``, ``gpu.py``)."""
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the README table of a results file and stop")


def print_saved_table(args, markdown) -> bool:
    """With ``--markdown``: print ``markdown`` of that results file and say so (the script then stops)."""
    if not args.markdown:
        return False
    with open(args.markdown) as f:
        print(markdown(json.load(f)))
    return True


def write_json(path: str, data: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=default)
        fh.write("\n")
    os.replace(tmp, path)
    return path
