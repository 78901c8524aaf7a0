"""Run every benchmark, print the tables and write the results as JSON.

    python benchmarks/run_all.py                       # BLIP base / BLIP-2 sizes, every backend and reference
    python benchmarks/run_all.py --quick               # tiny configs: a smoke run in well under a minute
    python benchmarks/run_all.py --only vision,caption --backends torch,jax,hf-torch --threads 2
    blip bench [same options]

Impls: our ``torch``, ``tf``, ``jax`` backends and transformers 4.57 ``hf-torch`` / ``hf-tf``, all
loaded from one checkpoint of random weights and timed interleaved in one process, so the ratio
ours/reference compares runs under the same machine load. A full run gives each workload a fresh
process of its own (``--isolate``, the default where more than one workload runs outside ``--quick``):
what one workload leaves in a process (allocator state, frameworks' thread pools, compiled programs)
then cannot change the next one's figures. ``--no-isolate`` runs them all in this process. Results go to
``benchmarks/results/<date>-<machine>.json`` (``<date>-<machine>-<workloads>.json`` for a run of some workloads
only; ``-<HHMMSS>`` added where that file exists) unless ``--out`` says otherwise; the compute floor of
each figure is its FLOP count over the matmul rate measured here for the same framework.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

from . import common   # noqa: E402
from .common import FRAMEWORK, IMPLS, OURS, fmt_s   # noqa: E402

WORKLOADS = ("vision", "caption", "itm", "blip2", "throughput", "lowprec", "onnx", "coldstart")
NOT_QUICK = ("onnx", "coldstart")   # exports, fresh processes: left out of --quick unless named
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny configs and few repetitions (smoke run)")
    p.add_argument("--backends", type=_csv(IMPLS), default=list(IMPLS),
                   help=f"comma-separated impls (default: {','.join(IMPLS)})")
    p.add_argument("--only", type=_csv(WORKLOADS), default=None,
                   help=f"comma-separated workloads (default: {','.join(WORKLOADS)}; --quick: without "
                        f"{','.join(NOT_QUICK)})")
    p.add_argument("--threads", type=int, default=None, help="threads per framework (default: the frameworks' own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per case, shared equally by the impls, before repetitions stop "
                        "(default 30, quick 0.2)")
    p.add_argument("--max-reps", type=int, default=None, help="timed calls per impl at most (default 10, quick 2)")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/<date>-<machine>.json)")
    p.add_argument("--load", action="store_true",
                   help="also run the load benchmark (benchmarks/load.py: full-size synthetic checkpoints, "
                        "~8 GB of disk and ~19 GB of memory; not part of the default run)")
    from . import load as load_bench
    load_bench.add_arguments(p, prefix="load-")
    p.add_argument("--dataset", action="store_true",
                   help="also the data-set engines' images/s, bundled models (benchmarks/dataset.py --quick, ~2 min)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each workload in a fresh process of its own (default: on for a run of more than one "
                        "workload without --quick)")
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)   # a child of an isolated run
    p.add_argument("--readme", default=None, help="README whose benchmark table to rewrite (default: the repository's "
                   "README.md after a full float32 run of every workload; 'none': never)")


# -- targets of issue 8 -------------------------------------------------------------------------
def _find(cases, workload, mode, batch):
    for c in cases:
        if c["workload"] == workload and c["mode"] == mode and c["params"].get("batch") == batch:
            return c
    return None


def _median(case, impl):
    r = case["results"].get(impl, {}) if case else {}
    return r.get("median_s") if r.get("status") == "ok" else None


def evaluate_targets(cases) -> list:
    """The issue's float32 batch-1 targets, each with the measured value and met / missed / not measured."""
    out = []

    def add(target, impl, value, threshold, le):
        met = None if value is None else (value <= threshold if le else value >= threshold)
        out.append({"target": target, "impl": impl, "value": value, "threshold": threshold,
                    "comparison": "<=" if le else ">=", "met": met})

    vision = _find(cases, "vision", "forward", 1)
    for b in OURS:
        r = vision["results"].get(b, {}) if vision else {}
        value = r["median_s"] / r["floor_s"] if r.get("status") == "ok" and r.get("floor_s") else None
        add("vision forward batch 1: time / own compute floor", b, value, 1.3, True)
    greedy = _find(cases, "caption", "greedy", 1)
    ref = _median(greedy, "hf-torch")
    for b in OURS:
        t = _median(greedy, b)
        add("caption greedy batch 1: speed-up over transformers PyTorch", b, ref / t if ref and t else None, 2.0, False)
    for b in OURS:   # issue 19: the floor of benchmarks/caption.py (image compute + decoder weight reads)
        r = greedy["results"].get(b, {}) if greedy else {}
        add("caption greedy batch 1: time / own floor (compute + bandwidth)", b,
            r.get("time_over_compute_bandwidth_floor") if r.get("status") == "ok" else None, 1.3, True)
    t, ref_tf = _median(greedy, "tf"), _median(greedy, "hf-tf")
    add("caption greedy batch 1: speed-up of our TF over transformers TF", "tf",
        ref_tf / t if ref_tf and t else None, 10.0, False)
    for mode in ("greedy", "beam3"):
        case = _find(cases, "caption", mode, 1)
        base = _median(case, "torch")
        for b in ("jax", "tf"):
            t = _median(case, b)
            add(f"caption {mode} batch 1: time relative to our PyTorch", b, t / base if t and base else None, 1.0, True)
    warm = next((c for c in cases if c["workload"] == "coldstart" and c["mode"] == "warm"), None)
    for b in OURS:   # issue 19: new process, model loaded, compile cache warm
        if warm is not None:
            add("first caption of a new process, warm compile cache (s)", b, _median(warm, b), 2.5, True)
    step = next((c for c in cases if c["workload"] == "coldstart" and c["mode"] == "per_token"), None)
    if step is not None:
        j, t = _median(step, "jax"), _median(step, "tf")
        add("decode per token: jax relative to tf", "jax", j / t if j and t else None, 1.2, True)
    return out


