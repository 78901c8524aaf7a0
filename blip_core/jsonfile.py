"""Bounded reading of the small JSON files a model directory holds (config.json, index files,
processor configs).

A hostile or broken file must give one error naming it, never a hang or unbounded memory: only
regular files are opened (a FIFO would block forever, ``/dev/zero`` never ends), at most
``limit`` bytes are read, the text must be UTF-8 and the JSON must have the expected top-level
type. Every problem raises ``JsonFileError`` (a ``ValueError``), or ``FileNotFoundError`` for a
path that does not exist.
"""
from __future__ import annotations

import json
import os
import stat

# config.json of the largest public checkpoints is a few tens of KB; index files list one line
# per tensor (a few MB for the biggest models).
CONFIG_LIMIT = 4 * 2**20
INDEX_LIMIT = 256 * 2**20


class JsonFileError(ValueError):
    """A JSON file is not a regular file, too large, not UTF-8, not JSON or of the wrong shape."""


def read_json_file(path, *, limit: int = CONFIG_LIMIT, expect: type = dict, what: str = "JSON file"):
    """Parse ``path`` (a regular file of at most ``limit`` bytes) and return its top-level value,
    which must be an instance of ``expect`` (``None`` accepts anything)."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise JsonFileError(f"{path}: {what} is not a regular file (a device, FIFO or socket is refused)")
    if info.st_size > limit:
        raise JsonFileError(f"{path}: {what} is {info.st_size} bytes, more than the limit of {limit}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the check, opening does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot open {what} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise JsonFileError(f"{path}: {what} is not a regular file")
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise JsonFileError(f"{path}: {what} is larger than the limit of {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonFileError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise JsonFileError(f"{path}: {what} is nested too deeply") from None
    if expect is not None and not isinstance(data, expect):
        raise JsonFileError(f"{path}: {what} must hold a JSON {_kind(expect)}, got {_kind(type(data))}")
    return data


def _kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", type(None): "null", bool: "boolean",
            int: "number", float: "number"}.get(t, t.__name__)
