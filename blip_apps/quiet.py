"""Keep a framework's C++ start-up lines off the command line's stderr.

TensorFlow 2.21 writes notes to the process's stderr (file descriptor 2) while it is imported: "oneDNN custom
operations are on", "Could not find cuda drivers", twice each, with an absl warning before them. They come from C++
code that ignores ``TF_CPP_MIN_LOG_LEVEL`` since TensorFlow 2.19 (tensorflow/tensorflow#100442), so the only way to
keep them out of ``blip caption``'s output is to point descriptor 2 elsewhere while the import runs.

``quiet_import(name)`` arranges that for the first import of module ``name`` in this process, wherever it happens
(a model load, a conversion, the demo): a finder at the head of ``sys.meta_path`` hands the import to the usual
loader with descriptor 2 sent to a temporary file, then restores it. What the import wrote is dropped when it
succeeds and written back to stderr when it fails, before its error. Only the command line installs it: a program
that imports the library keeps its own stderr as it is.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile


class _QuietLoader(importlib.abc.Loader):
    """The module's own loader, its ``exec_module`` run with descriptor 2 on a temporary file (the rest passed
    through)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _flush()
        try:
            saved = os.dup(2)
        except OSError:           # no descriptor 2 (``2>&-``): nothing to keep clean
            self._loader.exec_module(module)
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                self._loader.exec_module(module)
            except BaseException:
                _flush()
                os.dup2(saved, 2)
                sink.seek(0)
                os.write(2, sink.read())      # what the framework said may explain its failure
                raise
            finally:
                _flush()
                os.dup2(saved, 2)
                os.close(saved)


def _flush():
    """Python's own buffered stderr out first (there is none when the process started without descriptor 2)."""
    if sys.stderr is not None:
        sys.stderr.flush()


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` as the other finders do, with its loader wrapped; removes itself after the first use."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_import(name: str) -> None:
    """Run the first import of top-level module ``name`` in this process with stderr aside (see the module)."""
    if name in sys.modules or any(isinstance(f, _QuietFinder) and f.name == name for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder(name))
