"""Stored compiled programs of the JAX backend (``backends/jax/program_cache.py``) and the folder's upkeep
(``blip_core.persistent_cache``: entry files, size bound, ``blip cache``).

A process that finds its generate program on disk must not trace the model, and must give the ids and
scores of a process without the cache (bit for bit: it runs the same XLA program), which give backends.torch's
ids. A missing, damaged or foreign entry, or another key, means tracing again, never a crash.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fixture_utils import ROOT, require
from hf_configs import core_blip_config, tiny_pixels

from blip_core import persistent_cache

require("jax")
require("torch")
import backends.jax as BJ  # noqa: E402
import backends.jax._base as jbase  # noqa: E402
import backends.torch as BT  # noqa: E402
from backends.jax import program_cache  # noqa: E402

CALL = dict(max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
_config, _pixels = core_blip_config, tiny_pixels


CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from hf_configs import core_blip_config, tiny_pixels
import threading
import jax
import backends.jax as BJ
from backends.jax import program_cache
loads, load_file = [], program_cache._load_file     # which threads read a program file (the preload's: ahead)
program_cache._load_file = lambda top, name: loads.append(threading.current_thread().name) or load_file(top, name)
compiles = []                    # XLA compiles of this process's first generate (none when its program is stored)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
cfg, px = core_blip_config(), tiny_pixels()     # _config() and _pixels() of the test module
model = BJ.BlipForConditionalGeneration(cfg, seed=5)
del compiles[:]                  # building the model (random weights) is not the call
out = model.generate(pixel_values=px, **{call!r})
print(json.dumps(dict(ids=np.asarray(out.sequences).tolist(), scores=[np.asarray(s).tolist() for s in out.scores],
                      traces=model.trace_count("generate"), compiles=len(compiles), loads=loads)))
"""


