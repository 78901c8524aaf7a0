"""Output in atomic parts, ``--resume``, and the final sorted file.

``--out results.parquet`` (or ``.jsonl``) works in ``results.parquet.parts/``:

- ``run.json``: the task settings (a resumed run must match them);
- ``part-<n>-<pid>.parquet``: rows written together, sorted by id, each file written under a
  temporary name, flushed to disk and renamed, so a part is there whole or not at all;
  error rows live in the same part (``error`` set), so an item is done once its part exists.

A killed run leaves whole parts (and maybe a temporary file, removed on resume); ``--resume``
reads the ids of the parts and processes only the others. When every item is done, the parts are
merged (k-way, streaming) into ``results.parquet`` sorted by id (byte order of the UTF-8 id) with
the result rows, and ``results.errors.jsonl`` with ``{"id", "error"}`` per failed item; both are
written atomically, then the parts directory is removed.
"""
from __future__ import annotations

import heapq
import json
import os
import shutil
import uuid

FORMATS = (".parquet", ".jsonl")
BATCH_ROWS = 256


class OutputError(ValueError):
    """An output path that cannot be used as asked (exists without --resume/--overwrite, other settings)."""


def output_format(path: str) -> str:
    for ext in FORMATS:
        if path.lower().endswith(ext):
            return ext
    raise OutputError(f"{path}: --out must end in .parquet or .jsonl")


def errors_path(path: str) -> str:
    return path[: -len(output_format(path))] + ".errors.jsonl"


def schema(task: str, dim: int | None = None, with_error: bool = True):
    """The Parquet schema of a task's rows (``dim``: the embedding size for ``embed``)."""
    import pyarrow as pa
    cols = [("id", pa.string())] + ([("error", pa.string())] if with_error else [])
    cols += [("model", pa.string()), ("backend", pa.string())]
    if task == "caption":
        cols += [("caption", pa.string())]
    elif task == "vqa":
        cols += [("question", pa.string()), ("answer", pa.string())]
    elif task == "embed":
        vec = pa.list_(pa.float32(), dim)
        cols += [("image_embedding", vec), ("text", pa.string()), ("text_embedding", vec)]
    elif task == "match":
        cols += [("texts", pa.list_(pa.string())), ("itm_probability", pa.list_(pa.float32())),
                 ("itc_score", pa.list_(pa.float32()))]
    return pa.schema(cols)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _write_atomic(path: str, fmt: str, rows, sch, sort=True):
    """Write ``rows`` (dicts) to ``path`` through a temporary file, fsync, rename."""
    rows = sorted(rows, key=lambda r: r["id"].encode()) if sort else rows
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        if fmt == ".parquet":
            _write_parquet(tmp, rows, sch)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps({k: _jsonable(r.get(k)) for k in sch.names}, allow_nan=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path) or ".")


def _write_parquet(path, rows, sch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with pq.ParquetWriter(path, sch) as writer:
        chunk, wrote = [], False
        for r in rows:
            chunk.append(r)
            if len(chunk) >= 4096:
                writer.write_table(_table(chunk, sch))
                chunk, wrote = [], True
        if chunk or not wrote:
            writer.write_table(_table(chunk, sch) if chunk else pa.Table.from_pylist([], schema=sch))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _table(rows, sch):
    import pyarrow as pa
    return pa.Table.from_pylist([{k: _jsonable(r.get(k)) for k in sch.names} for r in rows], schema=sch)


def read_rows(path: str):
    """Rows (dicts) of a part or an output file, in file order, a batch at a time."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            yield from batch.to_pylist()
    else:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def read_ids(path: str):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    return [r["id"] for r in read_rows(path)]


class Parts:
    """The parts directory of one ``--out`` path: what is done, new parts, the final merge."""

    def __init__(self, out: str, task: str, settings: dict, dim=None, resume=False, overwrite=False):
        self.out, self.fmt = out, output_format(out)
        self.dir = out + ".parts"
        self.task, self.dim = task, dim
        self.schema = schema(task, dim)
        run = {"task": task, "settings": settings, "format": self.fmt}
        meta = os.path.join(self.dir, "run.json")
        if overwrite:
            for p in (self.dir,):
                shutil.rmtree(p, ignore_errors=True)
        elif not resume and (os.path.exists(self.dir) or os.path.exists(out)):
            raise OutputError(f"{out}: exists (or its unfinished parts do); use --resume to finish it or "
                              f"--overwrite to start again")
        if resume and os.path.exists(meta):
            with open(meta, encoding="utf-8") as fh:
                old = json.load(fh)
            if old != run:
                diff = sorted(k for k in set(old.get("settings", {})) | set(settings)
                              if old.get("settings", {}).get(k) != settings.get(k))
                raise OutputError(f"{out}: the unfinished run used other settings ({', '.join(diff) or 'task'}); "
                                  f"use the same ones, or --overwrite")
        self.done = set()
        self.finished_before = resume and not os.path.exists(self.dir) and os.path.exists(out)
        if self.finished_before:    # merged already: nothing left to do
            self.done.update(read_ids(out))
            if os.path.exists(errors_path(out)):
                self.done.update(r["id"] for r in read_rows(errors_path(out)))
            return
        os.makedirs(self.dir, exist_ok=True)
        for name in os.listdir(self.dir):          # a part that a kill interrupted never became a part
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(self.dir, name))
        if not os.path.exists(meta):
            tmp = meta + f".{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(run, fh, indent=1)
            os.replace(tmp, meta)
        for p in self.part_files():
            self.done.update(read_ids(p))
        self._seq = len(self.part_files())

    def part_files(self):
        return sorted(os.path.join(self.dir, n) for n in os.listdir(self.dir)
                      if n.startswith("part-") and n.endswith(self.fmt))

    def write(self, rows):
        """Commit ``rows`` as one part (atomic)."""
        rows = [r for r in rows if r["id"] not in self.done]
        if not rows:
            return
        name = f"part-{self._seq:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{self.fmt}"
        self._seq += 1
        _write_atomic(os.path.join(self.dir, name), self.fmt, rows, self.schema)
        self.done.update(r["id"] for r in rows)

    def merge(self):
        """Merge the parts into the output and errors files (sorted by id); return (n_results, n_errors)."""
        if self.finished_before:
            n_err = sum(1 for _ in read_rows(errors_path(self.out))) if os.path.exists(errors_path(self.out)) else 0
            return len(read_ids(self.out)), n_err
        streams = [read_rows(p) for p in self.part_files()]
        merged = heapq.merge(*streams, key=lambda r: r["id"].encode())
        results_schema = schema(self.task, self.dim, with_error=False)
        counts = {"ok": 0, "err": 0}
        errors = []
        last = None

        def results():
            nonlocal last
            for r in merged:
                if r["id"] == last:       # cannot happen with whole parts; kept as a guard
                    continue
                last = r["id"]
                if r.get("error") is not None:
                    counts["err"] += 1
                    errors.append({"id": r["id"], "error": r["error"]})
                    continue
                counts["ok"] += 1
                yield r
        _write_atomic(self.out, self.fmt, results(), results_schema, sort=False)
        err_path = errors_path(self.out)
        tmp = err_path + f".tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            for e in errors:
                fh.write(json.dumps(e) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, err_path)
        shutil.rmtree(self.dir, ignore_errors=True)
        return counts["ok"], counts["err"]
