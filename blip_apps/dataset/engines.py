"""The two engines: ``local`` (one process, threads) and ``ray`` (Ray Data, an actor pool).

Both take the same units (``sources.plan``), run the same ``Preparer.prepare`` and ``Worker.run``
and hand rows to the same ``output.Parts``, so for the same input they write the same files.

local: a producer thread reads units and submits each record's decoding and preprocessing to a
thread pool; prepared batches wait in a queue of at most ``prefetch`` batches (the memory bound:
about ``(prefetch + 1) * batch_size`` decoded images) while the main thread runs the model.

ray: ``from_items(units)`` -> ``map_batches(read and prepare)`` (tasks, one per unit: read the
bytes, decode and preprocess; pixels as a tensor column) -> ``map_batches(ModelActor,
compute=ActorPoolStrategy(size=num_workers))`` (an actor pool, one model per actor, any backend)
-> the driver streams the rows into parts. Ray's streaming executor overlaps the stages (decoding
runs while the actors run the model) and bounds the data in flight. Without ``--address`` a local
Ray instance is started.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .sources import read_unit
from .tasks import Preparer, Worker

RECORD_COLUMNS = ("id", "data", "text", "error")
_DONE = object()


def _progress(total, initial, disable):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, disable=disable, smoothing=0.1,
                file=sys.stderr, desc="images")


class _Sink:
    """Rows -> parts of ``part_size`` rows, and the progress bar."""

    def __init__(self, parts, part_size, bar):
        self.parts, self.part_size, self.bar = parts, part_size, bar
        self.pending, self.seen, self.errors = [], set(), 0

    def add(self, rows):
        for r in rows:
            if r["id"] in self.seen or r["id"] in self.parts.done:   # the same id twice in the input: first wins
                continue
            self.seen.add(r["id"])
            self.pending.append(r)
            self.errors += r.get("error") is not None
        self.bar.update(len(rows))
        if self.errors:
            self.bar.set_postfix(errors=self.errors, refresh=False)
        if len(self.pending) >= self.part_size:
            self.flush()

    def flush(self):
        self.parts.write(self.pending)
        self.pending = []


def run_local(spec, units, parts, total, *, part_size=512, threads=2, prefetch=4, progress=True):
    worker = Worker(spec)
    bar = _progress(total, len(parts.done), not progress)
    sink = _Sink(parts, part_size, bar)
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    failure = []

    def produce(pool):
        try:
            records = itertools.chain.from_iterable(read_unit(u, parts.done) for u in units)
            while not stop.is_set():
                batch = list(itertools.islice(records, spec.batch_size))
                if not batch:
                    break
                futures = [pool.submit(worker.prepare, r) for r in batch]
                while not stop.is_set():
                    try:
                        q.put(futures, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:   # noqa: BLE001 - handed to the main thread
            failure.append(exc)
        finally:
            q.put(_DONE)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="blip-decode") as pool:
        producer = threading.Thread(target=produce, args=(pool,), daemon=True, name="blip-read")
        producer.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    break
                sink.add(worker.run([f.result() for f in item]))
        finally:
            stop.set()
            while producer.is_alive():      # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            producer.join()
            bar.close()
        sink.flush()
    if failure:
        raise failure[0]
    return sink.errors


# -- ray --------------------------------------------------------------------------------------------
_PREPARERS: dict = {}


def _read_and_prepare(batch, spec, skip_ref=None):
    """Ray read stage (tasks): units (JSON strings) -> decoded, preprocessed records.

    One task per unit, so each unit becomes its own block and the model actors share the blocks
    out; a failed item keeps a zero image so that the pixel column stays one dense tensor.
    """
    import ray
    skip = ray.get(skip_ref) if skip_ref is not None else frozenset()
    key = repr(spec)
    if key not in _PREPARERS:                     # one processor per worker process
        _PREPARERS[key] = Preparer(spec)
    preparer = _PREPARERS[key]
    out = [preparer.prepare(r) for u in batch["unit"] for r in read_unit(json.loads(str(u)), skip)]
    blank = np.zeros(preparer.pixel_shape, np.float32)
    return {"id": np.array([r["id"] for r in out], dtype=object),
            "text": np.array([r.get("text") for r in out], dtype=object),
            "error": np.array([r.get("error") for r in out], dtype=object),
            "pixels": np.stack([r["pixels"] if r.get("pixels") is not None else blank for r in out])
            if out else np.zeros((0,) + preparer.pixel_shape, np.float32)}


def records_from_numpy(batch):
    """Ray's numpy batch (columns id, text, error, pixels) -> records for ``Worker.run``.

    A column of nulls may reach numpy as NaN floats: only a ``str`` is a text or an error.
    """
    def text(v):
        return v if isinstance(v, str) else None
    records = []
    for i in range(len(batch["id"])):
        r = {"id": str(batch["id"][i]), "text": text(batch["text"][i]), "error": text(batch["error"][i])}
        if r["error"] is None:
            r["pixels"] = batch["pixels"][i]
        records.append(r)
    return records


class _ModelActor:
    """Ray model stage: one ``Worker`` (one model) per actor."""

    def __init__(self, spec, dim=None):
        self.worker = Worker(spec)
        self.dim = dim

    def __call__(self, batch):
        from .output import _table, schema
        records = records_from_numpy(batch)
        return _table(self.worker.run(records), schema(self.worker.spec.task, self.dim))


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's notice that the local instance it starts has token authentication on (its default, printed on
    every run); its warning that authentication is off, and everything else, pass."""

    def filter(self, record):
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def ray_init(address=None, num_cpus=None):
    """Join ``address`` or start a local Ray instance of ``num_cpus`` logical CPUs (default: the
    machine's), with this checkout on the workers' path."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                  logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenAuthNotice) for f in auth_log.filters):    # once per process, not per run
        auth_log.addFilter(_TokenAuthNotice())
    ray.init(num_cpus=num_cpus or os.cpu_count(), runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)


def run_ray(spec, units, parts, total, *, part_size=512, num_workers=1, address=None, cpus_per_worker=1.0,
            progress=True, dim=None):
    import ray
    import ray.data
    # the model actors' CPUs plus room for the read and prepare stages, or those could never start
    ray_init(address, num_cpus=max(os.cpu_count() or 1, math.ceil(num_workers * cpus_per_worker) + 1))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # our own bar (``_progress``) replaces Ray's, which would otherwise warn that they are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    bar = _progress(total, len(parts.done), not progress)
    sink = _Sink(parts, part_size, bar)
    skip_ref = ray.put(frozenset(parts.done)) if parts.done else None
    try:
        if units:
            ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
            ds = ds.map_batches(_read_and_prepare, batch_size=1, batch_format="numpy", num_cpus=0.25,
                                fn_kwargs={"spec": spec, "skip_ref": skip_ref})
            ds = ds.map_batches(_ModelActor, fn_constructor_kwargs={"spec": spec, "dim": dim},
                                batch_size=spec.batch_size, batch_format="numpy", num_cpus=cpus_per_worker,
                                compute=ray.data.ActorPoolStrategy(size=num_workers))
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                sink.add(table.to_pylist())
    finally:
        bar.close()
    sink.flush()
    return sink.errors
