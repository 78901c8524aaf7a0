"""Conversion faults: overlapping paths, killed writers, crash-safe overwrite, permissions, int weights."""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from blip_core import checkpoint
from converters import ConversionError, convert
from converters.safety import atomic_exchange, make_partial, recover_destination, remove_stale_partials
from fixture_utils import ROOT, fixture


def _digest(folder) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            full = os.path.join(base, f)
            out[os.path.relpath(full, folder)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


@pytest.fixture()
def src(tmp_path):
    d, _, _ = fixture("BlipTextModel")
    out = tmp_path / "src"
    shutil.copytree(d, out)
    return str(out)


def _partials(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


def test_overlapping_source_and_destination_are_refused(src, tmp_path):
    before = _digest(src)
    weights = os.path.join(src, "model.safetensors")
    for dst in (src, weights, os.path.join(src, "sub"), str(tmp_path)):
        with pytest.raises(ConversionError, match="overlaps the source"):
            convert(src, dst, to="torch", overwrite=True)
    with pytest.raises(ConversionError, match="overlaps the source"):
        convert(weights, weights, to="tf", overwrite=True)
    assert _digest(src) == before
    assert not _partials(tmp_path)


@pytest.mark.parametrize("dtype,to", [("int32", "tf"), ("bool", "jax")])
def test_integer_weights_are_refused_by_convert(src, tmp_path, dtype, to):
    state = checkpoint.load_state_dict(src)
    name = sorted(state)[0]
    state[name] = state[name].astype(dtype)
    checkpoint.save_state_dict(src, state)
    with pytest.raises(checkpoint.StateDictMismatchError, match=f"(?s)non-floating weight.*{name}: {dtype}"):
        convert(src, str(tmp_path / "out"), to=to)
    assert not os.path.exists(tmp_path / "out") and not _partials(tmp_path)


def test_output_directory_has_ordinary_permissions(src, tmp_path):
    dst = tmp_path / "out"
    convert(src, str(dst), to="torch", progress=False)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (os.stat(dst).st_mode & 0o777) == (0o777 & ~mask)


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(src, tmp_path):
    dst = str(tmp_path / "out")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = make_partial(dst)   # this process: alive
    convert(src, dst, to="torch", progress=False)
    assert not stale.exists() and os.path.isdir(live)
    shutil.rmtree(live)
    assert remove_stale_partials(dst) == []


def test_a_partial_of_another_live_writer_is_kept(src, tmp_path):
    """Another process writing the same destination owns its partial directory while it lives; once it
    is dead, the next conversion removes it."""
    dst = str(tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        theirs = tmp_path / f".out.partial-{other.pid}-abc"
        theirs.mkdir()
        convert(src, dst, to="torch", progress=False)
        assert theirs.is_dir()
    finally:
        other.kill()
        other.wait()
    assert remove_stale_partials(dst) == [str(theirs)] and not theirs.exists()


def test_cli_refuses_a_destination_inside_the_source(src, capsys):
    from converters.cli import main as cli_main
    before = _digest(src)
    assert cli_main(["convert", src, os.path.join(src, "tf"), "--to", "tf", "--no-progress"]) == 1
    assert "overlaps the source" in capsys.readouterr().err
    assert _digest(src) == before and not _partials(src)


def test_crash_between_renames_is_recovered(src, tmp_path):
    """The rename fallback (no atomic exchange): the old destination aside, the process dead."""
    dst = str(tmp_path / "out")
    convert(src, dst, to="torch", progress=False)
    old = _digest(dst)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(dst, str(tmp_path / f".out.partial-{dead.pid}-xyz.old"))
    recover_destination(dst)
    assert _digest(dst) == old and not _partials(tmp_path)
    # The layout of earlier versions: .DST.old-*/d
    os.makedirs(tmp_path / ".out.old-q1")
    os.rename(dst, str(tmp_path / ".out.old-q1" / "d"))
    convert(src, dst, to="torch", overwrite=True, progress=False)
    assert not _partials(tmp_path) and os.path.isfile(os.path.join(dst, "model.safetensors"))


def test_atomic_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic_exchange(str(a), str(b))       # Linux: renameat2(RENAME_EXCHANGE)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def _complete(dst, state, dtype):
    got = checkpoint.load_state_dict(dst)
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert got[k].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[k], v.astype(dtype))


def test_sigkill_at_a_random_moment_never_leaves_a_partial_destination(src, tmp_path):
    state = checkpoint.load_state_dict(src)
    before = _digest(src)
    rng = random.Random(int(time.time()))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dst = str(tmp_path / "out")
    base = [sys.executable, "-m", "converters.cli", "convert", src, dst, "--to", "torch", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(base + ["--dtype", "float16"], env=env, cwd=ROOT, check=True, capture_output=True)
    full = time.perf_counter() - t0
    shutil.rmtree(dst)
    kills = 0
    for i in range(6):
        overwrite = i % 2 == 1
        if overwrite and not os.path.exists(dst):
            convert(src, dst, to="torch", dtype="float16", progress=False)
        proc = subprocess.Popen(base + (["--overwrite"] if overwrite else []), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait() == -signal.SIGKILL
        if os.path.exists(dst):      # old (float16) or new (float32), never half of either
            got_dtype = checkpoint.load_state_dict(dst)[sorted(state)[0]].dtype
            _complete(dst, state, got_dtype)
        else:
            assert not overwrite, "an overwrite that was killed lost the destination"
        assert _digest(src) == before
        if not overwrite and os.path.exists(dst):
            shutil.rmtree(dst)
    # The next run cleans up what the killed ones left and succeeds.
    convert(src, dst, to="torch", overwrite=True, progress=False)
    _complete(dst, state, np.float32)
    assert not _partials(tmp_path)
    assert kills >= 1


@pytest.mark.parametrize("to", ["torch", "jax"])
def test_a_tf_weight_the_table_cannot_place_is_refused_by_convert(src, tmp_path, to):
    """A ``tf_model.h5`` with a weight no row of the class maps to (a layer of another model, a damaged
    file) is a strict mismatch naming it, not a weight silently left behind; nothing is written."""
    import h5py
    convert(src, str(tmp_path / "tf"), to="tf", progress=False)
    with h5py.File(tmp_path / "tf" / "tf_model.h5", "r+") as f:
        f.create_group("extra").attrs["weight_names"] = np.asarray([b"extra/not_a_weight:0"])
        f["extra"].create_dataset("extra/not_a_weight:0", data=np.zeros(3, np.float32))
        f.attrs["layer_names"] = np.asarray(list(f.attrs["layer_names"]) + [b"extra"])
    with pytest.raises(checkpoint.StateDictMismatchError, match="not_a_weight"):
        convert(str(tmp_path / "tf"), str(tmp_path / "out"), to=to, progress=False)
    assert not (tmp_path / "out").exists() and not _partials(tmp_path)