def _child(cache_dir, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    env.update({persistent_cache.ENV: str(cache_dir)}, **extra_env)
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), call=CALL)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generate(model):
    return model.generate(pixel_values=_pixels(), **CALL)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A cache folder holding the program of ``_generate``, traced and compiled once by this process."""
    folder = tmp_path_factory.mktemp("programs")
    saved = persistent_cache._setting, dict(jbase._VARIANTS)
    persistent_cache._setting = str(folder)
    jbase._VARIANTS.clear()
    try:
        model = BJ.BlipForConditionalGeneration(_config(), seed=5)
        traces = model.trace_count("generate")
        out = _generate(model)
        assert model.trace_count("generate") == traces + 1
        [name] = os.listdir(program_cache.folder())
    finally:
        persistent_cache._setting = saved[0]
        jbase._VARIANTS.clear()
        jbase._VARIANTS.update(saved[1])
    return dict(folder=folder, out=out, name=name)


@pytest.fixture
def fresh(stored, monkeypatch, tmp_path):
    """A copy of the stored folder as the cache, and no program in memory: each generate finds its program
    on disk or traces."""
    shutil.copytree(stored["folder"], tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    return tmp_path


def _entries(tmp_path):
    top = program_cache.folder()
    assert top is not None and top.startswith(str(tmp_path))
    return sorted(os.path.join(top, n) for n in os.listdir(top))


def _same(got, want):
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
    assert len(got.scores) == len(want.scores)
    for g, w in zip(got.scores, want.scores):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))      # the same program: bit for bit


def test_a_new_process_runs_the_stored_program_without_tracing(stored, monkeypatch):
    warm = _child(stored["folder"])
    assert warm["traces"] == 0
    assert warm["loads"] == ["blip-jax-preload"]      # loaded while the model was built (``preload``), only there
    assert warm["compiles"] == 0      # nor any small eager program (inputs, PRNG key, trimming the output)
    assert warm["ids"] == np.asarray(stored["out"].sequences).tolist()
    assert warm["scores"] == [np.asarray(s).tolist() for s in stored["out"].scores]
    # ... the numbers of a process without the cache (the switch off: jitted, nothing stored), torch's ids
    monkeypatch.setattr(persistent_cache, "_setting", False)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    assert program_cache.folder() is None
    plain = _generate(BJ.BlipForConditionalGeneration(_config(), seed=5))
    assert not any(isinstance(f, program_cache.StoredProgram) for lru in jbase._VARIANTS.values() for f in lru.values())
    assert np.asarray(plain.sequences).tolist() == warm["ids"]
    assert [np.asarray(s).tolist() for s in plain.scores] == warm["scores"]
    torch_ids = BT.BlipForConditionalGeneration(_config(), seed=5).eval().generate(pixel_values=_pixels(),
                                                                                  max_new_tokens=5)
    assert torch_ids.numpy().tolist() == warm["ids"]


def test_a_one_device_program_stored_where_several_devices_are_seen_loads_onto_that_device(stored, tmp_path):
    """jax's loader places an executable on every device of the backend unless told: a one-device program
    read back in a process seeing four host devices expected four shards and failed (CI, stop 25)."""
    four = dict(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    first, warm = _child(tmp_path, **four), _child(tmp_path, **four)
    assert (first["traces"], warm["traces"]) == (1, 0) and warm["compiles"] == 0
    assert (first["loads"], warm["loads"]) == (["MainThread"], ["blip-jax-preload"])   # nothing noted, then noted
    want = np.asarray(stored["out"].sequences).tolist()
    assert first["ids"] == warm["ids"] == want
    assert warm["scores"] == first["scores"]


def test_damaged_or_foreign_entries_are_traced_again(stored, fresh):
    [entry] = _entries(fresh)
    name = os.path.basename(entry)
    data = open(entry, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "flipped": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:],
               "another entry's": data.replace(name.encode(), b"0" * len(name), 1)}
    for why, content in damaged.items():
        with open(entry, "wb") as f:
            f.write(content)
        assert program_cache.load(name) is None and not os.path.exists(entry), why     # refused and deleted
    persistent_cache.write_atomic(entry, program_cache.MAGIC, name, b"not a program")  # whole, not loadable
    assert program_cache.load(name) is None
    with open(entry, "wb") as f:       # end to end: a truncated entry is traced again, rewritten, read back
        f.write(data[:1000])
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    traces = model.trace_count("generate")
    _same(_generate(model), stored["out"])
    assert model.trace_count("generate") == traces + 1
    assert persistent_cache.read_checked(entry, program_cache.MAGIC, name) is not None
    jbase._VARIANTS.clear()
    _same(_generate(model), stored["out"])
    assert model.trace_count("generate") == traces + 1


def test_another_key_is_another_program(stored, fresh, monkeypatch):
    model = BJ.BlipForConditionalGeneration(_config(), seed=9)        # other weights, same program
    traces = model.trace_count("generate")
    want = _generate(model)
    assert model.trace_count("generate") == traces and len(_entries(fresh)) == 1
    key = ("BlipForConditionalGeneration", "generate", repr(model.config), "float32")
    args = (model.params, np.zeros((1, 3, 32, 32), np.float32))
    base = program_cache.program_key(key, args, dict(plan=1))
    assert program_cache.program_key(key, args, dict(plan=1)) == base
    assert program_cache.program_key(key, args, dict(plan=2)) != base
    assert program_cache.program_key(key[:3] + ("bfloat16",), args, dict(plan=1)) != base
    assert program_cache.program_key(key, (model.params, np.zeros((2, 3, 32, 32), np.float32)), dict(plan=1)) != base
    monkeypatch.setattr(persistent_cache, "source_fingerprint", lambda folders: "edited sources")
    assert program_cache.program_key(key, args, dict(plan=1)) != base
    jbase._VARIANTS.clear()
    _same(_generate(model), want)
    assert model.trace_count("generate") == traces + 1 and len(_entries(fresh)) == 2


@pytest.mark.parametrize("change", [("env", "XLA_FLAGS", "--xla_cpu_enable_fast_math=true"),
                                    ("env", "XLA_FLAGS", "--xla_backend_optimization_level=1"),
                                    ("jax", "jax_default_matmul_precision", "highest"),
                                    ("jax", "jax_numpy_rank_promotion", "raise")])
def test_the_key_names_the_compiler_flags_and_jaxs_numeric_flags(monkeypatch, change):
    """XLA_FLAGS and jax's numeric flags change the compiled code, so each is part of a program's key (the
    module's rule): a process with another value gets another key, one with the same values the same key."""
    import jax
    key = ("BlipVisionModel", "forward", "config", "float32")
    args = (np.zeros((1, 3, 8, 8), np.float32),)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    base = program_cache.program_key(key, args, {})
    kind, name, value = change
    if kind == "env":
        monkeypatch.setenv(name, value)
        changed = program_cache.program_key(key, args, {})
        monkeypatch.delenv(name)
    else:
        old = getattr(jax.config, name)
        jax.config.update(name, value)
        try:
            changed = program_cache.program_key(key, args, {})
        finally:
            jax.config.update(name, old)
    assert changed != base
    assert program_cache.program_key(key, args, {}) == base


@pytest.fixture
def preloads(monkeypatch):
    """This process's preload bookkeeping, empty (a model preloads once per process and folder)."""
    for name, value in (("_PRELOADS", {}), ("_PRELOADED", set()), ("_NOTED", set())):
        monkeypatch.setattr(program_cache, name, value)


def test_a_model_preloads_the_program_its_last_process_ran_first(stored, fresh, preloads):
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    [(top, name)] = program_cache._PRELOADS                  # the note the tracing process wrote
    assert (top, name) == (program_cache.folder(), stored["name"])
    traces = model.trace_count("generate")
    _same(_generate(model), stored["out"])
    assert program_cache._PRELOADS == {} and model.trace_count("generate") == traces


def test_a_call_with_other_options_leaves_the_preloaded_program(stored, fresh, preloads):
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    traces = model.trace_count("generate")
    model.generate(pixel_values=_pixels(), max_new_tokens=3)         # another program: traced, not the preloaded
    assert model.trace_count("generate") == traces + 1 and len(program_cache._PRELOADS) == 1
    [note] = os.listdir(program_cache._first_folder())
    BJ.BlipForConditionalGeneration(_config(), seed=5)
    assert len(program_cache._PRELOADS) == 1                        # once per process and model
    _same(_generate(model), stored["out"])                          # the preloaded one, untraced
    assert program_cache._PRELOADS == {} and model.trace_count("generate") == traces + 1
    noted = persistent_cache.read_entry(program_cache._first_folder(), note, program_cache.FIRST_MAGIC)
    assert noted != stored["name"].encode() and len(noted) == 64        # this process ran the other one first


def test_a_damaged_note_or_program_is_loaded_or_traced_on_the_call(stored, fresh, preloads):
    [note] = os.listdir(program_cache._first_folder())
    path = os.path.join(program_cache._first_folder(), note)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-1])
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    assert program_cache._PRELOADS == {} and not os.path.exists(path)  # refused (and deleted), nothing preloaded
    traces = model.trace_count("generate")
    _same(_generate(model), stored["out"])
    assert model.trace_count("generate") == traces and os.path.exists(path)     # loaded on the call, noted again
    [entry] = _entries(fresh)
    with open(entry, "r+b") as f:                                  # the program itself damaged: the preload
        f.truncate(1000)                                           # finds nothing, the call traces
    for name in ("_PRELOADED", "_NOTED"):
        getattr(program_cache, name).clear()
    jbase._VARIANTS.clear()
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    assert len(program_cache._PRELOADS) == 1
    _same(_generate(model), stored["out"])
    assert model.trace_count("generate") == traces + 1 and program_cache._PRELOADS == {}


