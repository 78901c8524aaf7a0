"""Compiled generation programs of the XLA backends (tf, jax): shape buckets, the bounded in-memory
cache, and the persistent on-disk cache with its switch (``blip_core.cache``,
``blip_core.persistent_cache``).

Ids of a bucketed call (batch and ``max_new_tokens`` rounded up, extra rows and steps masked and
trimmed) must equal the unbucketed call's and backends.torch's (eager, never padded). Counts of
compiled programs are checked, never times.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixture_utils import ROOT, require
from hf_configs import OPT_TEXT, blip_dicts

from blip_core import cache, decoding, persistent_cache
from blip_core.configs import Blip2Config, BlipConfig

require("tensorflow")
require("jax")
require("torch")
import backends.jax as BJ  # noqa: E402
import backends.jax._base as jbase  # noqa: E402
import backends.tf as BTF  # noqa: E402
import backends.torch as BT  # noqa: E402

BACKENDS = {"torch": BT, "tf": BTF, "jax": BJ}


# -- the rules (spec layer) -----------------------------------------------------------------------------
def test_bucket_rules():
    assert [cache.batch_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 33, 64, 65, 130)] == \
        [0, 1, 2, 4, 8, 8, 16, 64, 64, 128, 192]
    assert [cache.new_tokens_bucket(n) for n in (1, 8, 9, 20, 30, 33, 200, 513, 600)] == \
        [8, 8, 16, 24, 32, 48, 256, 1024, 1024]
    assert cache.new_tokens_bucket(20, limit=22) == 22 and cache.new_tokens_bucket(20, limit=5) == 20
    np.testing.assert_array_equal(cache.padding_rows(3, 4), [0, 1, 2, 0])
    np.testing.assert_array_equal(cache.padding_rows(2, 2), [0, 1])


def test_bucketed_plan_keeps_the_real_limits():
    from blip_core.generation import resolve_generation
    s = resolve_generation(1, max_new_tokens=20, num_beams=3, length_penalty=0.5, eos_token_id=2,
                           early_stopping="never")
    plan, numbers = decoding.make_plan(s, 50)
    bplan, bnum, padded = decoding.bucketed_plan(s, 50, batch=3)
    assert (plan.max_new_tokens, bplan.max_new_tokens, padded) == (20, 24, 4)
    assert int(bnum["limit"]) == int(numbers["limit"]) == 21 and int(bnum["rows"]) == 3
    np.testing.assert_array_equal(bnum["lp_table"][:21], numbers["lp_table"])
    np.testing.assert_array_equal(bnum["heuristic_table"][:21], numbers["heuristic_table"])
    assert bplan == plan.__class__(**{**plan.__dict__, "max_new_tokens": 24})


# -- ids with and without buckets ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioners():
    vc, tc = blip_dicts()
    cfg = BlipConfig(vision_config=vc, text_config=tc, projection_dim=16, image_text_hidden_size=24)
    return {name: mod.BlipForConditionalGeneration(cfg, seed=3) for name, mod in BACKENDS.items()}


def _unbucketed(monkeypatch):
    monkeypatch.setattr(decoding, "batch_bucket", lambda n: n)
    monkeypatch.setattr(decoding, "new_tokens_bucket", lambda n, limit=None: n)


def _ids(model, px, **kw):
    return np.asarray(model.generate(pixel_values=px, **kw))


CALLS = [pytest.param(dict(max_new_tokens=5), id="greedy"),
         pytest.param(dict(max_new_tokens=7, min_new_tokens=7, num_beams=3, num_return_sequences=2), id="beam",
                      marks=pytest.mark.slow)]


@pytest.mark.parametrize("kw", CALLS)
def test_bucketed_ids_equal_unbucketed_and_torch(captioners, monkeypatch, kw):
    """Batch 3 runs in the batch-4 program, 5 (7) new tokens in the 8-token one: same ids."""
    px = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = _ids(captioners["torch"], px, **kw)
    bucketed = {b: _ids(captioners[b], px, **kw) for b in ("tf", "jax")}
    _unbucketed(monkeypatch)
    for b in ("tf", "jax"):
        np.testing.assert_array_equal(bucketed[b], want, err_msg=b)
        np.testing.assert_array_equal(_ids(captioners[b], px, **kw), want, err_msg=f"{b} unbucketed")


@pytest.mark.slow
def test_bucketed_scores_cover_the_real_rows_and_steps(captioners):
    px = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    kw = dict(max_new_tokens=4, num_beams=2, output_scores=True, return_dict_in_generate=True)
    want = captioners["torch"].generate(pixel_values=px, **kw)
    for b in ("tf", "jax"):
        got = captioners[b].generate(pixel_values=px, **kw)
        np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy(), err_msg=b)
        assert len(got.scores) == len(want.scores)
        assert [tuple(np.shape(s)) for s in got.scores] == [tuple(s.shape) for s in want.scores]
        np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(), rtol=1e-4,
                                   atol=1e-5)


# -- the bounded cache ---------------------------------------------------------------------------------
def _jax_programs():
    return sum(fn._cache_size() for lru in jbase._VARIANTS.values() for fn in lru.values())


@pytest.mark.slow
def test_many_settings_keep_the_program_count_bounded(captioners, monkeypatch):
    """Five settings over four buckets with room for two programs: never more than two programs, and a
    setting of a cached bucket compiles nothing new."""
    from backends.tf.generation import trace_count
    monkeypatch.setattr(jbase, "COMPILE_CACHE_SIZE", 2)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    tf_model, jax_model = captioners["tf"], captioners["jax"]
    monkeypatch.setattr(tf_model, "_compiled", cache.LRU(2))
    px = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
    settings = [(1, 3), (1, 8), (2, 9), (3, 4), (2, 16)]      # buckets (1, 8) twice, (2, 16), (4, 8), (2, 16)
    for batch, new in settings:
        for model in (tf_model, jax_model):
            model.generate(pixel_values=px[:batch], max_new_tokens=new)
        assert len(tf_model._compiled) <= 2 and all(fn.experimental_get_tracing_count() == 1
                                                    for fn in tf_model._compiled.values())
        assert _jax_programs() <= 2 and sum(len(v) for v in jbase._VARIANTS.values()) <= 2
    before = (trace_count(tf_model), _jax_programs(), jax_model.trace_count("generate"))
    for model in (tf_model, jax_model):     # batch 4 and 6 new tokens: the cached (4, 8) program
        model.generate(pixel_values=px[:4], max_new_tokens=6)
    assert (trace_count(tf_model), _jax_programs(), jax_model.trace_count("generate")) == before


@pytest.mark.slow
def test_blip2_generate_is_keyed_by_shapes_into_the_bounded_cache(monkeypatch):
    """BLIP-2's generate programs go through the same LRU: one program per entry, batch buckets shared."""
    vc, _ = blip_dicts()
    qc = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              cross_attention_frequency=1, max_position_embeddings=40)
    cfg = Blip2Config(vision_config=vc, qformer_config=qc, text_config=dict(OPT_TEXT), num_query_tokens=4)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    px = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ids = np.array([[2, 5, 6], [2, 7, 8], [2, 9, 10], [2, 11, 12]])
    torch_model = BT.Blip2ForConditionalGeneration(cfg, seed=1).eval()   # a random OPT config has dropout
    for name in ("tf", "jax"):
        model = BACKENDS[name].Blip2ForConditionalGeneration(cfg, seed=1)
        for batch in (3, 4, 2):           # buckets 4, 4, 2
            got = np.asarray(model.generate(pixel_values=px[:batch], input_ids=ids[:batch], max_new_tokens=3))
            want = torch_model.generate(pixel_values=px[:batch], input_ids=ids[:batch], max_new_tokens=3).numpy()
            np.testing.assert_array_equal(got, want, err_msg=name)
        if name == "tf":
            assert len(model._compiled) == 2
            assert all(fn.experimental_get_tracing_count() == 1 for fn in model._compiled.values())
        else:
            lru = [v for k, v in jbase._VARIANTS.items() if k[:2] == ("Blip2ForConditionalGeneration", "generate")]
            assert [len(v) for v in lru] == [2] and _jax_programs() == 2


