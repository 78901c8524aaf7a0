"""`import blip_core` (and its submodules) loads no framework and no transformers."""
import subprocess
import sys

FORBIDDEN = ("torch", "tensorflow", "jax", "flax", "transformers", "keras", "tf_keras")

SCRIPT = r"""
import importlib.abc, sys
FORBIDDEN = %r
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("blocked import of " + name)
sys.meta_path.insert(0, Block())
import pkgutil, blip_core
mods = [m.name for m in pkgutil.walk_packages(blip_core.__path__, "blip_core.")]
for m in mods:
    importlib.import_module(m)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
assert not loaded, loaded
print("OK", len(mods))
"""


def test_blip_core_imports_no_framework():
    out = subprocess.run([sys.executable, "-c", SCRIPT % (FORBIDDEN,)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")
