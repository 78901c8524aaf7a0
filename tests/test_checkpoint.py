"""Checkpoint I/O of the spec layer (blip_core.checkpoint, blip_core.safe_pickle).

Golden files and values come from the references: torch.save / torch.load, safetensors' own
writer and reader, and transformers' save_pretrained / from_pretrained on tiny random BLIP models.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from blip_core.checkpoint import (CheckpointError, StateDictMismatchError, cast_state_dict,
                                  check_state_dict, checkpoint_info, load_state_dict, parse_size,
                                  read_safetensors, save_state_dict, strip_tied, write_safetensors)
from blip_core.safe_pickle import load_torch_state_dict
from blip_core.weights.spec import WeightSpec

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_np(t: "torch.Tensor") -> np.ndarray:
    """Bit-exact numpy copy of a torch tensor (bfloat16 via its bits)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def assert_same(ours: np.ndarray, ref: np.ndarray, name=""):
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    assert ours.dtype == ref.dtype, (name, ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert ours.tobytes() == ref.tobytes(), name


def assert_same_dict(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert_same(np.asarray(ours[k]), ref[k], k)


def sample_tensors() -> dict:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5)).astype(np.float32)
    return {
        "f32": w, "f32_t": w.T, "f32_fortran": np.asfortranarray(rng.standard_normal((2, 3)).astype(np.float32)),
        "f16": rng.standard_normal(7).astype(np.float16), "f64": rng.standard_normal((2, 2)),
        "bf16": rng.standard_normal((4, 3)).astype(BF16), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "i32": np.array([-1, 2], np.int32), "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False, True]),
        "scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 4), np.float32),
    }


# ----------------------------------------------------------------------------- tiny models

def tiny_vision_model():
    from transformers import BlipVisionConfig, BlipVisionModel
    torch.manual_seed(0)
    cfg = BlipVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, image_size=8, patch_size=4)
    return BlipVisionModel(cfg).eval()


def tiny_caption_model():
    from transformers import BlipConfig, BlipForConditionalGeneration
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=24, encoder_hidden_size=16),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=8, patch_size=4),
        projection_dim=8)
    return BlipForConditionalGeneration(cfg).eval()