# -- the persistent cache and its switch ---------------------------------------------------------------
def test_cache_folder_policy(monkeypatch, tmp_path):
    monkeypatch.setattr(persistent_cache, "_setting", None)
    monkeypatch.delenv(persistent_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert persistent_cache.root() == str(tmp_path / "xdg" / "blip" / "xla")
    path = persistent_cache.cache_dir("jax", "1.2")
    assert path == str(tmp_path / "xdg" / "blip" / "xla" / "jax-1.2") and os.path.isdir(path)
    assert os.stat(path).st_mode & 0o077 == 0
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(persistent_cache.ENV, off)
        assert persistent_cache.root() is None and persistent_cache.cache_dir("tf", "2") is None
    monkeypatch.setenv(persistent_cache.ENV, str(tmp_path / "mine"))
    assert persistent_cache.root() == str(tmp_path / "mine")
    persistent_cache.set_persistent_cache(False)
    assert persistent_cache.root() is None
    persistent_cache.set_persistent_cache(tmp_path / "other")
    assert persistent_cache.root() == str(tmp_path / "other")
    with pytest.raises(TypeError):
        persistent_cache.set_persistent_cache(3)
    persistent_cache.set_persistent_cache(None)
    assert persistent_cache.clear_persistent_cache() == str(tmp_path / "mine")


def test_tf_keeps_a_cache_directory_the_caller_chose(monkeypatch):
    from backends.tf import xla_cache
    monkeypatch.setattr(xla_cache, "_APPLIED", {})
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/elsewhere")
    assert xla_cache.apply_persistent_cache() is None
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/elsewhere"


@pytest.mark.parametrize("flags", ["--tf_xla_auto_jit=2", "--tf_xla_auto_jit=2 --tf_xla_min_cluster_size=4"])
def test_tf_adds_its_cache_directory_to_the_callers_other_flags(monkeypatch, tmp_path, flags):
    """TF_XLA_FLAGS with other flags than the cache directory's: the cache folder is appended, the caller's
    flags all stay, and a second call changes nothing (once per process)."""
    from backends.tf import xla_cache
    monkeypatch.setattr(xla_cache, "_APPLIED", {})
    monkeypatch.setattr(persistent_cache, "_setting", None)
    monkeypatch.setenv(persistent_cache.ENV, str(tmp_path))
    monkeypatch.setenv("TF_XLA_FLAGS", flags)
    path = xla_cache.apply_persistent_cache()
    assert path is not None and path.startswith(str(tmp_path)) and os.path.isdir(path)
    assert os.environ["TF_XLA_FLAGS"].split() == flags.split() + [f"--tf_xla_persistent_cache_directory={path}"]
    assert xla_cache.apply_persistent_cache() == path
    assert os.environ["TF_XLA_FLAGS"].split() == flags.split() + [f"--tf_xla_persistent_cache_directory={path}"]


CHILD = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, {root!r})
from hf_configs import blip_dicts
from blip_core.configs import BlipConfig
import backends.tf as BTF
import backends.jax as BJ
import backends.jax._base as jbase
import jax
if jbase.apply_persistent_cache():   # the policy is under test, not jax's time threshold
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
vc, tc = blip_dicts()
cfg = BlipConfig(vision_config=vc, text_config=tc)
px = np.zeros((1, 3, 32, 32), np.float32)
for mod in (BTF, BJ):
    mod.BlipForConditionalGeneration(cfg).generate(pixel_values=px, max_new_tokens=2)