# -- printing -----------------------------------------------------------------------------------
def print_summary(ctx, env, targets, log=print) -> None:
    impls = ctx.impls
    log("\n== summary: median time per call; floors use the best matmul rate and bandwidth of the whole run")
    for fw, r in ctx.rates.items():
        log(f"  matmul {fw}: " + (f"best {r['best_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['n']}x{r['n']} {r['dtype']}, "
                                 f"{len(r['measured_flops_per_s'])} measurements)" if "error" not in r else r["error"]))
    if ctx.bandwidth:
        log(f"  memory bandwidth (best of read and copy): best {ctx.bandwidth['best_bytes_per_s'] / 1e9:.1f} GB/s")
    for impl in impls:
        fw = env["frameworks"].get(FRAMEWORK[impl], {})
        who = "ours" if impl in OURS else "transformers " + str(env["packages"].get("transformers"))
        if fw.get("available"):
            log(f"  {impl:<9} {who}: {FRAMEWORK[impl]} {fw['version']}, device {fw['device']}, {ctx.dtype}, "
                f"{fw['threads']} threads")
        else:
            log(f"  {impl:<9} {who}: unavailable ({fw.get('reason')})")
    log(f"  {'workload':<15}{'case':<44}{'GFLOP':>9}{'bw floor':>10}" + "".join(f"{i:>11}" for i in impls)
        + "  floor fraction (ours)")
    bw = (ctx.bandwidth or {}).get("best_bytes_per_s")
    for c in ctx.cases:
        cells = []
        for impl in impls:   # cases of one comparison (caption-onnx: torch vs onnxruntime) lack the others
            r = c["results"].get(impl)
            cells.append("-" if r is None else fmt_s(r["median_s"]) if r["status"] == "ok" else r["status"])
        fr = ", ".join(f"{b} {c['results'][b]['floor_fraction']:.2f}" for b in OURS
                       if c["results"].get(b, {}).get("floor_fraction"))
        bw_floor = fmt_s(c["weight_bytes"] / bw) if c.get("weight_bytes") and bw else "-"
        log(f"  {c['workload']:<15}{c['case'][:43]:<44}{c['flops'] / 1e9:>9.2f}{bw_floor:>10}"
            + "".join(f"{x:>11}" for x in cells)
            + f"  {fr}")
    if not targets:
        return
    log("\n== issue targets (float32, batch 1)" + (" - quick run on tiny configs: not meaningful" if ctx.quick else ""))
    for t in targets:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        val = "-" if t["value"] is None else f"{t['value']:.2f}"
        log(f"  {state:<13}{t['impl']:<6}{t['target']}: {val} (target {t['comparison']} {t['threshold']})")


