"""Compiled programs on disk: where the XLA backends (jax, tf) keep them between processes, and the switch.

Without it, every new process compiles its programs again: the first ``generate`` of
``blip caption one.jpg --backend jax`` spends seconds in XLA before it decodes a token. Both
frameworks can persist compiled executables; this module decides where, once for both, and each
backend only applies the answer when it builds its first compiled program:

* on by default, in ``$XDG_CACHE_HOME/blip/xla`` (``~/.cache/blip/xla`` when ``XDG_CACHE_HOME`` is
  unset), one folder per framework and version (``jax-0.10.2``, ``tf-2.21.0``), created readable by
  its user alone (a cached executable is code the process will run);
* ``BLIP_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``) turns it off; ``BLIP_COMPILE_CACHE=/a/dir``
  puts it in ``/a/dir`` instead;
* ``set_persistent_cache(False)`` or ``set_persistent_cache("/a/dir")`` does the same from Python; call
  it before the process's first compiled call (TensorFlow reads its XLA flags once per process).

A framework the caller has already pointed at a cache of its own (``jax_compilation_cache_dir``
set, ``--tf_xla_persistent_cache_directory`` in ``TF_XLA_FLAGS``) keeps it. jax writes only programs
that took at least ``MIN_COMPILE_SECONDS`` to compile; TensorFlow writes every XLA program.

The folder is bounded: when a framework first uses it in a process, ``prune`` deletes the files
written or used longest ago until the whole folder is under ``BLIP_COMPILE_CACHE_MAX_MB`` (default
``MAX_MB``). ``clear_persistent_cache()`` (``blip cache clear``) deletes it all.

Executables keyed by the lowered program leave tracing: the framework still runs the Python of the
model once per process to find which program it needs. The JAX backend also keeps its compiled
generate programs keyed by the call (``backends/jax/program_cache.py``, under
``<root>/jax-programs-<version>``, with a note per model of the program a process ran first under
``<root>/jax-first-<version>``), so a later process neither traces nor lowers. ``write_atomic`` /
``read_checked`` are the file format of such entries (a header that names the entry and a digest of
the payload: a truncated, altered or foreign file is refused and deleted, never run), and
``source_fingerprint`` keys them by the code that built them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import warnings
from typing import Iterable, Optional, Union

from .settings import OFF

ENV = "BLIP_COMPILE_CACHE"
MAX_MB_ENV = "BLIP_COMPILE_CACHE_MAX_MB"
MAX_MB = 2048                    # default bound of the whole folder
MIN_COMPILE_SECONDS = 0.2        # jax: faster compiles are not worth a file
_setting: Union[None, bool, str] = None     # set_persistent_cache's value; None: the environment decides

_LOG = logging.getLogger(__name__)


def set_persistent_cache(setting: Union[bool, str, os.PathLike, None]) -> None:
    """``False``: no persistent cache; ``True``: the default folder; a path: that folder; ``None``: back to
    the environment (``BLIP_COMPILE_CACHE``) and the default. Takes effect for the frameworks that have not
    yet compiled a program in this process."""
    global _setting
    if setting is not None and not isinstance(setting, (bool, str, os.PathLike)):
        raise TypeError(f"set_persistent_cache takes True, False, None or a folder, got {setting!r}")
    _setting = os.fspath(setting) if isinstance(setting, os.PathLike) else setting


def default_root() -> str:
    """``$XDG_CACHE_HOME/blip/xla``, or ``~/.cache/blip/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blip", "xla")


def root() -> Optional[str]:
    """The cache folder of every framework, or None when the persistent cache is off."""
    setting = _setting
    if setting is None:
        value = os.environ.get(ENV, "").strip()
        setting = False if value.lower() in OFF else (value or True)
    if setting is False:
        return None
    return default_root() if setting is True else os.path.abspath(os.path.expanduser(setting))


def cache_dir(framework: str, version: str) -> Optional[str]:
    """``root()/<framework>-<version>``, created (mode 0700) when missing; None when the cache is off or
    the folder cannot be created (a warning says why; compiling still works, only without the cache)."""
    top = root()
    if top is None:
        return None
    path = os.path.join(top, f"{framework}-{version}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        warnings.warn(f"persistent compilation cache off: {exc} (set {ENV}=0 to silence, or {ENV}=<folder>)",
                      RuntimeWarning, stacklevel=2)
        return None
    return path


def clear_persistent_cache() -> Optional[str]:
    """Delete the cache folder (every framework's programs); returns the folder, or None when off."""
    top = root()
    if top is not None and os.path.isdir(top):
        shutil.rmtree(top)
    return top


