"""Stored traced programs of the TensorFlow backend (``backends/tf/program_cache.py``).

A process that finds its generate program on disk must not trace the model, and must give the ids and
scores of the process that traced it and of a process without the cache (bit for bit: the same graph, so
the same XLA program), which give backends.torch's ids. A missing, damaged or foreign entry means tracing
again, never a crash; ``BLIP_COMPILE_CACHE=0`` writes nothing.
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

require("tensorflow")
require("torch")
import backends.tf as BTF  # noqa: E402
import backends.torch as BT  # noqa: E402
from backends.tf import program_cache  # noqa: E402
from backends.tf.generation import trace_count  # noqa: E402

CALL = dict(max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
_config, _pixels = core_blip_config, tiny_pixels


CHILD = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from hf_configs import core_blip_config, tiny_pixels
import backends.tf as BTF
from backends.tf.generation import trace_count
cfg, px = core_blip_config(), tiny_pixels()     # _config() and _pixels() of the test module
model = BTF.BlipForConditionalGeneration(cfg, seed=5)
out = model.generate(pixel_values=px, **{call!r})
print(json.dumps(dict(ids=out.sequences.numpy().tolist(), scores=[s.numpy().tolist() for s in out.scores],
                      traces=trace_count(model))))
"""


def _child(**env_over):
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    env.update(env_over)
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), call=CALL)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generate(model):
    return model.generate(pixel_values=_pixels(), **CALL)