def test_nothing_is_preloaded_or_noted_with_the_cache_off(stored, tmp_path, monkeypatch, preloads):
    monkeypatch.setattr(persistent_cache, "_setting", False)
    monkeypatch.setattr(jbase, "_VARIANTS", {})
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    _same(_generate(model), stored["out"])
    assert program_cache._PRELOADS == {} and program_cache._PRELOADED == set() == program_cache._NOTED
    assert program_cache._first_folder() is None


# -- the folder's upkeep (spec layer) --------------------------------------------------------------------------
def test_entry_files_refuse_damage(tmp_path):
    path = str(tmp_path / "entry")
    persistent_cache.write_atomic(path, b"magic\n", "abc", b"payload")
    assert persistent_cache.read_checked(path, b"magic\n", "abc") == b"payload"
    assert persistent_cache.read_checked(path, b"other\n", "abc") is None and not os.path.exists(path)
    persistent_cache.write_atomic(path, b"magic\n", "abc", b"payload")
    assert persistent_cache.read_checked(path, b"magic\n", "abd") is None
    assert persistent_cache.read_checked(str(tmp_path / "missing"), b"magic\n", "abc") is None
    assert os.listdir(tmp_path) == []                       # no temporary file left behind


def test_prune_keeps_the_most_recently_used(tmp_path, monkeypatch):
    for i, name in enumerate("abcd"):
        (tmp_path / "tf-1").mkdir(exist_ok=True)
        p = tmp_path / "tf-1" / name
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
    os.utime(tmp_path / "tf-1" / "a", (2000, 2000))            # used last
    assert persistent_cache.prune(str(tmp_path), 2500) == 2000
    assert sorted(os.listdir(tmp_path / "tf-1")) == ["a", "d"]
    monkeypatch.setenv(persistent_cache.MAX_MB_ENV, "0")
    assert persistent_cache.max_bytes() is None and persistent_cache.prune(str(tmp_path)) == 0
    monkeypatch.setenv(persistent_cache.MAX_MB_ENV, "0.001")
    assert persistent_cache.max_bytes() == 1048 and persistent_cache.prune(str(tmp_path)) == 1000
    monkeypatch.setenv(persistent_cache.MAX_MB_ENV, "lots")
    with pytest.raises(ValueError, match=persistent_cache.MAX_MB_ENV):
        persistent_cache.max_bytes()


