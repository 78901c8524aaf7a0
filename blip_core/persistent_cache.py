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
that took at least ``MIN_COMPILE_SECONDS`` to compile; TensorFlow writes every XLA program. Neither
framework bounds the folder's size: delete it (``clear_persistent_cache()``) to reclaim the space.
What no cache removes is tracing: the framework still runs the Python of the model once per
process to find which program it needs, before it can look the program up.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Optional, Union

ENV = "BLIP_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.2        # jax: faster compiles are not worth a file
_OFF = {"0", "off", "false", "no"}
_setting: Union[None, bool, str] = None     # set_persistent_cache's value; None: the environment decides


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
        setting = False if value.lower() in _OFF else (value or True)
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