CAPTION_TIES = {  # declared by hand, as the BLIP weight table declares them
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


def table_for(model, ties=None) -> dict:
    ties = ties or {}
    return {k: WeightSpec(k, tuple(v.shape), "param", tied_to=ties.get(k))
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vision_model():
    return tiny_vision_model()


@pytest.fixture(scope="module")
def caption_dirs(tmp_path_factory):
    """A tiny BLIP captioner saved by transformers as safetensors and as pytorch_model.bin."""
    model = tiny_caption_model()
    root = tmp_path_factory.mktemp("caption")
    model.save_pretrained(root / "st")
    model.save_pretrained(root / "bin", safe_serialization=False)
    model.save_pretrained(root / "bin_sharded", safe_serialization=False, max_shard_size=3000)
    ref = {k: to_np(v) for k, v in model.state_dict().items()}
    return model, root, ref


# ----------------------------------------------------------------------------- safetensors format

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors)
    back = read_safetensors(tmp_path / "a.safetensors")
    assert_same_dict(back, {k: np.ascontiguousarray(v) if v.ndim else v for k, v in tensors.items()})
    assert all(v.flags.c_contiguous and v.flags.writeable for v in back.values())
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temp file left behind


def test_bytes_identical_to_safetensors_writer(tmp_path):
    from safetensors.torch import save as torch_save_bytes
    tensors = sample_tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    ref = torch_save_bytes({k: torch.from_numpy(v.copy()) if v.dtype != BF16
                            else torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
                            for k, v in tensors.items()}, metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == ref


def test_reads_files_written_by_safetensors_torch(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = {"bf16": torch.randn(3, 4, dtype=torch.bfloat16), "f16": torch.randn(5, dtype=torch.float16),
           "f32": torch.randn(2, 3), "i64": torch.arange(4), "bool": torch.tensor([True, False])}
    save_file(ref, tmp_path / "ref.safetensors")
    assert_same_dict(read_safetensors(tmp_path / "ref.safetensors"), {k: to_np(v) for k, v in ref.items()})


def test_our_files_load_in_safetensors_torch(tmp_path):
    from safetensors.torch import load_file
    tensors = sample_tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors)
    loaded = load_file(tmp_path / "a.safetensors")
    assert_same_dict({k: to_np(v) for k, v in loaded.items()}, {k: np.asarray(v) for k, v in tensors.items()})


def test_bfloat16_round_trip_matches_torch_rounding(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    cast = cast_state_dict({"x": x}, "bfloat16")["x"]
    assert_same(cast, to_np(torch.from_numpy(x).to(torch.bfloat16)))
    write_safetensors(tmp_path / "b.safetensors", {"x": cast})
    assert_same(read_safetensors(tmp_path / "b.safetensors")["x"], cast)


def test_bfloat16_without_ml_dtypes_is_a_clear_error(tmp_path, monkeypatch):
    write_safetensors(tmp_path / "b.safetensors", {"x": np.ones(2, BF16), "y": np.ones(2, np.float32)})
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes `import ml_dtypes` fail
    with pytest.raises(CheckpointError, match=r"tensor 'x': bfloat16 data needs the 'ml_dtypes' package"):
        read_safetensors(tmp_path / "b.safetensors")


def _valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, {"w": np.arange(8, dtype=np.float32)})
    return path, path.read_bytes()


def _with_header(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b[:-5], r"beyond the data buffer of 27 bytes \(file truncated\?\)"),
    (lambda b: b[:5], r"too short for the 8-byte header length"),
    (lambda b: b[:40], r"header length \d+ runs beyond the file size of 40 bytes"),
    (lambda b: struct.pack("<Q", 10) + b"{not json!" + b[18:], r"header is not valid JSON"),
    (lambda b: _with_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + bytes(8),
     r"span 8 bytes but shape \[3\] of F32 needs 12"),
    (lambda b: _with_header({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}) + bytes(8),
     r"unsupported dtype 'C64'"),
    (lambda b: _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}) + bytes(12),
     r"'a' and 'b' overlap"),
])
def test_corrupt_safetensors_raise_checkpoint_error(tmp_path, corrupt, message):
    path, good = _valid_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(good))
    with pytest.raises(CheckpointError, match=message) as err:
        read_safetensors(bad)
    assert str(bad) in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_state_dict(bad)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path, good = _valid_file(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be stored"):
        write_safetensors(path, {"c": np.zeros(2, np.complex64)})

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"w": np.zeros(3, np.float32)})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ok.safetensors"]


# ----------------------------------------------------------------------------- directories, shards

def test_parse_size_matches_huggingface_hub():
    from huggingface_hub.serialization._base import parse_size_to_int
    for text in ("10MB", "2GB", "500KB", "1.5GB", "5gb", " 3 MB"):
        assert parse_size(text) == parse_size_to_int(text), text
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(12345) == 12345
    for bad in ("lots", "-1MB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_single_file_save_matches_transformers(vision_model, tmp_path):
    vision_model.save_pretrained(tmp_path / "hf")
    ref = {k: to_np(v) for k, v in vision_model.state_dict().items()}
    assert_same_dict(load_state_dict(tmp_path / "hf"), ref)
    assert save_state_dict(tmp_path / "ours", ref) == ["model.safetensors"]
    assert (tmp_path / "ours/model.safetensors").read_bytes() == (tmp_path / "hf/model.safetensors").read_bytes()


def test_sharded_save_matches_transformers(vision_model, tmp_path):
    # 3000 bytes: the (48, 16) float32 qkv weights (3072 bytes) each get a shard of their own.
    vision_model.save_pretrained(tmp_path / "hf", max_shard_size=3000)
    ref = {k: to_np(v) for k, v in vision_model.state_dict().items()}
    written = save_state_dict(tmp_path / "ours", ref, max_shard_size=3000)
    hf_files = sorted(f for f in os.listdir(tmp_path / "hf") if f.startswith("model"))
    assert sorted(written) == hf_files and len(hf_files) > 3
    for name in hf_files:  # identical shards and identical index text
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert_same_dict(load_state_dict(tmp_path / "hf"), ref)
    assert_same_dict(load_state_dict(tmp_path / "ours/model.safetensors.index.json"), ref)


@pytest.mark.parametrize("shard_size", ["5GB", "4KB"])
def test_transformers_from_pretrained_loads_our_files(vision_model, tmp_path, shard_size):
    from transformers import BlipVisionModel
    vision_model.config.save_pretrained(tmp_path)
    ref = {k: to_np(v) for k, v in vision_model.state_dict().items()}
    save_state_dict(tmp_path, ref, max_shard_size=shard_size)
    loaded, info = BlipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert_same_dict({k: to_np(v) for k, v in loaded.state_dict().items()}, ref)


def test_resave_removes_stale_files(tmp_path):
    state = {f"w{i}": np.full(250, i, np.float32) for i in range(6)}  # 1000 bytes each
    (tmp_path / "config.json").write_text("{}")
    assert len(save_state_dict(tmp_path, state, max_shard_size="2KB")) == 4   # 3 shards + index
    save_state_dict(tmp_path, state)                                         # now a single file
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    save_state_dict(tmp_path, state, max_shard_size=3000)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    save_state_dict(tmp_path, state, max_shard_size=1000)
    assert sorted(os.listdir(tmp_path))[1:-1] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert_same_dict(load_state_dict(tmp_path), state)


def test_missing_shard_is_named(tmp_path):
    state = {f"w{i}": np.full(250, i, np.float32) for i in range(3)}
    save_state_dict(tmp_path, state, max_shard_size=1000)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) model-00002-of-00003.safetensors"):
        load_state_dict(tmp_path)


