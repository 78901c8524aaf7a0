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


@pytest.mark.parametrize("options", [dict(max_new_tokens=8, min_new_tokens=7),
                                     dict(max_new_tokens=8, repetition_penalty=3.0)],
                         ids=["min_new_tokens", "repetition_penalty"])
def test_export_bakes_in_the_other_generation_options(captioner, tmp_path, options):
    """Options beyond ``max_new_tokens`` / ``num_beams`` are fixed at export too: the SavedModel's ids equal
    transformers' ``generate`` with the same options (which differ from its ids without them)."""
    import tensorflow as tf
    ref, ours = captioner
    px = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    loaded = tf.saved_model.load(export_captioner(ours, str(tmp_path / "sm"), jit_compile=False, **options))
    got = loaded.serve(tf.constant(px))["sequences"].numpy()
    with torch.no_grad():
        want = ref.generate(pixel_values=torch.tensor(px), **options).numpy()
        plain = ref.generate(pixel_values=torch.tensor(px), max_new_tokens=options["max_new_tokens"]).numpy()
    assert not np.array_equal(want, plain)                       # the option matters on these pixels
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("start", [5, 7])
def test_blip2_t5_export_starts_the_decoder_at_the_option(tmp_path, start):
    """A BLIP-2 T5 captioner exported with ``decoder_start_token_id``: its decoder ids start at that id (not the
    config's, 0) and equal the torch backend's ``generate`` with the same option."""
    import shutil

    import tensorflow as tf

    import backends.torch as bt
    from backends.tf.blip2_export import export_blip2_captioner
    from fixture_utils import fixture
    src, inp, _ = fixture("Blip2Model")          # the T5 fixture: a Blip2Model's weights are the captioner's
    model_dir = str(tmp_path / "model")
    shutil.copytree(src, model_dir)
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    assert config["text_config"].get("decoder_start_token_id", 0) not in (5, 7)
    config["architectures"] = ["Blip2ForConditionalGeneration"]
    with open(os.path.join(model_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    px, ids, mask = inp["pixel_values"], inp["input_ids"], inp["attention_mask"]
    model = B.Blip2ForConditionalGeneration.from_pretrained(model_dir)
    out = export_blip2_captioner(model, str(tmp_path / "sm"), prompt_length=ids.shape[1], max_new_tokens=4,
                                 decoder_start_token_id=start, jit_compile=False)
    loaded = tf.saved_model.load(out)
    got = loaded.serve(pixel_values=tf.constant(px), input_ids=tf.constant(ids.astype(np.int64)),
                       attention_mask=tf.constant(mask.astype(np.int64)))["sequences"].numpy()
    assert (got[:, 0] == start).all()
    with torch.no_grad():
        want = bt.Blip2ForConditionalGeneration.from_pretrained(model_dir).generate(
            pixel_values=torch.tensor(px), input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            max_new_tokens=4, decoder_start_token_id=start).numpy()
    np.testing.assert_array_equal(got, want)
