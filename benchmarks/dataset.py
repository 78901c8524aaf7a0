"""Data-set throughput: images/s of ``caption`` and ``embed``, local engine vs Ray with 1 and 2 workers.

    python benchmarks/dataset.py                  # bundled tiny models and the BLIP-base config
    python benchmarks/dataset.py --quick          # bundled models only, fewer images (run_all --dataset)

Models: the bundled ``caption`` / ``retrieval`` models (64x64 images) and the BLIP-base config
(ViT-B/16 at 384x384, 12-layer text towers) with seeded random weights, saved once to a temporary
directory with the bundled tokenizer and a 384-pixel image processor (random weights: only the
speed means something; captions stop at ``--max-new-tokens`` 20 or at a random end token).
Images: synthetic shapes rendered at the model's size, PNG files in one directory.

Each figure is the wall time of one whole ``blip_apps.dataset.run`` call (listing, reading,
decoding, the model, writing parts and the final Parquet file) divided into the image count:
the model load (and for Ray the actors' start and their model loads) is included; the local Ray
instance itself is started once beforehand and not counted. Local: one process, the framework's
own threads (2 here) and 2 decoding threads. Ray 1 worker: one actor reserving every CPU; Ray 2
workers: two actors with one CPU each (Ray sets each actor's OMP threads to its CPUs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (label, model key, images, batch size) per workload; quick keeps only the bundled models.
PLAN = {
    "bundled": {"images": 256, "batch": 32, "quick_images": 96},
    "blip-base": {"images": 24, "batch": 4},
}
ENGINES = (("local", 1), ("ray", 1), ("ray", 2))


def _bundled(task):
    from blip_apps.cli import BUNDLED
    return os.path.join(BUNDLED, {"caption": "caption", "embed": "retrieval"}[task])


def make_base_models(root: str) -> dict:
    """BLIP-base captioner and retriever with seeded random weights, plus the bundled tokenizer files."""
    import backends.torch as bt
    from .caption import config
    out = {}
    for task, cls in (("caption", bt.BlipForConditionalGeneration), ("embed", bt.BlipForImageTextRetrieval)):
        path = os.path.join(root, f"base-{task}")
        cls(config(False), seed=0).save_pretrained(path)
        src = _bundled(task)
        for name in os.listdir(src):
            if name.startswith(("tokenizer", "special_tokens", "vocab")):
                shutil.copy(os.path.join(src, name), path)
        with open(os.path.join(src, "preprocessor_config.json")) as fh:
            pre = json.load(fh)
        pre["size"] = {"height": 384, "width": 384}
        with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
            json.dump(pre, fh)
        out[task] = path
    return out


def make_images(directory: str, n: int, size: int) -> str:
    from blip_apps import synthetic
    os.makedirs(directory, exist_ok=True)
    for i, (scene, _) in enumerate(synthetic.rows(n, 99, "test")):
        synthetic.render(scene, size=size).save(os.path.join(directory, f"{i:05d}.png"))
    return directory


def time_run(task, model, images, out_dir, engine, workers, batch, cpus):
    from blip_apps.dataset.run import run
    from blip_apps.dataset.tasks import TaskSpec
    out = os.path.join(out_dir, f"{task}-{engine}{workers}-{os.path.basename(model)}.parquet")
    spec = TaskSpec(task=task, model=model, batch_size=batch)
    t0 = time.perf_counter()
    summary = run(spec, [images], out, engine=engine, overwrite=True, num_workers=workers,
                  cpus_per_worker=max(1.0, cpus / workers), progress=False, part_size=10 ** 6)
    wall = time.perf_counter() - t0
    return {"seconds": round(wall, 2), "images": summary.results, "images_per_s": round(summary.results / wall, 2),
            "errors": summary.errors}


def run_suite(quick=False, log=print, models=("bundled", "blip-base"), partial=None, tasks=("caption", "embed"),
              base_images=None) -> dict:
    """Every (model, task, engine) row; ``partial(result)`` is called after each row (results so far)."""
    import ray
    from blip_apps.dataset.engines import ray_init
    cpus = os.cpu_count() or 1
    load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="blip-dataset-bench-")
    rows = []
    try:
        ray_init(num_cpus=cpus + 1)
        chosen = {}
        if "bundled" in models:
            chosen["bundled"] = {t: _bundled(t) for t in ("caption", "embed")}
        if "blip-base" in models and not quick:
            chosen["blip-base"] = make_base_models(tmp)
        for label, by_task in chosen.items():
            plan = PLAN[label]
            n = plan["quick_images"] if quick and "quick_images" in plan else plan["images"]
            n = base_images if label == "blip-base" and base_images else n
            images = make_images(os.path.join(tmp, f"images-{label}"), n, 64 if label == "bundled" else 384)
            for task, model in ((t, m) for t, m in by_task.items() if t in tasks):
                for engine, workers in ENGINES:
                    r = time_run(task, model, images, tmp, engine, workers, plan["batch"], cpus)
                    r.update(model=label, task=task, engine=engine, workers=workers, batch=plan["batch"])
                    rows.append(r)
                    if partial:
                        partial({"rows": rows, "cpus": cpus, "quick": quick, "load_average_start": list(load_start),
                                 "load_average_now": list(os.getloadavg()), "complete": False})
                    log(f"  {label:<10} {task:<8} {engine:<6} {workers} worker(s): {r['images']} images in "
                        f"{r['seconds']:.1f} s = {r['images_per_s']:.2f} images/s")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
            "cpus": cpus, "quick": quick}


def table(result) -> str:
    lines = ["| model | task | images | batch | local | Ray, 1 worker | Ray, 2 workers |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = []
    for r in result["rows"]:
        if (r["model"], r["task"]) not in keys:
            keys.append((r["model"], r["task"]))
    for model, task in keys:
        cells = {(r["engine"], r["workers"]): r for r in result["rows"] if r["model"] == model and r["task"] == task}
        first = next(iter(cells.values()))
        lines.append(f"| {model} | {task} | {first['images']} | {first['batch']} | " + " | ".join(
            f"{cells[k]['images_per_s']:.2f} img/s ({cells[k]['seconds']:.0f} s)" if k in cells else "-"
            for k in ENGINES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dataset.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="bundled models only, fewer images")
    p.add_argument("--models", default="bundled,blip-base", help="comma-separated: bundled, blip-base")
    p.add_argument("--tasks", default="caption,embed", help="comma-separated: caption, embed")
    p.add_argument("--base-images", type=int, default=None, help="images for the BLIP-base rows (default 24)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<date>-dataset.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.time()
    print(f"data-set throughput, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    out = args.out or os.path.join(RESULTS_DIR, f"{datetime.date.today().isoformat()}-dataset"
                                                f"{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stamp = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": " ".join(["python"] + sys.argv)}

    def save(result):          # after every row, so an interrupted run keeps what it measured
        with open(out, "w") as fh:
            json.dump(dict(result, **stamp), fh, indent=1)

    result = run_suite(quick=args.quick, models=tuple(args.models.split(",")), partial=save,
                       tasks=tuple(args.tasks.split(",")), base_images=args.base_images)
    result.update(complete=True, wall_s=round(time.time() - started, 1))
    save(result)
    print(table(result))
    print(f"load average start {result['load_average_start'][0]:.2f}, end {result['load_average_end'][0]:.2f}")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