def test_index_must_agree_with_shards(tmp_path):
    save_state_dict(tmp_path, {"a": np.zeros(300, np.float32), "b": np.ones(300, np.float32)},
                    max_shard_size=1500)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["../evil"] = "../../etc/passwd"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_state_dict(tmp_path)
    del index["weight_map"]["../evil"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"c \(listed in model-00001-of-00002.safetensors, found in no shard\)"):
        load_state_dict(tmp_path)


def test_empty_directory_says_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="looked for model.safetensors, model.safetensors.index.json"):
        load_state_dict(tmp_path)


def test_checkpoint_info(tmp_path):
    state = {"a": np.zeros((10, 10), np.float32), "b": np.zeros(300, np.float32),
             "ids": np.arange(5, dtype=np.int64), "h": np.zeros(4, np.float16)}
    save_state_dict(tmp_path, state, max_shard_size=1000)
    info = checkpoint_info(tmp_path)
    assert info["format"] == "safetensors" and info["sharded"] and info["num_shards"] == 2
    assert info["index"] == "model.safetensors.index.json"
    assert [f["name"] for f in info["files"]] == ["model-00001-of-00002.safetensors",
                                                  "model-00002-of-00002.safetensors"]
    assert sum(f["tensors"] for f in info["files"]) == info["num_tensors"] == 4
    assert info["dtypes"] == {"float32": {"tensors": 2, "parameters": 400, "bytes": 1600},
                              "int64": {"tensors": 1, "parameters": 5, "bytes": 40},
                              "float16": {"tensors": 1, "parameters": 4, "bytes": 8}}
    assert info["total_parameters"] == 409 and info["total_bytes"] == 1648
    assert info["metadata"] == {"format": "pt"}


# ----------------------------------------------------------------------------- pytorch_model.bin

def test_bin_refused_without_opt_in(caption_dirs):
    _, root, _ = caption_dirs
    for target in (root / "bin", root / "bin" / "pytorch_model.bin", root / "bin_sharded"):
        with pytest.raises(CheckpointError, match="allow_pickle_bin=True"):
            load_state_dict(target)
    assert checkpoint_info(root / "bin")["inspected"] is False


def test_transformers_bin_loads_bit_exact_with_shared_storage(caption_dirs):
    _, root, ref = caption_dirs
    state = load_state_dict(root / "bin", allow_pickle_bin=True)
    torch_ref = {k: to_np(v) for k, v in torch.load(root / "bin/pytorch_model.bin", weights_only=True).items()}
    assert_same_dict(state, torch_ref)
    assert_same_dict(state, ref)
    for tied, owner in CAPTION_TIES.items():  # one storage in the file -> one buffer here
        assert np.shares_memory(state[tied], state[owner])
    assert_same_dict(load_state_dict(root / "bin_sharded", allow_pickle_bin=True), ref)
    info = checkpoint_info(root / "bin", allow_pickle_bin=True)
    assert info["inspected"] and info["num_tensors"] == len(ref)


