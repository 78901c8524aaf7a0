"""Loading on the CPU through host buffers (``blip_core.checkpoint.host_layout``, issue 22).

* ``relayout`` gives exactly numpy's ``src.transpose(perm).astype(dtype)`` (the spec's transform path), for
  bfloat16 / float16 / float32 in and out, NaN payloads and subnormals included, tiled or not, one thread or
  several, and always in a 64-byte-aligned buffer of its own.
* The TF and JAX loaders give those same bits from a safetensors file whose tensors start on unaligned
  addresses (a data offset of 2 mod 64) and from one whose tensors are 64-byte aligned: the buffer handed to
  TensorFlow through DLPack is always the aligned copy (an unaligned one aborts the process), and what jax
  aliases stays valid after the file's mapping is gone.
* The load benchmark rotates the order of the impls across repeats and reports medians.
"""
import gc
import json
import os

import numpy as np
import pytest

from blip_core.checkpoint import host_layout
from blip_core.checkpoint.host_layout import relayout
from blip_core.checkpoint.mapped import MappedFile
from fixture_utils import require

ml_dtypes = require("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (BF16, np.dtype(np.float16), np.dtype(np.float32))


def _bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _data(shape, dtype, seed=0) -> np.ndarray:
    """Random values plus the awkward ones: NaNs with payloads of both signs, a subnormal, -0, infinities."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype)
    flat = x.reshape(-1)
    if dtype == BF16 and flat.size >= 6:
        flat.view(np.uint16)[:6] = [0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80, 0xFF80]
    elif flat.size >= 4:
        flat[:4] = [np.nan, -0.0, np.inf, np.finfo(dtype).smallest_subnormal]
    return x


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("shape", [(40, 2100), (2100, 40), (300, 17), (15, 33), (1, 5), (0, 4)])
def test_relayout_is_numpys_transpose_and_cast(shape, threads, monkeypatch):
    monkeypatch.setenv("BLIP_LOAD_THREADS", threads)
    monkeypatch.setattr(host_layout, "PARALLEL_MIN", 0)      # small tensors through the threaded path too
    for src_dtype in DTYPES:
        x = _data(shape, src_dtype)
        for dtype in DTYPES:
            for perm in ((1, 0), None):
                want = (x if perm is None else x.transpose(perm)).astype(dtype)
                got = relayout(x, perm, dtype)
                assert got.shape == want.shape and got.dtype == dtype
                assert np.array_equal(_bits(got), _bits(want)), (src_dtype, dtype, perm)
                assert got.flags.c_contiguous and got.flags.writeable and (got.size == 0 or got.ctypes.data % 64 == 0)


def test_relayout_of_other_permutations_and_of_large_buffers():
    x = _data((6, 3, 4, 5), BF16)          # a conv kernel's (out, in, h, w) -> (h, w, in, out)
    got = relayout(x, (2, 3, 1, 0), np.float32)
    assert np.array_equal(_bits(got), _bits(x.transpose(2, 3, 1, 0).astype(np.float32)))
    big = _data((1024, 600), BF16)         # over MAP_MIN: a mapping of its own, zero-filled, page-aligned
    for dtype in (BF16, np.dtype(np.float32)):
        got = relayout(big, (1, 0), dtype)
        assert got.nbytes >= host_layout.MAP_MIN and got.ctypes.data % 4096 == 0
        assert np.array_equal(_bits(got), _bits(big.T.astype(dtype)))


def _write_safetensors(path, tensors: dict, data_mod_64: int) -> None:
    """A safetensors file whose data buffer starts at an offset of ``data_mod_64`` mod 64 in the file (and each
    tensor at an even, but otherwise arbitrary, offset): the header is padded with spaces to get there."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        header[name] = {"dtype": {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}[arr.dtype.name],
                        "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    head = json.dumps(header).encode()
    head += b" " * ((data_mod_64 - 8 - len(head)) % 64)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _tensors():
    # even element counts: in a file whose data start at 2 mod 64 every tensor starts at 2 mod 4 (never aligned)
    return {"a.weight": _data((37, 2050), BF16, 1), "b.weight": _data((1025, 516), BF16, 2),
            "c.bias": _data((302,), BF16, 3), "d.weight": _data((3, 5, 2, 2), BF16, 4), "e.weight": _data((17, 34), BF16, 5)}


PERMS = {"a.weight": (1, 0), "b.weight": (1, 0), "c.bias": None, "d.weight": (2, 3, 1, 0), "e.weight": (1, 0)}


@pytest.mark.parametrize("data_mod_64", [0, 2])
@pytest.mark.parametrize("backend", ["jax", "tf"])
def test_loaders_give_numpys_bits_from_aligned_and_unaligned_files(tmp_path, backend, data_mod_64):
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    _write_safetensors(path, tensors, data_mod_64)
    refs = MappedFile(path).refs()
    starts = {name: ref.view().ctypes.data % 64 for name, ref in refs.items()}
    if data_mod_64:
        assert all(s % 4 == 2 for s in starts.values()), starts        # nothing a backend could take as it is
    else:
        assert starts["a.weight"] == 0
    for dtype in (BF16, np.dtype(np.float32)):
        items = [(name, refs[name], PERMS[name]) for name in tensors]
        got = _load(backend, items, dtype)
        del items
        gc.collect()          # the refs keep the mapping; what the backend holds must not depend on it
        for name, x in tensors.items():
            want = (x if PERMS[name] is None else x.transpose(PERMS[name])).astype(dtype)
            assert np.array_equal(_bits(got[name]), _bits(want)), (name, dtype)


def _load(backend, items, dtype) -> dict:
    """``{name: numpy array}`` through the backend's loader (its arrays read back after the refs are released)."""
    if backend == "jax":
        import jax
        from backends.jax.loading import load_params
        out = load_params(items, dtype)
        for v in out.values():
            assert v.dtype == dtype and v.devices() == {jax.devices("cpu")[0]}
        return {k: np.asarray(v) for k, v in out.items()}
    import tensorflow as tf
    from backends.tf.loading import LazyValues
    tf_dtype = tf.as_dtype(dtype)
    values = LazyValues(items, tf_dtype)
    out = {}
    for name, _, _ in items:
        var = tf.Variable(values[name])           # as the model makes its variables
        assert var.dtype == tf_dtype
        bits = tf.bitcast(var, tf.uint16) if tf_dtype == tf.bfloat16 else var
        out[name] = bits.numpy().view(dtype)
        if var.shape.rank == 2:      # an Eigen kernel reads the variable's buffer (an unaligned one aborts here)
            assert np.array_equal(_bits(tf.transpose(bits).numpy()), _bits(out[name].T))
    return out


def test_jax_arrays_are_the_host_buffers_and_outlive_the_mapping(tmp_path, monkeypatch):
    """On the CPU the loaded array is the aligned host buffer itself (no second copy), and it stays valid after
    the file is unmapped and deleted."""
    import jax
    from backends.jax import loading
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    _write_safetensors(path, tensors, 2)
    seen = {}
    real = loading.relayout

    def spy(src, perm, dtype):
        seen[src.shape] = out = real(src, perm, dtype)
        return out
    monkeypatch.setattr(loading, "relayout", spy)
    mapped = MappedFile(path)
    refs = mapped.refs()
    out = loading.load_params([(n, refs[n], PERMS[n]) for n in tensors], np.float32)
    assert out["a.weight"].unsafe_buffer_pointer() == seen[(37, 2050)].ctypes.data
    mapped._mmap.close()
    del mapped, refs, seen
    gc.collect()
    os.remove(path)
    for name, x in tensors.items():
        want = (x if PERMS[name] is None else x.transpose(PERMS[name])).astype(np.float32)
        assert np.array_equal(np.asarray(jax.device_get(out[name])), want, equal_nan=True)


def test_load_benchmark_rotates_the_impls_and_reports_medians(monkeypatch, tmp_path):
    from benchmarks import load
    order = []
    seconds = {"torch": [3.0, 1.0, 2.0], "tf": [5.0, 4.0, 6.0]}

    def fake_measure(impl, directory, arch, dtype, logits_out="", device=""):
        order.append(impl)
        s = seconds[impl][sum(1 for i in order if i == impl) - 1]
        return {"status": "ok", "seconds": s, "cpu_seconds": s / 2, "touch_seconds": 0.1, "baseline_bytes": 10,
                "warm_baseline_bytes": 10, "peak_bytes": 100 + 10 * len(order), "after_bytes": 90, "major_faults": 0,
                "model_bytes": 100}
    monkeypatch.setattr(load, "build_checkpoint", lambda d, m: {"architecture": "X", "parameters": 1, "bytes": 2,
                                                                 "stored_dtype": "bfloat16", "shards": 1})
    monkeypatch.setattr(load, "warm", lambda d: None)
    monkeypatch.setattr(load, "measure", fake_measure)
    res = load.run(["blip2-small"], ["torch", "tf"], ["bfloat16"], workdir=str(tmp_path), log=lambda *a: None, repeats=3)
    assert order == ["torch", "tf", "tf", "torch", "torch", "tf"]
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["torch"]["seconds"] == 2.0 and rows["tf"]["seconds"] == 5.0
    assert rows["torch"]["runs_seconds"] == [3.0, 1.0, 2.0] and rows["torch"]["repeats"] == 3
    assert rows["torch"]["peak_bytes"] == 100 + 10 * 5       # the largest peak of its repeats