# -- main ---------------------------------------------------------------------------------------
def run(args) -> int:
    common.configure_environment(args.threads, args.backends)
    if args.only is None:
        args.only = [w for w in WORKLOADS if not (args.quick and w in NOT_QUICK)]
    if args.part and (len(args.only) != 1 or not args.out):
        raise SystemExit("--part runs one workload (--only NAME) into --out FILE")
    from .harness import Context   # after the environment is set: it may import frameworks
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 30.0)
    max_reps = args.max_reps if args.max_reps is not None else (2 if args.quick else 10)
    ctx = Context(args.backends, dtype=args.dtype, threads=args.threads, quick=args.quick, budget_s=budget,
                  max_reps=max_reps)
    started = time.time()
    frameworks = sorted({FRAMEWORK[i] for i in args.backends})
    env = common.environment(frameworks, args.dtype, args.threads)
    if args.part:   # a child of an isolated run: the parent prints the header, summary and results
        return _run_part(args, ctx, frameworks)
    print(f"blip benchmarks on {env['cpu']} ({env['usable_cpus']} usable CPUs, load {env['load_average'][0]:.2f}), "
          f"{args.dtype}, {'quick' if args.quick else 'full'} run")
    for fw, info in env["frameworks"].items():
        print(f"  {fw}: " + (f"{info['version']} on {info['device']}, {info['threads']} threads" if info.get("available")
                            else f"unavailable ({info['reason']})"))
    errors, walls = {}, {}
    isolate = args.isolate if args.isolate is not None else (not args.quick and len(args.only) > 1)
    try:
        if isolate:
            _run_isolated(args, ctx, errors, walls)
        else:
            for name in args.only:
                t0 = time.time()
                _run_workload(ctx, name, frameworks, errors)
                walls[name] = round(time.time() - t0, 1)
            ctx.refresh_rates(frameworks)
        if getattr(args, "dataset", False):
            from . import dataset
            print("\n== data-set engines (benchmarks/dataset.py --quick)")
            t0 = time.time()
            dataset_result = dataset.run_suite(quick=True)
            walls["dataset"] = round(time.time() - t0, 1)
            print(dataset.table(dataset_result))
    finally:
        ctx.close()
    ctx.finalize()
    targets = evaluate_targets(ctx.cases) if args.dtype == "float32" else []   # the targets are float32
    print_summary(ctx, env, targets)
    out = args.out or results_path(env["machine"], args.only, args.quick)
    data = {"schema": "blip-bench/1", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join((["python"] if sys.argv[0].endswith(".py") else []) + sys.argv),
            "options": {"quick": args.quick, "backends": args.backends, "only": args.only, "threads": args.threads,
                        "dtype": args.dtype, "budget_s": budget, "max_reps": max_reps,
                        "isolate": isolate},
            "environment": env, "load_average_end": list(os.getloadavg()), "wall_s": round(time.time() - started, 1),
            "workload_wall_s": walls, "matmul": ctx.rates, "memory_bandwidth": ctx.bandwidth, "cases": ctx.cases,
            "workload_errors": errors, "targets": targets,
            "sections": ctx.sections}   # extra tables of workloads outside the impl grid
    if args.load:   # heavy: full-size checkpoints, one fresh process per measurement
        from . import load as load_bench
        data["load"] = load_bench.run(args.load_models, args.load_impls, args.load_dtypes, args.load_workdir,
                                      args.load_keep, args.load_check_logits, repeats=args.load_repeats,
                                      device=args.load_device)
        if not all(t["met"] for t in data["load"]["targets"]):
            errors["load"] = "load targets missed (see data['load']['targets'])"
    if getattr(args, "dataset", False):
        data["dataset"] = dataset_result
    print(f"\nwrote {common.write_json(out, data)} ({data['wall_s']:.0f} s)")
    readme = args.readme or (os.path.join(os.path.dirname(RESULTS_DIR), os.pardir, "README.md")
                             if not args.quick and args.dtype == "float32" and set(args.only) == set(WORKLOADS) else None)
    if readme and readme != "none":
        from .report import update_readme
        print(f"{'updated' if update_readme(readme, data) else 'no benchmark-table markers in'} {readme}")
    return 1 if errors else 0