# -- size bound ------------------------------------------------------------------------------------------
def max_bytes() -> Optional[int]:
    """The folder's bound in bytes (``BLIP_COMPILE_CACHE_MAX_MB``, default ``MAX_MB``; 0 or less: unbounded)."""
    value = os.environ.get(MAX_MB_ENV, "").strip()
    try:
        mb = float(value) if value else MAX_MB
    except ValueError:
        raise ValueError(f"{MAX_MB_ENV} must be a number of megabytes, got {value!r}") from None
    return None if mb <= 0 else int(mb * 2**20)


def prune(top: Optional[str] = None, limit: Optional[int] = -1) -> int:
    """Delete the files of ``top`` (default: ``root()``) modified longest ago until the rest fit in ``limit``
    bytes (default ``max_bytes()``). Readers refresh the time of an entry they use where they can (the jax
    programs), so this is least-recently-used for them and oldest-written-first for the frameworks'
    executables. Returns the bytes deleted; a file another process deletes first is skipped."""
    top = root() if top is None else top
    limit = max_bytes() if limit == -1 else limit
    if top is None or limit is None or not os.path.isdir(top):
        return 0
    files = []
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
    total, freed = sum(f[1] for f in files), 0
    for _, size, path in sorted(files):
        if total - freed <= limit:
            break
        try:
            os.remove(path)
            freed += size
        except OSError:
            continue
    return freed


def folder_size(top: Optional[str] = None) -> int:
    """Bytes under ``top`` (default ``root()``); 0 when off or missing."""
    top = root() if top is None else top
    if top is None:
        return 0
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(top) for n in names
               if os.path.isfile(os.path.join(d, n)))


# -- entries of traced programs ------------------------------------------------------------------------------
_DIGEST = 32


def write_atomic(path: str, magic: bytes, name: str, payload: bytes) -> None:
    """Write ``magic``, the entry's ``name`` (its key digest), a digest of ``payload`` and ``payload`` to
    ``path`` through a temporary file renamed into place: a reader sees the whole file or none."""
    head = magic + name.encode("ascii") + b"\n" + hashlib.sha256(payload).digest()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head + payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checked(path: str, magic: bytes, name: str) -> Optional[bytes]:
    """The payload ``write_atomic`` wrote for ``name``, or None when the file is missing, truncated, altered
    or another entry's (a damaged file is deleted, so it is written again)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    head = magic + name.encode("ascii") + b"\n"
    start = len(head) + _DIGEST
    if data[:len(head)] == head and hashlib.sha256(data[start:]).digest() == data[len(head):start]:
        try:
            os.utime(path)             # least recently used goes first (``prune``)
        except OSError:
            pass
        return data[start:]
    _remove(path)
    return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def read_entry(folder: Optional[str], name: str, magic: bytes) -> Optional[bytes]:
    """``read_checked`` of the entry ``name`` in ``folder`` (None: the cache is off, nothing to read)."""
    return None if folder is None else read_checked(os.path.join(folder, name), magic, name)


def write_entry(folder: Optional[str], name: str, magic: bytes, make_payload) -> None:
    """Write the entry ``name`` (``make_payload()``) into ``folder``; best effort: a payload that cannot be
    made, a full or read-only disk only cost a later process a trace (logged at debug level)."""
    if folder is None:
        return
    try:
        write_atomic(os.path.join(folder, name), magic, name, make_payload())
    except Exception as exc:       # noqa: BLE001
        _LOG.debug("entry %s not stored (%s)", name, exc)


def discard_entry(folder: Optional[str], name: str) -> None:
    """Delete the entry ``name`` (one that read back whole but would not load or run)."""
    if folder is not None:
        _remove(os.path.join(folder, name))


_FINGERPRINTS: dict = {}


_HOST: list = []


def host_fingerprint() -> str:
    """This machine's architecture and a digest of its CPU instruction-set flags (a compiled CPU program
    uses what it found), computed once per process."""
    if not _HOST:
        flags = ""
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
        except OSError:
            pass
        _HOST.append(platform.machine() + hashlib.sha256(flags.encode()).hexdigest()[:16])
    return _HOST[0]


def source_fingerprint(folders: Iterable[str]) -> str:
    """A digest of the Python sources under ``folders`` (names and contents), once per process: an entry
    traced by other code is another entry."""
    folders = tuple(sorted(os.path.abspath(f) for f in folders))
    if folders not in _FINGERPRINTS:
        h = hashlib.sha256()
        for top in folders:
            for folder, dirs, names in os.walk(top):
                dirs.sort()
                for name in sorted(n for n in names if n.endswith(".py")):
                    path = os.path.join(folder, name)
                    h.update(os.path.relpath(path, os.path.dirname(top)).encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
        _FINGERPRINTS[folders] = h.hexdigest()
    return _FINGERPRINTS[folders]