def test_bin_is_opened_mapped_one_tensor_at_a_time(caption_dirs, tmp_path):
    """``open_state_dict`` maps an opted-in ``.bin`` as it maps safetensors: each contiguous tensor is a
    view of the file (no read until used), released after use, equal to torch.load's tensors."""
    from blip_core.checkpoint import open_state_dict
    from blip_core.checkpoint.mapped import ViewRef
    _, root, ref = caption_dirs
    for d in ("bin", "bin_sharded"):
        refs = open_state_dict(root / d, allow_pickle_bin=True)
        assert set(refs) == set(ref) and all(isinstance(r, ViewRef) for r in refs.values()), d
        for k, r in refs.items():
            view = r.view()
            assert not view.flags.owndata and view.flags.writeable   # the private mapping, as for safetensors
            r.release()
            assert_same(view, ref[k])
    mapped = load_torch_state_dict(root / "bin/pytorch_model.bin", mapped=True)
    for tied, owner in CAPTION_TIES.items():      # one storage record -> one region of the mapping
        assert np.shares_memory(mapped[tied], mapped[owner])
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "s.bin")
    refs = open_state_dict(tmp_path / "s.bin", allow_pickle_bin=True)   # a strided tensor is copied, not mapped
    assert not isinstance(refs["w"], ViewRef) and isinstance(refs["b"], ViewRef)
    assert_same(refs["w"].view(), np.arange(6.0, dtype=np.float32).reshape(2, 3).T)
    assert refs["b"].raw().tolist() == [0x3F80] * 3
    with zipfile.ZipFile(tmp_path / "s.bin") as src, zipfile.ZipFile(tmp_path / "short.bin", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:4] if name.endswith("/data/1") else data)
    with pytest.raises(CheckpointError, match="holds 4 bytes but 3 x bfloat16 needs 6"):
        open_state_dict(tmp_path / "short.bin", allow_pickle_bin=True)