def _lists(out):
    return out.sequences.numpy().tolist(), [s.numpy().tolist() for s in out.scores]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A cache folder holding the program of ``_generate``, traced once by this process."""
    folder = tmp_path_factory.mktemp("tf-programs")
    saved = persistent_cache._setting
    persistent_cache._setting = str(folder)
    try:
        model = BTF.BlipForConditionalGeneration(_config(), seed=5)
        out = _generate(model)
        assert trace_count(model) == 1
        [name] = os.listdir(program_cache.folder())
    finally:
        persistent_cache._setting = saved
    return dict(folder=folder, out=_lists(out), name=name)


@pytest.fixture
def fresh(stored, monkeypatch, tmp_path):
    """A copy of the stored folder as the cache."""
    shutil.copytree(stored["folder"], tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    return tmp_path


def _entry(tmp_path):
    top = program_cache.folder()
    assert top is not None and top.startswith(str(tmp_path))
    [name] = os.listdir(top)
    return os.path.join(top, name)


def test_a_new_process_runs_the_stored_program_without_tracing(stored, monkeypatch, tmp_path):
    warm = _child(**{persistent_cache.ENV: str(stored["folder"])})
    assert warm["traces"] == 0
    assert (warm["ids"], warm["scores"]) == stored["out"]            # the tracing process's numbers, bit for bit
    # ... and those of the cache switched off (BLIP_COMPILE_CACHE=0: a plain tf.function, nothing written)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(persistent_cache, "_setting", None)
    monkeypatch.setenv(persistent_cache.ENV, "0")
    assert program_cache.folder() is None
    model = BTF.BlipForConditionalGeneration(_config(), seed=5)
    plain = _lists(_generate(model))
    assert trace_count(model) == 1
    assert not any(isinstance(f, program_cache.StoredProgram) for f in model._compiled.values())
    assert os.listdir(tmp_path) == []
    assert plain == (warm["ids"], warm["scores"])
    # ... and torch's ids
    torch_ids = BT.BlipForConditionalGeneration(_config(), seed=5).eval().generate(pixel_values=_pixels(),
                                                                                  max_new_tokens=5)
    assert torch_ids.numpy().tolist() == warm["ids"]


def test_one_entry_serves_other_weights_and_other_calls_are_other_keys(stored, fresh, monkeypatch):
    model = BTF.BlipForConditionalGeneration(_config(), seed=9)       # other weights, same program
    got = _generate(model)
    assert trace_count(model) == 0 and len(os.listdir(program_cache.folder())) == 1
    assert next(iter(model._compiled.values())).experimental_get_tracing_count() == 1   # one program, from disk
    assert not np.array_equal(got.scores[0].numpy(), np.asarray(stored["out"][1][0]))    # ... run on these weights
    key, px = ("caption", "plan"), program_cache._tensor(_pixels())
    base = program_cache.program_key(model, key, (px,), model.params)
    assert program_cache.program_key(model, key, (px,), model.params) == base
    assert program_cache.program_key(model, ("caption", "other plan"), (px,), model.params) != base
    assert program_cache.program_key(model, key, (px[:1],), model.params) != base
    other = BTF.BlipForConditionalGeneration(_config(), seed=9, dtype="bfloat16")
    assert program_cache.program_key(other, key, (px,), other.params) != base
    monkeypatch.setattr(persistent_cache, "source_fingerprint", lambda folders: "edited sources")
    assert program_cache.program_key(model, key, (px,), model.params) != base


def test_damaged_or_foreign_entries_are_traced_again(stored, fresh):
    entry = _entry(fresh)
    name = os.path.basename(entry)
    data = open(entry, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"",
               "flipped": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:],
               "another entry's": data.replace(name.encode(), b"0" * len(name), 1)}
    for why, content in damaged.items():
        with open(entry, "wb") as f:
            f.write(content)
        assert program_cache.load(name) is None and not os.path.exists(entry), why     # refused and deleted
    persistent_cache.write_atomic(entry, program_cache.MAGIC, name, b"\x05\0\0\0\0\0\0\0{}")   # whole, not ours
    assert program_cache.load(name) is None and not os.path.exists(entry)
    with open(entry, "wb") as f:       # end to end: a truncated entry is traced again, rewritten, read back
        f.write(data[:1000])
    model = BTF.BlipForConditionalGeneration(_config(), seed=5)
    assert _lists(_generate(model)) == stored["out"]
    assert trace_count(model) == 1
    assert program_cache.load(name) is not None
    again = BTF.BlipForConditionalGeneration(_config(), seed=5)
    assert _lists(_generate(again)) == stored["out"] and trace_count(again) == 0


def test_a_call_with_another_plan_runs_its_own_program(stored, fresh):
    """A decoding plan the stored entry was not traced for (a repetition penalty: same inputs and outputs,
    other logic) gets a program of its own, with the numbers of that plan (torch's ids and scores)."""
    call = dict(CALL, repetition_penalty=1.5)
    model = BTF.BlipForConditionalGeneration(_config(), seed=5)
    got = model.generate(pixel_values=_pixels(), **call)
    assert trace_count(model) == 1 and len(os.listdir(program_cache.folder())) == 2
    want = BT.BlipForConditionalGeneration(_config(), seed=5).eval().generate(pixel_values=_pixels(), **call)
    assert got.sequences.numpy().tolist() == want.sequences.numpy().tolist()
    for g, w in zip(got.scores, want.scores):
        np.testing.assert_allclose(g.numpy(), w.detach().numpy(), rtol=1e-4, atol=1e-4)
    plain = _lists(_generate(BTF.BlipForConditionalGeneration(_config(), seed=5)))
    assert plain == stored["out"]      # the stored plan's entry still serves its own calls


def _payload(head, functions=()) -> bytes:
    """An entry's payload as ``Entry.to_bytes`` lays it out: head length, JSON head, a FunctionDefLibrary."""
    import struct

    from tensorflow.core.framework import function_pb2
    library = function_pb2.FunctionDefLibrary()
    for name in functions:
        library.function.add().signature.name = name
    text = head if isinstance(head, bytes) else json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text + library.SerializeToString()


NOT_PROGRAMS = {
    "main function missing": _payload({"name": "f", "params": [], "outputs": "tensor"}, ["g"]),
    "params not a list": _payload({"name": "f", "params": "w", "outputs": "tensor"}, ["f"]),
    "outputs not flags": _payload({"name": "f", "params": [], "outputs": [1, 0]}, ["f"]),
    "head not JSON": _payload(b"\xff{not json", ["f"]),
}


@pytest.mark.parametrize("why", sorted(NOT_PROGRAMS))
def test_a_whole_entry_that_is_not_a_program_is_refused_and_deleted(monkeypatch, tmp_path, why):
    """An entry that reads back whole (its digest checks) but whose head does not describe a program of the
    library it carries is refused and deleted, so the next trace writes it again; a well-formed one loads."""
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    top = program_cache.folder()
    assert top is not None and top.startswith(str(tmp_path))
    name = "ab" * 32
    path = os.path.join(top, name)
    persistent_cache.write_atomic(path, program_cache.MAGIC, name, NOT_PROGRAMS[why])
    assert program_cache.load(name) is None and not os.path.exists(path)
    persistent_cache.write_atomic(path, program_cache.MAGIC, name,
                                  _payload({"name": "f", "params": ["w"], "outputs": [False, True]}, ["f"]))
    entry = program_cache.load(name)
    assert entry is not None and entry.name == "f" and entry.params == ["w"] and entry.outputs == [False, True]
    assert os.path.exists(path)
