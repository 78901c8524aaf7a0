"""Hostile weight files: integer weights, absurd header shapes, corrupt files beside other formats."""
import json
import shutil
import struct

import numpy as np
import pytest

from blip_apps.cli import main
from blip_core import checkpoint
from blip_core.checkpoint import CheckpointError, StateDictMismatchError
from blip_core.checkpoint.files import checkpoint_info
from converters import convert
from fixture_utils import fixture

BACKEND_CLASSES = {
    "torch": lambda: __import__("backends.torch", fromlist=["x"]).BlipTextModel,
    "tf": lambda: __import__("backends.tf", fromlist=["x"]).BlipTextModel,
    "jax": lambda: __import__("backends.jax", fromlist=["x"]).BlipTextModel,
}


@pytest.fixture()
def text_dir(tmp_path):
    d, _, _ = fixture("BlipTextModel")
    out = tmp_path / "m"
    shutil.copytree(d, out)
    return out


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_or_bool_weights_are_refused_in_every_backend(text_dir, backend, dtype):
    state = checkpoint.load_state_dict(str(text_dir))
    name = "embeddings.word_embeddings.weight"
    state[name] = (state[name] * 100).astype(dtype)
    checkpoint.save_state_dict(str(text_dir), state)
    with pytest.raises(StateDictMismatchError, match=f"(?s)non-floating.*{name}: {np.dtype(dtype).name}") as info:
        BACKEND_CLASSES[backend]().from_pretrained(str(text_dir))
    assert info.value.wrong_dtype == [(name, np.dtype(dtype).name)]


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
def test_sharded_index_that_misplaces_a_tensor_is_refused_in_every_backend(text_dir, backend):
    """An index that lists a tensor under another shard than the one holding it is refused by name: the
    index is what a reader trusts to find a tensor, so the two must agree."""
    state = checkpoint.load_state_dict(str(text_dir))
    (text_dir / "model.safetensors").unlink()
    checkpoint.save_state_dict(str(text_dir), state, max_shard_size=sum(a.nbytes for a in state.values()) // 2)
    index_path = text_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    name = next(k for k, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"index and shards disagree: {name} \\(listed in {shards[1]}, found in "
                                              f"{shards[0]}\\)"):
        BACKEND_CLASSES[backend]().from_pretrained(str(text_dir))


def _header_file(path, shape, dtype="F32", data=b""):
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("shape", [[2**62, 4], [2**40, 2**40, 2**40], [2**63 - 1, 2]])
def test_absurd_header_shape_is_named_not_overflowed(tmp_path, shape):
    f = tmp_path / "model.safetensors"
    _header_file(f, shape, data=b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'w': data_offsets \[0, 16\] span 16 bytes"):
        checkpoint.load_state_dict(str(f))
    with pytest.raises(CheckpointError, match="tensor 'w'"):
        checkpoint_info(str(f))


def test_info_counts_parameters_exactly(tmp_path, capsys):
    d, _, _ = fixture("BlipTextModel")
    info = checkpoint_info(d)
    state = checkpoint.load_state_dict(d)
    assert info["total_parameters"] == sum(v.size for v in state.values())
    assert main(["info", d, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == info["total_parameters"]


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
def test_overlapping_tensors_are_refused_in_every_backend(text_dir, backend):
    """A header that points two weights at the same bytes (so that one write would change both, or one
    tensor's bytes are read as another's) is refused on loading, with the file named."""
    weights = text_dir / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    sized = {}
    for name, info in header.items():
        if name != "__metadata__":
            sized.setdefault(info["data_offsets"][1] - info["data_offsets"][0], []).append(name)
    a, b = next(names for names in sized.values() if len(names) >= 2)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])     # same byte count, same bytes
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    weights.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*overlap|overlap.*model\.safetensors"):
        BACKEND_CLASSES[backend]().from_pretrained(str(text_dir))


def test_corrupt_safetensors_is_not_skipped_for_a_tf_file_beside_it(text_dir, tmp_path):
    import backends.torch as bt
    convert(str(text_dir), str(tmp_path / "tf"), to="tf", progress=False)
    shutil.copy(tmp_path / "tf" / "tf_model.h5", text_dir / "tf_model.h5")
    weights = text_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])        # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bt.BlipTextModel.from_pretrained(str(text_dir))
    weights.unlink()                                        # no PyTorch weights at all: the TF file is used
    assert bt.BlipTextModel.from_pretrained(str(text_dir)) is not None


def test_h5_errors_name_the_file(text_dir):
    import backends.torch as bt
    (text_dir / "model.safetensors").unlink()
    (text_dir / "tf_model.h5").write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(CheckpointError, match="tf_model.h5: not a readable HDF5"):
        bt.BlipTextModel.from_pretrained(str(text_dir))


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
def test_a_tied_row_stored_with_other_values_follows_its_owner(tmp_path, backend):
    """A file that also stores a tied row (the LM decoder weight, tied to the word embeddings), with values of
    its own, loads tied: the row is filled from the weight it is tied to, so the model computes what the
    untouched file gives, bit for bit."""
    from blip_core import to_numpy
    from blip_core.checkpoint import read_safetensors, write_safetensors
    d, inp, _ = fixture("BlipForConditionalGeneration")
    out = tmp_path / "m"
    shutil.copytree(d, out)
    state = read_safetensors(out / "model.safetensors")
    owner = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.weight"] = np.random.default_rng(0).standard_normal(
        owner.shape).astype(owner.dtype)
    write_safetensors(out / "model.safetensors", state)
    cls = getattr(__import__(f"backends.{backend}", fromlist=["x"]), "BlipForConditionalGeneration")
    want = to_numpy(cls.from_pretrained(d).stages(**inp)["logits"])
    got = to_numpy(cls.from_pretrained(str(out)).stages(**inp)["logits"])
    assert np.array_equal(got, want)
