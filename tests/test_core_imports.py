"""The spec layer imports nothing above it and no framework: `blip_core` stays at the bottom.

Two checks: every source file is read with `ast` (plain and relative imports, `importlib` /
`__import__` calls and the names they are given, `exec` of source text), and `import blip_core`
with its submodules runs with those packages blocked.
"""
import ast
import os
import subprocess
import sys

import pytest

from fixture_utils import ROOT

FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "transformers", "keras", "tf_keras")
ABOVE = ("backends", "converters", "benchmarks", "blip_apps", "blip_reference")
FORBIDDEN = FRAMEWORKS + ABOVE
CORE = os.path.join(ROOT, "blip_core")

# Calls that import a module named by a string (the last part of the called name).
IMPORT_HELPERS = {"import_module", "__import__", "find_spec", "find_loader", "load_module", "resolve_name",
                  "run_module", "import_string"}
SOURCE_RUNNERS = {"exec", "eval", "compile"}


def _dotted(node) -> str:
    """``a.b.c`` of a Name / Attribute chain, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _literal_prefix(node):
    """The text a string expression starts with when it is known before running (None if not)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):          # f"backends.{name}.arrays" -> "backends."
        text = ""
        for part in node.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            text += part.value
        return text or None
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):   # "backends." + name
        return _literal_prefix(node.left)
    return None


def _forbidden(module: str) -> bool:
    return module.split(".")[0] in FORBIDDEN


def violations(source: str, filename: str = "<source>") -> list:
    """``["file:line: what"]`` for every way ``source`` reaches a forbidden package."""
    tree = ast.parse(source, filename)
    helpers, runners = set(IMPORT_HELPERS), SOURCE_RUNNERS
    for node in ast.walk(tree):                  # `from importlib import import_module as im` makes `im` a helper
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                if alias.name in IMPORT_HELPERS:
                    helpers.add(alias.asname or alias.name)
    found = []

    def flag(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _forbidden(alias.name):
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _forbidden(node.module):
            flag(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func).rsplit(".", 1)[-1]
            args = list(node.args) + [k.value for k in node.keywords]
            if name in helpers:
                for arg in args[:1] + [k.value for k in node.keywords if k.arg in ("name", "package")]:
                    text = _literal_prefix(arg)
                    if text is None:
                        flag(node, f"{name}() of a module name computed at run time")
                    elif _forbidden(text):
                        flag(node, f"{name}({text!r}...)")
            elif isinstance(node.func, ast.Name) and node.func.id in runners and args:   # not re.compile
                text = _literal_prefix(args[0])
                if text is None or not isinstance(args[0], ast.Constant):
                    flag(node, f"{name}() of source text built at run time")
                else:
                    found.extend(violations(text, f"{filename}:{node.lineno}:{name}"))
    return found


def core_sources():
    for folder, _, files in os.walk(CORE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_blip_core_source_imports_nothing_above_it():
    files = list(core_sources())
    assert len(files) > 20                       # the walk found the package
    found = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            found += violations(fh.read(), os.path.relpath(path, ROOT))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source", [
    "import torch",
    "import numpy, tensorflow.keras as k",
    "from jax import numpy",
    "from flax.linen import Dense",
    "import transformers.models.blip",
    "from backends.torch import arrays",
    "import converters.cli",
    "from benchmarks import common",
    "from blip_apps import load",
    "import importlib\nimportlib.import_module('backends.jax')",
    "import importlib\nm = importlib.import_module(name='converters.cli')",
    "import importlib\nimportlib.import_module(f'backends.{b}.arrays')",
    "import importlib\nimportlib.import_module('backends.' + b)",
    "import importlib\nimportlib.import_module(MODULES[b])",
    "from importlib import import_module as im\nim('blip_apps.cli')",
    "__import__('jax')",
    "import importlib.util\nimportlib.util.find_spec('torch')",
    "exec('import tensorflow')",
    "exec(code)",
    "eval(compile('import jax', 'f', 'exec'))",
])
def test_the_scan_catches(source):
    assert violations(source)


@pytest.mark.parametrize("source", [
    "import numpy as np\nfrom . import configs\nfrom .weights import spec",
    "from ..registry import BACKENDS",
    "x = 'torch'\nname = 'backends.torch'",               # a string no import helper receives
    "import importlib\nimportlib.import_module('json')",
    "raise ValueError('import backends.torch first')",
    "import re\npattern = re.compile(r'\\.(\\d+)')\nmodel.eval()",
])
def test_the_scan_accepts(source):
    assert violations(source) == []


SCRIPT = r"""
import importlib, importlib.abc, sys
FORBIDDEN = %r
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("blocked import of " + name)
sys.meta_path.insert(0, Block())
import numpy as np
import pkgutil, blip_core
mods = [m.name for m in pkgutil.walk_packages(blip_core.__path__, "blip_core.")]
for m in mods:
    importlib.import_module(m)
from blip_core.processing import BlipImageProcessor
image = np.zeros((8, 8, 3), np.uint8)
assert BlipImageProcessor(size=8)(image, return_tensors="np")["pixel_values"].shape == (1, 3, 8, 8)
for kind, backend in (("pt", "torch"), ("tf", "tf"), ("jax", "jax")):
    try:
        BlipImageProcessor(size=8)(image, return_tensors=kind)
    except ValueError as exc:
        assert f"import backends.{backend} first" in str(exc), exc
    else:
        raise AssertionError(kind + " made tensors with no backend imported")
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
assert not loaded, loaded
print("OK", len(mods))
"""


def test_blip_core_imports_no_framework():
    out = subprocess.run([sys.executable, "-c", SCRIPT % (FORBIDDEN,)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


def test_load_lives_in_blip_apps():
    import blip_apps
    import blip_core
    assert callable(blip_apps.load) and not hasattr(blip_core, "load")
    with pytest.raises(AttributeError, match="blip_apps.load"):
        blip_core.load
