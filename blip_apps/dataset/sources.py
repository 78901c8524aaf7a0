"""Where a data set's items come from: directories, globs, file lists, Parquet / CSV tables, tar shards.

A source is cut into *units* of work, small JSON-able dicts the driver makes without reading any
image (a chunk of file paths, one tar shard, one Parquet row group, one CSV file). ``read_unit``
turns a unit into *records*: ``{"id", "data" (the file's bytes), "text", "error"}``. The local
engine reads units one after another; the Ray engine reads them as Ray Data read tasks. Both run
the same code, so they see the same items with the same ids.

Item ids (the output's sort key):

- directory: the path relative to the directory, with ``/`` (``cats/0001.jpg``); several directories
  get their own prefix only when more than one input is given (``0:cats/0001.jpg``);
- glob, single image file or file list: the path as matched or as written in the list;
- Parquet / CSV: ``--id-column`` if given, else the ``--path-column`` value, else (and for an empty or
  null id cell) ``<table file name>#<row number, 9 digits>``;
- tar shard (WebDataset layout: members ``key.jpg``, ``key.txt``, ... grouped by key):
  ``<shard file name>/<key>``.

Relative paths inside a table or file list are relative to that table's or list's directory.
Bytes columns exist in Parquet only (CSV cannot hold raw bytes).
"""
from __future__ import annotations

import glob as globlib
import io
import os
import re
import tarfile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv")
LIST_EXTENSIONS = (".txt", ".lst")
TEXT_EXTENSIONS = (".txt", ".caption", ".question")
FILES_PER_UNIT = 256      # files per unit of work (run() uses 2 batches)


class SourceError(ValueError):
    """An input that cannot be read as a source at all (not one bad item: those become error records)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(directory: str):
    """Every image file under ``directory``, recursively, in sorted order (ids relative to it)."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if _is_image(name):
                full = os.path.join(root, name)
                out.append((os.path.relpath(full, directory).replace(os.sep, "/"), full))
    return out


def _read_list(path: str):
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((line, line if os.path.isabs(line) else os.path.join(base, line)))
    return out


def _file_units(pairs, skip, size):
    pairs = [p for p in pairs if p[0] not in skip]
    return [{"kind": "files", "items": pairs[i:i + size]} for i in range(0, len(pairs), size)]


def plan(inputs, *, path_column=None, bytes_column=None, id_column=None, text_column=None, skip=frozenset(),
         files_per_unit=FILES_PER_UNIT):
    """The units of work for ``inputs`` (paths, globs), leaving out file items whose id is in ``skip``.

    Loose files are cut into units of ``files_per_unit``; in Ray a unit is a block, and blocks are
    what the model actors share out, so a unit should hold a few batches, not the whole data set.

    Returns ``(units, total)`` where ``total`` is the number of items, those in ``skip`` included,
    if known without reading (None when a tar shard or a CSV file is among the inputs).
    """
    if not inputs:
        raise SourceError("no input given")
    table_opts = {"path_column": path_column, "bytes_column": bytes_column, "id_column": id_column,
                  "text_column": text_column}
    files, units, total = [], [], 0
    dirs = [p for p in inputs if os.path.isdir(p)]
    for spec in inputs:
        if os.path.isdir(spec):
            prefix = f"{dirs.index(spec)}:" if len(dirs) > 1 else ""
            files += [(prefix + i, p) for i, p in _walk(spec)]
            continue
        matches = [spec] if os.path.exists(spec) else sorted(globlib.glob(spec, recursive=True))
        if not matches:
            raise SourceError(f"{spec}: no such file, directory or matching glob")
        for path in matches:
            low = path.lower()
            if os.path.isdir(path):
                files += _walk(path)
            elif low.endswith(".tar"):
                units.append({"kind": "tar", "path": path, **table_opts})
                total = None
            elif low.endswith(".parquet"):
                new = _parquet_units(path, table_opts)
                units += new
                rows = sum(u.pop("rows") for u in new)
                total = None if total is None else total + rows
            elif low.endswith((".csv", ".tsv")):
                if bytes_column:
                    raise SourceError(f"{path}: a bytes column needs Parquet (CSV holds no raw bytes)")
                units.append({"kind": "csv", "path": path, **table_opts})
                total = None
            elif low.endswith(LIST_EXTENSIONS) and not _is_image(low):
                files += _read_list(path)
            else:
                files.append((path, path))
    seen, unique = set(), []
    for pair in files:      # one item per id: a path listed twice is captioned once
        if pair[0] not in seen:
            seen.add(pair[0])
            unique.append(pair)
    units = _file_units(unique, skip, max(1, files_per_unit)) + units
    if total is not None:
        total += len(unique)
    return units, total


def _parquet_units(path, opts):
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(path).metadata
    return [{"kind": "parquet", "path": path, "row_group": g, "first_row": sum(meta.row_group(i).num_rows
             for i in range(g)), "rows": meta.row_group(g).num_rows, **opts} for g in range(meta.num_row_groups)]


