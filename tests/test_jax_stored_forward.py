"""Forward and feature programs of the JAX backend are stored on disk as generate's are
(``JaxModel._jit`` -> ``_program`` -> ``backends/jax/program_cache.py``).

A new process that finds them traces nothing and compiles nothing, and its numbers are those of a process
without the cache (the jitted method) bit for bit: it runs the same XLA program.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixture_utils import ROOT, require

from blip_core import persistent_cache

require("jax")
import jax  # noqa: E402

import backends.jax._base as jbase  # noqa: E402
from backends.jax import generation, program_cache  # noqa: E402

# The calls of a process (run here and in a child): model(...) of the captioner, BlipModel's image and text
# features, the retrieval model's ITM head.
CALLS = r"""
import numpy as np
import backends.jax as BJ
from hf_configs import blip_dicts
from blip_core.configs import BlipConfig


def calls():
    vc, tc = blip_dicts()
    cfg = BlipConfig(vision_config=vc, text_config=tc, projection_dim=16, image_text_hidden_size=24)
    rng = np.random.default_rng(3)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(5, 90, (2, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    models = dict(captioner=BJ.BlipForConditionalGeneration(cfg, seed=2), model=BJ.BlipModel(cfg, seed=2),
                  retrieval=BJ.BlipForImageTextRetrieval(cfg, seed=2))
    runs = dict(
        captioner=lambda m: m(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids).logits,
        image=lambda m: models["model"].get_image_features(pixel_values=px),
        text=lambda m: models["model"].get_text_features(input_ids=ids, attention_mask=mask),
        itm=lambda m: models["retrieval"](input_ids=ids, pixel_values=px, attention_mask=mask).itm_score)
    owner = dict(captioner="captioner", image="model", text="model", itm="retrieval")
    return models, {name: (lambda run=run, name=name: run(models[owner[name]])) for name, run in runs.items()}


def traces(models):
    return sum(m.trace_count(n) for m in models.values() for n in ("forward", "features"))
"""

CHILD = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
exec({calls!r})
models, runs = calls()
del compiles[:]                  # building the models (random weights) is not the calls
out = {{name: np.asarray(run()).tolist() for name, run in runs.items()}}
print(json.dumps(dict(out=out, traces=traces(models), compiles=len(compiles))))
"""


def _calls():
    scope = {}
    exec(CALLS, scope)
    return scope


def _child(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    env[persistent_cache.ENV] = str(cache_dir)
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), calls=CALLS)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_and_feature_programs_of_a_warm_process_trace_nothing_and_match_the_jitted_path(
        tmp_path, monkeypatch):
    scope = _calls()
    # this process traces, compiles and stores every program in a fresh folder
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    models, runs = scope["calls"]()
    stored = {name: np.asarray(run()) for name, run in runs.items()}
    # one program per call on disk (whether this process traced it now or an earlier test's jitted method
    # of the same config already held the trace: jax keeps traces per function, outside our counters)
    assert len(os.listdir(program_cache.folder())) == len(runs)
    # a new process runs them from disk: no trace, no XLA compile, the same numbers
    warm = _child(tmp_path)
    assert warm["traces"] == 0 and warm["compiles"] == 0
    # the jitted method without the cache (a process with the switch off) gives the same bits
    monkeypatch.setattr(persistent_cache, "_setting", False)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    assert program_cache.folder() is None
    plain = {name: np.asarray(run()) for name, run in runs.items()}
    for name, want in plain.items():
        np.testing.assert_array_equal(stored[name], want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(warm["out"][name], want.dtype), want, err_msg=name)


def test_transforms_of_the_model_still_trace_it(tmp_path, monkeypatch):
    """Under a user's ``jax.grad`` the arguments are tracers: the call is the jitted method, as before
    (traced here by ``jax.eval_shape``, which compiles nothing)."""
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    models, _ = _calls()["calls"]()
    model = models["model"]
    px = np.zeros((1, 3, 32, 32), np.float32)
    before = model.trace_count("features")
    grads = jax.eval_shape(jax.grad(lambda p: model.get_image_features(pixel_values=px, params=p).sum()), model.params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model.params)
    assert model.trace_count("features") == before + 1 and jbase._VARIANTS == {}
    assert os.listdir(program_cache.folder()) == []          # nothing compiled ahead, nothing stored


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2 ** 31 - 1])
def test_the_host_built_prng_key_is_jax_random_key(seed):
    got, want = generation.prng_key(seed), jax.random.key(seed)
    assert jax.typeof(got) == jax.typeof(want)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got)), np.asarray(jax.random.key_data(want)))
