"""Conversion that cannot lose data: overlap refusal, partial directories, crash-safe swap.

A conversion writes into a partial directory beside the destination, named
``.DST.partial-<pid>-<random>`` so that a later run can tell a dead writer's leftovers (removed)
from a live concurrent one (left alone). An existing destination is replaced by an atomic
exchange where the system offers one; otherwise the old directory is renamed to
``<partial>.old`` first and ``recover_destination`` renames it back if the process died before the
new one was in place.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile


class ConversionError(RuntimeError):
    """The conversion could not be done or did not verify; nothing was left at ``dst``."""


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_overlap(sources, dst) -> None:
    """Raise ``ConversionError`` when ``dst`` is, contains or lies inside any source path."""
    target = _real(dst)
    for src in sources:
        if src is None:
            continue
        real = _real(src)
        if _within(real, target) or _within(target, real):
            raise ConversionError(f"destination {dst} overlaps the source {src}; writing there could destroy the "
                                  "source: choose a destination outside it")


def _partial_prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}.partial-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's live process
        return True
    return True


def _partials(dst: str):
    """``(full path, pid, is_old)`` of this destination's partial directories."""
    parent, prefix = os.path.dirname(dst), _partial_prefix(dst)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]*?(\.old)?$")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    out = []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            out.append((os.path.join(parent, name), int(m.group(1)), bool(m.group(2))))
    return out


def recover_destination(dst: str) -> None:
    """Put back an old destination a crashed ``--overwrite`` left aside (the rename fallback, or
    the ``.DST.old-*/d`` layout of earlier versions)."""
    if os.path.lexists(dst):
        return
    for path, pid, is_old in _partials(dst):
        if is_old and not _alive(pid):
            os.rename(path, dst)
            return
    parent, legacy = os.path.dirname(dst), f".{os.path.basename(dst)}.old-"
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        kept = os.path.join(parent, name, "d")
        if name.startswith(legacy) and os.path.lexists(kept):
            os.rename(kept, dst)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            return


def remove_stale_partials(dst: str) -> list:
    """Delete the partial directories of ``dst`` whose writer is dead; returns their paths."""
    removed = []
    for path, pid, is_old in _partials(dst):
        if not _alive(pid) and not (is_old and not os.path.lexists(dst)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_partial(dst: str) -> str:
    """A fresh partial directory beside ``dst`` with the permissions ``mkdir`` would give."""
    tmp = tempfile.mkdtemp(prefix=f"{_partial_prefix(dst)}{os.getpid()}-", dir=os.path.dirname(dst))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def atomic_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)