# -- reading ----------------------------------------------------------------------------------------
def _record(item_id, data=None, text=None, error=None):
    return {"id": str(item_id), "data": data, "text": text, "error": error}


def _read_file(item_id, path, text=None):
    try:
        with open(path, "rb") as fh:
            return _record(item_id, fh.read(), text)
    except OSError as exc:
        return _record(item_id, text=text, error=f"cannot read {path}: {exc.strerror or exc}")


def read_unit(unit, skip=frozenset()):
    """Yield the records of one unit (items whose id is in ``skip`` are left out)."""
    kind = unit["kind"]
    if kind == "files":
        for item_id, path in unit["items"]:
            if item_id not in skip:
                yield _read_file(item_id, path)
    elif kind == "tar":
        yield from _read_tar(unit, skip)
    elif kind in ("parquet", "csv"):
        yield from _read_table(unit, skip)
    else:
        raise SourceError(f"unknown unit kind {kind!r}")


def _read_tar(unit, skip):
    shard = os.path.basename(unit["path"])
    groups = {}     # key -> {"data": bytes, "text": str}; members of one key are adjacent in WebDataset shards
    order = []
    try:
        with tarfile.open(unit["path"], mode="r|*") as tar:
            current = None
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = os.path.splitext(member.name)
                if current is not None and key != current:
                    yield from _tar_flush(shard, current, groups.pop(current), skip)
                current = key
                group = groups.setdefault(key, {})
                if key not in order:
                    order.append(key)
                ext = ext.lower()
                if _is_image(member.name) and "data" not in group:
                    group["data"] = tar.extractfile(member).read()
                elif ext in TEXT_EXTENSIONS and unit.get("text_column") in (None, ext[1:]):
                    group["text"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
            if current is not None:
                yield from _tar_flush(shard, current, groups.pop(current), skip)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield _record(f"{shard}/", error=f"cannot read tar shard {unit['path']}: {exc}")


def _tar_flush(shard, key, group, skip):
    item_id = f"{shard}/{key}"
    if item_id in skip:
        return
    if "data" not in group:
        yield _record(item_id, text=group.get("text"), error="no image member for this key")
    else:
        yield _record(item_id, group["data"], group.get("text"))


def _table_batches(unit):
    cols = [c for c in (unit["path_column"], unit["bytes_column"], unit["id_column"], unit["text_column"]) if c]
    if not (unit["path_column"] or unit["bytes_column"]):
        raise SourceError(f"{unit['path']}: a table needs --path-column or --bytes-column")
    if unit["kind"] == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(unit["path"])
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing:
            names = ", ".join(pf.schema_arrow.names)
            raise SourceError(f"{unit['path']}: no column {', '.join(missing)} (has {names})")
        yield from pf.iter_batches(batch_size=256, row_groups=[unit["row_group"]], columns=sorted(set(cols)))
    else:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        parse = pcsv.ParseOptions(delimiter="\t" if unit["path"].lower().endswith(".tsv") else ",")
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in cols})
        reader = pcsv.open_csv(unit["path"], parse_options=parse, convert_options=convert)
        names = reader.schema.names
        missing = [c for c in cols if c not in names]
        if missing:
            raise SourceError(f"{unit['path']}: no column {', '.join(missing)} (has {', '.join(names)})")
        yield from reader


def _read_table(unit, skip):
    base = os.path.dirname(os.path.abspath(unit["path"]))
    name = os.path.basename(unit["path"])
    row = unit.get("first_row", 0)
    pc, bc, ic, tc = unit["path_column"], unit["bytes_column"], unit["id_column"], unit["text_column"]
    for batch in _table_batches(unit):
        cols = {c: batch.column(c).to_pylist() for c in batch.schema.names}
        for i in range(batch.num_rows):
            path = cols[pc][i] if pc else None
            item_id = cols[ic][i] if ic else path
            if item_id is None or item_id == "":      # no id or path column, or an empty cell (CSV reads it as "")
                item_id = f"{name}#{row:09d}"
            row += 1
            text = cols[tc][i] if tc else None
            if str(item_id) in skip:
                continue
            if bc and cols[bc][i] is not None:
                yield _record(item_id, bytes(cols[bc][i]), text)
            elif path:
                yield _read_file(item_id, path if os.path.isabs(path) else os.path.join(base, path), text)
            else:
                yield _record(item_id, text=text, error="empty path / bytes cell")


def decode_image(data: bytes):
    """Bytes -> RGB-able ``PIL.Image`` (loaded), or raise ``ValueError`` with the reason."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = re.sub(r" <[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))    # no memory addresses: same text every run
        raise ValueError(f"cannot decode image ({exc.__class__.__name__}: {detail})") from None