def test_torch_save_views_and_dtypes(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    sd = {"w": w, "w_t": w.t(), "w_rows": w[1:3], "w_slice": w[1:3, 2:5], "w_col": w[:, 1], "w_again": w,
          "bf16": torch.randn(3, 2, dtype=torch.bfloat16), "f16": torch.randn(5, dtype=torch.float16),
          "f64": torch.randn(2, dtype=torch.float64), "i64": torch.arange(3), "i32": torch.tensor([7], dtype=torch.int32),
          "i8": torch.tensor([-3], dtype=torch.int8), "u8": torch.tensor([200], dtype=torch.uint8),
          "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
          "param": torch.nn.Parameter(torch.ones(2))}
    torch.save(sd, tmp_path / "x.bin")
    ours = load_torch_state_dict(tmp_path / "x.bin")
    assert_same_dict(ours, {k: to_np(v) for k, v in torch.load(tmp_path / "x.bin", weights_only=True).items()})
    # contiguous views (offset included) share the storage's memory as in torch ...
    assert np.shares_memory(ours["w"], ours["w_again"]) and np.shares_memory(ours["w"], ours["w_rows"])
    # ... strided ones (transpose, column, sub-block) are materialised as contiguous copies
    assert all(ours[k].flags.c_contiguous for k in ("w_t", "w_col", "w_slice"))


def _fake_torch_zip(path, pkl: bytes, records=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)


def _call_global(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle of ``module.name(arg)`` (GLOBAL + REDUCE), written by hand."""
    data = arg.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(data)) + data
            + b"\x85R.")


@pytest.mark.parametrize("pkl, refused", [
    (_call_global("os", "system", "touch PWNED_1"), "os.system"),
    (_call_global("builtins", "eval", "open('PWNED_1', 'w')"), "builtins.eval"),
    (pickle.dumps({"w": zipfile.ZipInfo("x")}, protocol=2), "zipfile.ZipInfo"),
])
def test_malicious_pickle_refused(tmp_path, monkeypatch, pkl, refused):
    monkeypatch.chdir(tmp_path)
    _fake_torch_zip(tmp_path / "evil.bin", pkl)
    with pytest.raises(CheckpointError, match=f"refused to unpickle global '{refused}'"):
        load_state_dict(tmp_path / "evil.bin", allow_pickle_bin=True)
    assert not (tmp_path / "PWNED_1").exists()


def test_bin_storage_size_checked_and_legacy_refused(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.bin")
    assert_same(load_torch_state_dict(tmp_path / "ok.bin")["w"], np.arange(4, dtype=np.float32))
    # same archive with the 16-byte storage record cut to 8 bytes
    with zipfile.ZipFile(tmp_path / "ok.bin") as src, zipfile.ZipFile(tmp_path / "short.bin", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:8] if name.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"short.bin: storage 0 holds 8 bytes but 4 x float32 needs 16"):
        load_torch_state_dict(tmp_path / "short.bin")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_torch_state_dict(tmp_path / "legacy.bin")


_GEOMETRY = b"K\x00K\x04\x85q\x08K\x01\x85"     # torch.save's pickle of arange(4.0): offset 0, size (4,), stride (1,)


@pytest.mark.parametrize("geometry, last", [
    (b"K\x00K\x06\x85q\x08K\x01\x85", 5),      # 6 elements of a 4-element storage
    (b"K\x02K\x04\x85q\x08K\x01\x85", 5),      # 4 elements from offset 2
    (b"K\x00K\x03\x85q\x08K\x02\x85", 4),      # 3 elements, stride 2: a strided view past the end
])
def test_bin_tensor_reaching_past_its_storage_is_refused(tmp_path, geometry, last):
    """A pickle whose tensor geometry (offset, size, stride) reaches beyond its storage is refused, naming
    the element: a strided view would otherwise read memory after the storage's buffer."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.bin")
    with zipfile.ZipFile(tmp_path / "ok.bin") as src, zipfile.ZipFile(tmp_path / "bad.bin", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                assert data.count(_GEOMETRY) == 1
                data = data.replace(_GEOMETRY, geometry)
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match=f"bad.bin: tensor .* reaches element {last} of storage 0 which holds only 4"):
        load_torch_state_dict(tmp_path / "bad.bin")


# ----------------------------------------------------------------------------- strict checking

TABLE = {s.name: s for s in [
    WeightSpec("emb.weight", (10, 4), "embedding"),
    WeightSpec("fc.weight", (3, 4), "linear_weight"),
    WeightSpec("fc.bias", (3,), "bias"),
    WeightSpec("head.weight", (10, 4), "linear_weight", tied_to="emb.weight"),
]}


def _state(**over):
    state = {"emb.weight": np.ones((10, 4), np.float32), "fc.weight": np.ones((3, 4), np.float32),
             "fc.bias": np.zeros(3, np.float32)}
    state.update(over)
    return {k: v for k, v in state.items() if v is not None}


def test_check_lists_every_problem_in_one_error():
    state = _state(**{"fc.bias": None, "fc.weight": np.ones((4, 3), np.float32),
                      "head.weight": np.ones((4, 10), np.float32), "extra.a": np.ones(1), "extra.b": np.ones(1)})
    with pytest.raises(StateDictMismatchError) as err:
        check_state_dict(state, TABLE, source="ckpt_dir")
    e = err.value
    assert e.missing == ["fc.bias"] and e.unexpected == ["extra.a", "extra.b"]
    assert e.mismatched == [("fc.weight", (3, 4), (4, 3)), ("head.weight", (10, 4), (4, 10))]
    text = str(e)
    for piece in ("ckpt_dir", "1 missing key(s)", "fc.bias", "2 unexpected key(s)", "extra.a", "extra.b",
                  "2 shape mismatch(es)", "fc.weight: expected (3, 4), found (4, 3)", "transposed?"):
        assert piece in text, piece


def test_check_fills_and_keeps_ties():
    state = _state()
    out = check_state_dict(state, TABLE)
    assert list(out) == list(TABLE) and out["head.weight"] is state["emb.weight"]
    # a present tied key of the right shape: the owner's array is kept (transformers re-ties)
    out = check_state_dict(_state(**{"head.weight": np.zeros((10, 4), np.float32)}), TABLE)
    assert out["head.weight"] is out["emb.weight"]
    assert "head.weight" not in check_state_dict(state, TABLE, fill_ties=False)
    assert list(strip_tied(out, TABLE)) == ["emb.weight", "fc.weight", "fc.bias"]


def test_blip_safetensors_and_bin_agree_after_tie_filling(caption_dirs, tmp_path):
    from transformers import BlipForConditionalGeneration
    model, root, ref = caption_dirs
    table = table_for(model, CAPTION_TIES)
    from_st = load_state_dict(root / "st")
    assert not set(CAPTION_TIES) & set(from_st)  # transformers drops tied rows from safetensors
    completed = check_state_dict(from_st, table)
    assert list(completed) == list(ref)
    assert_same_dict(completed, check_state_dict(load_state_dict(root / "bin", allow_pickle_bin=True), table))
    # and the files we write (ties stripped) load back into transformers with the ties restored
    model.config.save_pretrained(tmp_path)
    save_state_dict(tmp_path, strip_tied(completed, table), max_shard_size="2KB")
    loaded, info = BlipForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_same_dict({k: to_np(v) for k, v in loaded.state_dict().items()}, ref)


def test_cast_state_dict_only_touches_floats():
    ids = np.arange(4, dtype=np.int64)
    x = np.random.default_rng(2).standard_normal(9).astype(np.float32)
    out = cast_state_dict({"x": x, "ids": ids, "mask": np.array([True])}, np.float16)
    assert out["ids"] is ids and out["mask"].dtype == np.bool_
    assert_same(out["x"], to_np(torch.from_numpy(x).half()))
    back = cast_state_dict(cast_state_dict({"x": x}, "bfloat16"), "float32")["x"]
    assert_same(back, to_np(torch.from_numpy(x).bfloat16().float()))
    with pytest.raises(ValueError, match="floating"):
        cast_state_dict({"x": x}, "int32")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cast_state_dict_casts_what_torch_module_to_casts(dtype):
    """``cast_state_dict(state, dtype)`` is torch's ``module.to(dtype)`` on the module's state: floating
    parameters and buffers cast (round to nearest even), integer and bool buffers kept as they are."""
    module = torch.nn.Linear(5, 3)
    module.register_buffer("position_ids", torch.arange(7).expand(1, -1).clone())
    module.register_buffer("mask", torch.tensor([True, False, True]))
    module.register_buffer("scale", torch.tensor(0.1, dtype=torch.float64))
    with torch.no_grad():
        module.weight.mul_(1000.0)
    state = {k: to_np(v) for k, v in module.state_dict().items()}
    out = cast_state_dict(state, dtype)
    want = {k: to_np(v) for k, v in module.to(getattr(torch, dtype)).state_dict().items()}
    assert list(out) == list(want)
    for k in want:
        assert_same(out[k], want[k], k)
    assert out["position_ids"] is state["position_ids"] and out["mask"] is state["mask"]


def test_check_without_filling_ties_keeps_the_tied_rows_the_state_holds():
    """``fill_ties=False`` leaves absent tied rows absent but keeps a present one, as its owner's array."""
    out = check_state_dict(_state(**{"head.weight": np.zeros((10, 4), np.float32)}), TABLE, fill_ties=False)
    assert list(out) == ["emb.weight", "fc.weight", "fc.bias", "head.weight"]
    assert out["head.weight"] is out["emb.weight"]


def test_check_without_filling_ties_gives_each_file_its_own_rows(caption_dirs):
    """transformers' ``.bin`` holds the tied rows and its safetensors omit them: checked with ``fill_ties=False``
    each keeps exactly the names transformers wrote, in its state dict's order."""
    model, root, ref = caption_dirs
    table = table_for(model, CAPTION_TIES)
    from_bin = check_state_dict(load_state_dict(root / "bin", allow_pickle_bin=True), table, fill_ties=False)
    assert list(from_bin) == list(ref)
    for tied, owner in CAPTION_TIES.items():
        assert from_bin[tied] is from_bin[owner]
    from_st = check_state_dict(load_state_dict(root / "st"), table, fill_ties=False)
    assert list(from_st) == [k for k in ref if k not in CAPTION_TIES]


def test_spec_layer_imports_no_framework():
    code = ("import sys, blip_core.checkpoint, blip_core.safe_pickle\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'tensorflow', 'jax', 'flax', 'transformers', 'ml_dtypes'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- round 8: hostile and unusual .bin files

def _rewrite_torch_zip(src, dst, edit):
    """Copy the torch zip ``src`` to ``dst`` with each record's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


@pytest.mark.parametrize("geometry", [
    b"K\x03K\x04\x85q\x08J\xff\xff\xff\xff\x85",                              # offset 3, size (4,), stride (-1,)
    b"K\x03K\x02K\x02\x86q\x08J\xfe\xff\xff\xffJ\xff\xff\xff\xff\x86",        # offset 3, size (2, 2), stride (-2, -1)
    b"K\x00J\xfe\xff\xff\xff\x85q\x08K\x01\x85",                              # offset 0, size (-2,), stride (1,)
])
def test_bin_tensor_with_negative_strides_or_sizes_is_refused(tmp_path, geometry):
    """torch never writes a negative stride or size (its tensors cannot have one); a pickle that gives one is
    refused as an invalid geometry rather than read backwards through (or before) its storage."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.bin")

    def edit(name, data):
        if name.endswith("data.pkl"):
            assert data.count(_GEOMETRY) == 1
            data = data.replace(_GEOMETRY, geometry)
        return data
    _rewrite_torch_zip(tmp_path / "ok.bin", tmp_path / "bad.bin", edit)
    with pytest.raises(CheckpointError, match="bad.bin: invalid tensor geometry"):
        load_torch_state_dict(tmp_path / "bad.bin")


def _big_endian_copy(tmp_path, state: dict):
    """``state`` saved by torch.save, then rewritten as a big-endian machine writes it: byteorder record "big",
    each storage record's elements byte-swapped. Returns the path and torch.load's reading of it."""
    torch.save(state, tmp_path / "little.bin")
    itemsize = [t.element_size() for t in state.values()]         # storage i belongs to the i-th tensor

    def edit(name, data):
        if name.endswith("/byteorder"):
            assert data == b"little"
            return b"big"
        if "/data/" in name:
            n = itemsize[int(name.rsplit("/", 1)[1])]
            return np.frombuffer(data, f"u{n}").byteswap().tobytes() if n > 1 else data
        return data
    _rewrite_torch_zip(tmp_path / "little.bin", tmp_path / "big.bin", edit)
    ref = {k: to_np(v) for k, v in torch.load(tmp_path / "big.bin", weights_only=True).items()}
    return tmp_path / "big.bin", ref


BIG_ENDIAN_STATE = {"f32": torch.arange(6.0).reshape(2, 3) - 2.5, "i64": torch.tensor([1, -2, 3 << 40]),
                    "bf16": torch.tensor([1.5, -0.25, 3.0], dtype=torch.bfloat16),
                    "u8": torch.tensor([1, 200], dtype=torch.uint8),
                    "f16": torch.tensor([0.1, 2.0], dtype=torch.float16)}


def test_big_endian_bin_reads_as_torch_load_reads_it(tmp_path):
    """A ``.bin`` whose byteorder record says "big" has its elements byte-swapped on reading, as torch.load does."""
    path, ref = _big_endian_copy(tmp_path, BIG_ENDIAN_STATE)
    assert_same_dict(ref, {k: to_np(v) for k, v in BIG_ENDIAN_STATE.items()})   # torch reads the copy back
    assert_same_dict(load_torch_state_dict(path), ref)
    assert_same_dict(load_state_dict(path, allow_pickle_bin=True), ref)


@pytest.mark.parametrize("opener", ["load_torch_state_dict", "open_state_dict"])
def test_big_endian_bin_opened_mapped_reads_as_torch_load_reads_it(tmp_path, opener):
    """Mapped opening (``mapped=True``, ``open_state_dict``) cannot view a big-endian record in place: it reads it
    swapped, as torch.load does."""
    from blip_core.checkpoint import open_state_dict
    path, ref = _big_endian_copy(tmp_path, BIG_ENDIAN_STATE)
    if opener == "load_torch_state_dict":
        got = load_torch_state_dict(path, mapped=True)
    else:
        got = {k: r.view() for k, r in open_state_dict(path, allow_pickle_bin=True).items()}
    assert_same_dict(got, ref)


@pytest.mark.parametrize("listed_in", [0, 1])
def test_tensor_stored_in_two_shards_is_refused(tmp_path, listed_in):
    """A tensor that two shards of the index both hold is refused by name, whichever shard the index lists it
    under: which copy is the weight cannot be told."""
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    write_safetensors(tmp_path / shards[0], {"a": np.zeros(3, np.float32), "c": np.ones(2, np.float32)})
    write_safetensors(tmp_path / shards[1], {"a": np.full(3, 7, np.float32), "b": np.ones(4, np.float32)})
    index = {"metadata": {"total_size": 36}, "weight_map": {"a": shards[listed_in], "b": shards[1], "c": shards[0]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor 'a' is stored in both {shards[0]} and {shards[1]}"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("target", ["bin_sharded", "bin/pytorch_model.bin", "bin_sharded/pytorch_model.bin.index.json"])
def test_info_lists_bin_files_without_unpickling_them(caption_dirs, target):
    """Without ``allow_pickle_bin=True`` ``checkpoint_info`` names a ``.bin`` checkpoint's files and sizes but opens
    none of them: no tensor count, parameters or bytes."""
    _, root, _ = caption_dirs
    info = checkpoint_info(root / target)
    assert info["format"] == "pytorch_bin" and info["inspected"] is False
    assert info["num_tensors"] is info["total_parameters"] is info["total_bytes"] is None and info["dtypes"] == {}
    assert info["files"] and all(f["tensors"] is None and f["bytes"] > 0 for f in info["files"])
    assert info["sharded"] == ("sharded" in target)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_safetensors_match_safetensors_torch(tmp_path, dtype):
    """float8 tensors (F8_E4M3 / F8_E5M2) read from safetensors.torch's files hold torch's values, bit for bit,
    and the files written here load in safetensors.torch as the same dtype."""
    from safetensors.torch import load_file, save_file
    t = (torch.linspace(-3, 3, 12) ** 3).to(getattr(torch, dtype))
    save_file({"x": t}, tmp_path / "ref.safetensors")
    got = read_safetensors(tmp_path / "ref.safetensors")["x"]
    want = t.view(torch.uint8).numpy()
    assert got.dtype == np.dtype(getattr(ml_dtypes, dtype)) and np.array_equal(got.view(np.uint8), want)
    write_safetensors(tmp_path / "ours.safetensors", {"x": got})
    back = load_file(tmp_path / "ours.safetensors")["x"]
    assert back.dtype == getattr(torch, dtype) and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_info_names_float8_dtypes(tmp_path, dtype):
    """``checkpoint_info`` counts a float8 tensor under its own dtype (the header's F8_E4M3 / F8_E5M2 tag), one byte
    a parameter."""
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(6, 2).to(getattr(torch, dtype)), "y": torch.zeros(3)}, tmp_path / "model.safetensors")
    info = checkpoint_info(tmp_path)
    assert info["dtypes"] == {dtype: {"tensors": 1, "parameters": 12, "bytes": 12},
                              "float32": {"tensors": 1, "parameters": 3, "bytes": 12}}


@pytest.mark.parametrize("first", ["archive", "other"])
def test_bin_with_two_pickles_is_refused_as_torch_load_refuses_it(tmp_path, first):
    """A zip holding two ``<prefix>/data.pkl`` records (two state dicts) is refused whichever comes first, as
    torch.load refuses it: which one is the checkpoint cannot be told."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "a.bin")
    torch.save({"w": torch.ones(4)}, tmp_path / "b.bin")
    parts = {"archive": tmp_path / "a.bin", "other": tmp_path / "b.bin"}
    with zipfile.ZipFile(tmp_path / "two.bin", "w") as dst:
        for prefix in sorted(parts, key=lambda p: p != first):
            with zipfile.ZipFile(parts[prefix]) as src:
                for name in src.namelist():
                    dst.writestr(prefix + name[name.index("/"):], src.read(name))
    with pytest.raises(RuntimeError):
        torch.load(tmp_path / "two.bin", weights_only=True)
    with pytest.raises(CheckpointError, match=r"two.bin: expected exactly one '<prefix>/data.pkl' record, found "):
        load_torch_state_dict(tmp_path / "two.bin")
    with pytest.raises(CheckpointError, match="expected exactly one"):
        load_state_dict(tmp_path / "two.bin", allow_pickle_bin=True)