def test_reading_an_entry_marks_it_used(tmp_path):
    for i, name in enumerate("ab"):
        persistent_cache.write_atomic(str(tmp_path / name), b"magic\n", name, b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert persistent_cache.read_entry(str(tmp_path), "a", b"magic\n") == b"x" * 100     # "a": written first, used last
    size = os.path.getsize(tmp_path / "a")
    assert persistent_cache.prune(str(tmp_path), size) == size
    assert os.listdir(tmp_path) == ["a"]


def test_a_program_loaded_from_the_folder_is_pruned_last(stored, fresh):
    """A model that runs a stored program marks its entry used, so a fuller folder loses an entry used
    longer ago first."""
    [entry] = _entries(fresh)
    older = os.path.join(os.path.dirname(entry), "0" * len(os.path.basename(entry)))
    shutil.copy(entry, older)
    os.utime(entry, (1000, 1000))                 # written long ago ...
    os.utime(older, (2000, 2000))                 # ... and another entry written after it
    model = BJ.BlipForConditionalGeneration(_config(), seed=5)
    traces = model.trace_count("generate")
    _same(_generate(model), stored["out"])
    assert model.trace_count("generate") == traces                       # run from the folder
    assert persistent_cache.prune(str(fresh), persistent_cache.folder_size(str(fresh)) - 1) == os.path.getsize(entry)
    assert os.path.exists(entry) and not os.path.exists(older)


def test_cache_command_shows_and_clears(tmp_path, monkeypatch, capsys):
    from blip_apps.cli import main
    monkeypatch.setattr(persistent_cache, "_setting", None)
    monkeypatch.setenv(persistent_cache.ENV, str(tmp_path / "c"))
    (tmp_path / "c" / "jax-programs-1").mkdir(parents=True)
    (tmp_path / "c" / "jax-programs-1" / "e").write_bytes(b"x" * 2**20)
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["folder"] == str(tmp_path / "c") and info["parts"] == {"jax-programs-1": {"files": 1, "mb": 1.0}}
    assert main(["cache", "clear"]) == 0 and not (tmp_path / "c").exists()
    monkeypatch.setenv(persistent_cache.ENV, "0")
    assert main(["cache", "info"]) == 0 and "off" in capsys.readouterr().out


@pytest.mark.parametrize("size, keys, built", [(2, "abacb", "abcb"), (3, "abcadab", "abcdb")])
def test_compiled_programs_lru_evicts_the_least_recently_used(size, keys, built):
    """``blip_core.cache.LRU`` (the in-memory programs of a model): a hit makes its entry the most recent, so the
    one evicted past ``size`` is the least recently used, hits included, not the first built. The programs
    built for each sequence of requests are worked out by hand."""
    from blip_core.cache import LRU
    made = []
    lru = LRU(size)
    for k in keys:
        assert lru.get(k, lambda: made.append(k) or k.upper()) == k.upper()
    assert "".join(made) == built
    assert len(lru) == size and sorted(lru.values()) == sorted(k.upper() for k in keys[-size:])


@pytest.mark.parametrize("as_json", [True, False])
def test_cache_info_before_the_folder_exists(tmp_path, monkeypatch, capsys, as_json):
    """``blip cache info`` with the cache on but its folder not yet created (nothing compiled yet): exit 0, no
    parts, 0 MB of the default 2048 MB bound, and the folder still not created."""
    from blip_apps.cli import main
    monkeypatch.setattr(persistent_cache, "_setting", None)
    monkeypatch.setenv(persistent_cache.ENV, str(tmp_path / "never"))
    monkeypatch.delenv(persistent_cache.MAX_MB_ENV, raising=False)
    capsys.readouterr()
    assert main(["cache", "info"] + (["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out) == {"folder": str(tmp_path / "never"), "on": True, "max_mb": 2048.0, "mb": 0,
                                   "parts": {}}
    else:
        assert out.splitlines() == [f"persistent compilation cache: {tmp_path / 'never'} (0 MB, at most 2048.0 MB)"]
    assert not (tmp_path / "never").exists()
