"""The ONNX runner captions in a fresh virtual environment that holds only numpy, tokenizers, pillow and onnxruntime.

``python -m venv --without-pip`` makes the environment; this interpreter's pip installs exactly the
four packages into it (``--no-deps``, the versions installed here, so pip's cache serves them);
only ``blip_core`` and ``blip_runtime`` are copied beside it. The script run there first proves
that torch, tensorflow, jax, flax, transformers and this library's backends cannot be imported,
then captions the bundled held-out pictures with an ONNX bundle of the bundled captioning model.
Its ids must equal the torch backend's ``generate`` here (greedy and beam).
"""
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import numpy as np

from blip_core import to_numpy

from fixture_utils import ROOT, require

require("onnxruntime")
torch = require("torch")

PACKAGES = ("numpy", "tokenizers", "pillow", "onnxruntime")
ABSENT = ("torch", "tensorflow", "jax", "flax", "transformers", "keras", "backends", "converters", "blip_apps",
          "safetensors")

SCRIPT = r"""
import importlib.util, json, os, sys
present = [m for m in %(absent)r if importlib.util.find_spec(m) is not None]
if present:
    raise SystemExit(f"importable in the fresh environment: {present}")
from PIL import Image
from blip_runtime import OnnxBlip
runner = OnnxBlip(sys.argv[1], threads=1)
samples = sys.argv[2]
images = [Image.open(os.path.join(samples, f)).convert("RGB")
          for f in sorted(os.listdir(samples)) if f.endswith(".png")]
px = runner.processor(images=images, return_tensors="np")["pixel_values"]
out = {"greedy": runner.generate(px, max_new_tokens=20).tolist(),
       "beam": runner.generate(px, max_new_tokens=20, num_beams=3).tolist(),
       "captions": runner.caption(images, num_beams=3, max_new_tokens=20),
       "modules": sorted({m.split(".")[0] for m in sys.modules})}
print(json.dumps(out))
"""


def test_runner_in_fresh_venv(tmp_path):
    from PIL import Image

    from backends.torch import BlipForConditionalGeneration
    from backends.torch.onnx_export import export_onnx
    model_dir = os.path.join(ROOT, "blip_apps", "models", "caption")
    samples = os.path.join(ROOT, "blip_apps", "assets", "samples")
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    bundle = export_onnx(model, tmp_path / "bundle", processor_dir=model_dir)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pins = [f"{p}=={version(p)}" for p in PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "-q", *pins], check=True)
    src = tmp_path / "src"
    for pkg in ("blip_core", "blip_runtime"):
        shutil.copytree(os.path.join(ROOT, pkg), src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(src), "HOME": str(tmp_path)}
    script = SCRIPT % {"absent": ABSENT}
    run = subprocess.run([python, "-c", script, str(bundle), samples], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert not set(out["modules"]) & set(ABSENT)

    images = [Image.open(os.path.join(samples, f)).convert("RGB") for f in sorted(os.listdir(samples))
              if f.endswith(".png")]
    from blip_core.processing import BlipProcessor
    px = BlipProcessor.from_pretrained(model_dir)(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(np.array(out["greedy"]), to_numpy(model.generate(pixel_values=px, max_new_tokens=20)))
    beam = to_numpy(model.generate(pixel_values=px, max_new_tokens=20, num_beams=3))
    np.testing.assert_array_equal(np.array(out["beam"]), beam)
    assert out["captions"] == BlipProcessor.from_pretrained(model_dir).batch_decode(beam, skip_special_tokens=True)