print(json.dumps(os.environ.get("TF_XLA_FLAGS", "")))
"""


def _run_child(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", persistent_cache.ENV)}
    full.update(XDG_CACHE_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3", **env)
    code = CHILD.format(root=os.path.join(ROOT, "tests"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = {}
    for top, _, names in os.walk(tmp_path):
        for n in names:
            files.setdefault(os.path.relpath(top, tmp_path).split(os.sep)[2] if top != str(tmp_path) else "", []
                             ).append(n)
    return files, json.loads(out.stdout.strip().splitlines()[-1])


def test_persistent_cache_on_by_default_and_off_by_switch(tmp_path):
    """A new process writes its compiled programs under $XDG_CACHE_HOME/blip/xla/<framework>-<version>;
    with BLIP_COMPILE_CACHE=0 it writes nothing and leaves TF's flags alone."""
    files, flags = _run_child(tmp_path / "on")
    kinds = {k.split("-")[0] for k, v in files.items() if v}
    assert kinds == {"jax", "tf"}, files
    assert any(n.endswith("XLA_CPU_JIT.pb") for n in files[next(k for k in files if k.startswith("tf-"))])
    assert "--tf_xla_persistent_cache_directory=" + str(tmp_path / "on" / "blip" / "xla") in flags
    files, flags = _run_child(tmp_path / "off", **{persistent_cache.ENV: "0"})
    assert files == {} and "persistent_cache" not in flags