def _run_workload(ctx, name: str, frameworks, errors: dict) -> None:
    """Measure the rates again, then run workload ``name`` into ``ctx``; a failure goes to ``errors``."""
    ctx.refresh_rates(frameworks)
    try:
        importlib.import_module(f"{__package__}.{name}").run(ctx)
    except Exception as exc:   # noqa: BLE001 - report, keep the other workloads
        errors[name] = common.error_text(exc)
        print(f"\n!! workload {name} failed: {errors[name]}")


def _run_part(args, ctx, frameworks) -> int:
    """One workload of an isolated run, in this (fresh) process; its cases and rates go to ``--out``."""
    errors = {}
    try:
        _run_workload(ctx, args.only[0], frameworks, errors)
        ctx.refresh_rates(frameworks)
    finally:
        ctx.close()
    common.write_json(args.out, {"cases": ctx.cases, "matmul": ctx.rates, "memory_bandwidth": ctx.bandwidth,
                                 "sections": ctx.sections, "workload_errors": errors})
    return 1 if errors else 0


def _merge_best(into: dict, measured: dict, best: str, seen: str) -> dict:
    """Join two processes' rate records: the details of the one with the better best, every measurement listed."""
    if not into or "error" in into:
        return dict(measured)
    if "error" in measured:
        return into
    values = into[seen] + measured[seen]
    return dict(measured if measured[best] > into[best] else into, **{seen: values, best: max(values)})


def _run_isolated(args, ctx, errors: dict, walls: dict) -> None:
    """Run each workload in a fresh process (this script with ``--part``) and gather its cases into ``ctx``."""
    repo = os.path.dirname(os.path.dirname(RESULTS_DIR))
    for name in args.only:
        t0 = time.time()
        part = os.path.join(ctx.tmp, f"{name}.json")
        cmd = [sys.executable, "-m", f"{__package__}.run_all", "--part", "--only", name, "--out", part,
               "--backends", ",".join(args.backends), "--dtype", args.dtype, "--budget", str(ctx.budget_s),
               "--max-reps", str(ctx.max_reps), "--readme", "none"]
        cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--quick"] if args.quick else [])
        print(f"\n-- workload {name} in a fresh process", flush=True)
        rc = subprocess.call(cmd, cwd=repo)
        walls[name] = round(time.time() - t0, 1)
        try:
            with open(part, encoding="utf-8") as fh:
                got = json.load(fh)
        except (OSError, ValueError) as exc:
            errors[name] = f"its process exited with status {rc} and left no results ({type(exc).__name__})"
            print(f"\n!! workload {name} failed: {errors[name]}")
            continue
        errors.update(got["workload_errors"])
        ctx.cases.extend(got["cases"])
        ctx.sections.update(got["sections"])
        for fw, r in got["matmul"].items():
            ctx.rates[fw] = _merge_best(ctx.rates.get(fw, {}), r, "best_flops_per_s", "measured_flops_per_s")
        if got["memory_bandwidth"]:
            ctx.bandwidth = _merge_best(ctx.bandwidth or {}, got["memory_bandwidth"], "best_bytes_per_s",
                                        "measured_bytes_per_s")


def results_path(machine: str, only, quick: bool) -> str:
    """The default results file: ``<date>-<machine>.json`` for a full run, ``<date>-<machine>-<workloads>.json``
    for a run of some workloads (so it never replaces the day's full run), ``-quick`` for tiny configs, and
    ``-<HHMMSS>`` added where that file exists already (a second run the same day keeps the first's)."""
    part = "" if set(only) == set(WORKLOADS) else "-" + "-".join(w for w in WORKLOADS if w in only)
    name = f"{datetime.date.today().isoformat()}-{machine}{part}{'-quick' if quick else ''}"
    if os.path.exists(os.path.join(RESULTS_DIR, name + ".json")):
        name += time.strftime("-%H%M%S")
    return os.path.join(RESULTS_DIR, name + ".json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run_all.py", description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
