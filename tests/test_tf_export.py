"""SavedModel export of a TF BLIP captioner: loads with plain ``tf.saved_model.load`` in a process
that cannot import this library, and its captions equal ``model.generate``'s (and transformers')."""
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import backends.tf as B
from backends.tf.export import export_captioner

from fixture_utils import require
transformers = require("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_configs import blip_config  # noqa: E402

SEP = 97
# Runs with ``python -S`` (no .pth files, so no editable install of this repository), cwd outside
# the repository and only site-packages on the path: TensorFlow and numpy, not this library.
LOADER = """
import json, os, sys
sys.path.extend(sys.argv[1].split(os.pathsep))
import numpy as np
import tensorflow as tf
found = []
for name in ("blip_core", "backends"):
    try:
        __import__(name)
        found.append(name)
    except ImportError:
        pass
data = np.load(sys.argv[2])
out = {"importable": found}
for name in sys.argv[3:]:
    model = tf.saved_model.load(name)
    keys = ("three", "one") if "greedy" in name else ("three",)   # a second batch size: another compile
    out[name] = [model.serve(tf.constant(data[k]))["sequences"].numpy().tolist() for k in keys]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    torch.manual_seed(0)
    cfg = blip_config(vision=dict(initializer_range=0.2), text=dict(initializer_range=0.2), initializer_range=0.2)
    ref = transformers.BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ref.text_decoder.cls.predictions.bias[SEP] += 0.3
    d = str(tmp_path_factory.mktemp("cap"))
    ref.save_pretrained(d)
    return ref, B.BlipForConditionalGeneration.from_pretrained(d)


def test_saved_model_runs_without_the_library(captioner, tmp_path):
    ref, ours = captioner
    rng = np.random.default_rng(0)
    three = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    one = three[1:2]
    settings = {"greedy": dict(max_new_tokens=10), "beam": dict(max_new_tokens=10, num_beams=3)}
    dirs = {}
    for name, kw in settings.items():
        dirs[name] = export_captioner(ours, str(tmp_path / name), **kw)
    np.savez(tmp_path / "px.npz", three=three, one=one)
    outside = tmp_path / "outside"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    site = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    r = subprocess.run([sys.executable, "-S", "-c", LOADER, site, str(tmp_path / "px.npz"), *dirs.values()],
                       cwd=str(outside), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["importable"] == []          # the SavedModel needs nothing from this repository
    for name, kw in settings.items():
        got = np.array(result[dirs[name]][0])
        assert np.array_equal(got, ours.generate(pixel_values=three, **kw).numpy()), name
        with torch.no_grad():
            want = ref.generate(pixel_values=torch.tensor(three), **kw).numpy()
        assert np.array_equal(got, want), name
    # the batch dimension is dynamic (checked against transformers to spare one more compile here)
    with torch.no_grad():
        want = ref.generate(pixel_values=torch.tensor(one), **settings["greedy"]).numpy()
    assert np.array_equal(np.array(result[dirs["greedy"]][1]), want)


def test_export_refuses_other_models(captioner, tmp_path):
    from blip_core.configs import config_from_dict
    vqa = B.BlipForQuestionAnswering(config_from_dict(blip_config().to_dict()), seed=0)
    with pytest.raises(ValueError, match="BlipForConditionalGeneration"):
        export_captioner(vqa, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="seed"):
        export_captioner(captioner[1], str(tmp_path / "y"), do_sample=True)
