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


def _read_safetensors(folder):
    """``(header dict, data buffer)`` of ``folder/model.safetensors``."""
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _raw_safetensors(folder, header: str, body: bytes) -> str:
    """``folder/model.safetensors`` holding ``header`` (JSON, padded to 8 bytes as the format does) and ``body``."""
    raw = header.encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    folder.mkdir(exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return str(path)


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
    header, body = _read_safetensors(text_dir)
    sized = {}
    for name, info in header.items():
        if name != "__metadata__":
            sized.setdefault(info["data_offsets"][1] - info["data_offsets"][0], []).append(name)
    a, b = next(names for names in sized.values() if len(names) >= 2)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])     # same byte count, same bytes
    _raw_safetensors(text_dir, json.dumps(header), body)
    # (the message itself: tmp_path's name holds "overlapping", so the file's path alone would match "overlap")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensors '{a}' and '{b}' overlap in the data buffer"):
        BACKEND_CLASSES[backend]().from_pretrained(str(text_dir))


def test_corrupt_safetensors_is_not_skipped_for_a_tf_file_beside_it(text_dir, tmp_path):
    import backends.torch as bt
    convert(str(text_dir), str(tmp_path / "tf"), to="tf", progress=False)
    shutil.copy(tmp_path / "tf" / "tf_model.h5", text_dir / "tf_model.h5")
    weights = text_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])        # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data_offsets .* go beyond the data buffer"):
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


# -- flax msgpack files ----------------------------------------------------------------------------------------
def _flax_file(leaves: dict, short=None, twice=None, flat=None) -> bytes:
    """A flax_model.msgpack of ``leaves`` ({jax path: array}) written here, byte by byte, as flax lays it out
    (nested maps; each array a msgpack extension holding [shape, dtype name, bytes]); the leaf at ``short``
    keeps its shape but stores half of its bytes, the one at ``twice`` is written twice in its map, the one at
    ``flat`` also at the top level under its "/"-joined path (the flat keys of sharded files)."""
    import msgpack

    from blip_core.formats.flax_msgpack import _EXT_NDARRAY, _tree
    packer = msgpack.Packer(use_bin_type=True)
    tree = _tree((path, (path, np.ascontiguousarray(arr))) for path, arr in leaves.items())
    if flat is not None:
        tree["/".join(flat)] = (flat, np.ascontiguousarray(leaves[flat]))

    def pack(node) -> bytes:
        items = list(node.items())
        items += [(k, v) for k, v in items if not isinstance(v, dict) and v[0] == twice]
        out = packer.pack_map_header(len(items))
        for key, value in items:
            out += packer.pack(key)
            if isinstance(value, dict):
                out += pack(value)
                continue
            path, arr = value
            payload = arr.tobytes()
            payload = payload[: len(payload) // 2] if path == short else payload
            inner = (packer.pack_array_header(3) + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name)
                     + b"\xc6" + struct.pack(">I", len(payload)))
            out += b"\xc9" + struct.pack(">I", len(inner) + len(payload)) + struct.pack("b", _EXT_NDARRAY) + inner + payload
        return out
    return pack(tree)


@pytest.fixture()
def flax_dir(text_dir, tmp_path):
    """The text model as a flax_model.msgpack (and its config) alone, plus its leaves."""
    from blip_core.formats import read_flax_weights
    convert(str(text_dir), str(tmp_path / "flax"), to="jax", progress=False)
    leaves = read_flax_weights(str(tmp_path / "flax"))
    return tmp_path / "flax", leaves


def test_the_tests_flax_writer_writes_loadable_files(flax_dir):
    import backends.torch as bt
    folder, leaves = flax_dir
    want = bt.BlipTextModel.from_pretrained(str(folder)).state_dict()
    (folder / "flax_model.msgpack").write_bytes(_flax_file(leaves))
    got = bt.BlipTextModel.from_pretrained(str(folder)).state_dict()
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)


FLAX_DAMAGE = {
    "trailing bytes": (lambda data, leaves: data + b"\0" * 7, "7 bytes of trailing data"),
    "truncated": (lambda data, leaves: data[:-100], "truncated: the param tree runs 100 bytes past the end"),
    "short payload": (lambda data, leaves: _flax_file(leaves, short=sorted(leaves)[0]), r"holds \d+ bytes, not \d+"),
    "a leaf twice": (lambda data, leaves: _flax_file(leaves, twice=sorted(leaves)[-1]), "appears twice in one map"),
    "a path nested and flat": (lambda data, leaves: _flax_file(leaves, flat=sorted(leaves)[-1]), "is stored twice"),
}


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
@pytest.mark.parametrize("damage", sorted(FLAX_DAMAGE))
def test_a_damaged_flax_file_is_refused_in_every_backend(flax_dir, backend, damage):
    """Extra bytes after the tree, a file cut short, a leaf whose bytes are fewer than its shape needs (read
    as it stands, it would take the following leaves' bytes as its values) and a leaf written twice in its
    map (which one holds the weight?) are refused by name."""
    folder, leaves = flax_dir
    path = folder / "flax_model.msgpack"
    spoil, message = FLAX_DAMAGE[damage]
    path.write_bytes(spoil(path.read_bytes(), leaves))
    with pytest.raises(ValueError, match=message):
        BACKEND_CLASSES[backend]().from_pretrained(str(folder))


# -- safetensors layouts --------------------------------------------------------------------------------------
def _row(dtype, shape, begin, end) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})


_BODY = np.arange(8, dtype="<f4").tobytes()      # 32 bytes
REFUSED_BY_THE_REFERENCE = {
    "a gap before the first tensor": (f'{{"x": {_row("F32", [4], 16, 32)}}}', "bytes 0..16 of the data buffer, "
                                      "before tensor 'x', belong to no tensor"),
    "a gap between tensors": (f'{{"x": {_row("F32", [2], 0, 8)}, "y": {_row("F32", [4], 16, 32)}}}',
                              "bytes 8..16 of the data buffer, before tensor 'y', belong to no tensor"),
    "bytes after the last tensor": (f'{{"x": {_row("F32", [4], 0, 16)}}}', "the last 16 bytes of the data buffer"),
    "a name twice over other bytes": (f'{{"x": {_row("F32", [4], 0, 16)}, "x": {_row("F32", [4], 16, 32)}}}',
                                      "names 'x' twice"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_THE_REFERENCE))
def test_safetensors_layouts_the_reference_reader_refuses_are_refused(tmp_path, case):
    """The safetensors library (the format's reference reader) refuses a buffer with bytes outside every tensor;
    so does this reader, saying where."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    header, message = REFUSED_BY_THE_REFERENCE[case]
    path = _raw_safetensors(tmp_path / "m", header, _BODY)
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_state_dict(str(tmp_path / "m"))


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
def test_a_name_twice_over_the_same_bytes_is_refused_in_every_backend(text_dir, backend):
    """Two header rows for one name over the same bytes, as float32 and as float16: the safetensors library
    keeps the last row silently (it reads the float32 bytes as float16); this reader refuses the file."""
    state = checkpoint.load_state_dict(str(text_dir))
    header, body = _read_safetensors(text_dir)
    name = "embeddings.LayerNorm.weight"
    row = header[name]
    twice = json.dumps(header)[:-1] + f', "{name}": ' + _row("F16", [2 * row["shape"][0]], *row["data_offsets"]) + "}"
    _raw_safetensors(text_dir, twice, body)
    from safetensors.numpy import load_file
    assert load_file(str(text_dir / "model.safetensors"))[name].dtype == np.float16
    with pytest.raises(CheckpointError, match=f"names '{name}' twice"):
        BACKEND_CLASSES[backend]().from_pretrained(str(text_dir))
    assert state[name].dtype == np.float32


# -- tf_model.h5 files ----------------------------------------------------------------------------------------
@pytest.fixture()
def tf_dir(text_dir, tmp_path):
    convert(str(text_dir), str(tmp_path / "tf"), to="tf", progress=False)
    return tmp_path / "tf"


@pytest.mark.parametrize("backend", sorted(BACKEND_CLASSES))
def test_an_h5_weight_listed_by_two_layers_is_refused_in_every_backend(tf_dir, backend):
    """A second layer group that lists a weight another layer holds (with its own data): which one is the
    weight? The file is refused, naming it."""
    import h5py
    with h5py.File(tf_dir / "tf_model.h5", "r+") as f:
        layer = [n.decode() for n in f.attrs["layer_names"]][0]
        full = f[layer].attrs["weight_names"][0].decode()
        f.create_group("copy").attrs["weight_names"] = np.asarray([full.encode()])
        f["copy"].create_dataset(full, data=np.zeros_like(f[layer][full][()]))
        f.attrs["layer_names"] = np.asarray([n for n in f.attrs["layer_names"]] + [b"copy"])
    key = full.split("/", 1)[1].removesuffix(":0")
    with pytest.raises(ValueError, match=f"TF weight '{key}' is stored twice"):
        BACKEND_CLASSES[backend]().from_pretrained(str(tf_dir))


@pytest.fixture()
def split_h5(text_dir, tmp_path, monkeypatch):
    """The text model converted to tf twice: as is, and with a 200-byte attribute limit (lists split)."""
    from blip_core.formats import hf_tf
    convert(str(text_dir), str(tmp_path / "whole"), to="tf", progress=False)
    monkeypatch.setattr(hf_tf, "_HDF5_ATTR_LIMIT", 200)
    convert(str(text_dir), str(tmp_path / "split"), to="tf", progress=False)
    monkeypatch.undo()
    return tmp_path / "whole", tmp_path / "split"


def test_h5_name_lists_above_hdf5s_attribute_limit_are_split_as_keras_reads_them(split_h5):
    """HDF5 attributes hold at most 64 KB, so Keras splits longer name lists over ``weight_names0``,
    ``weight_names1``, ... (BLIP-2 with OPT-2.7b needs it). transformers' own reader of that convention reads
    the split file's names as the unsplit file's."""
    import h5py
    from transformers.modeling_tf_utils import load_attributes_from_hdf5_group
    whole_dir, split_dir = split_h5
    with h5py.File(whole_dir / "tf_model.h5", "r") as whole, h5py.File(split_dir / "tf_model.h5", "r") as split:
        layers = load_attributes_from_hdf5_group(split, "layer_names")
        assert any("weight_names" not in split[la].attrs and "weight_names1" in split[la].attrs for la in layers)
        assert layers == load_attributes_from_hdf5_group(whole, "layer_names")
        for layer in layers:
            assert (load_attributes_from_hdf5_group(split[layer], "weight_names")
                    == load_attributes_from_hdf5_group(whole[layer], "weight_names"))


def test_h5_with_split_name_lists_converts_back_to_its_weights(split_h5, text_dir, tmp_path):
    back = convert(str(split_h5[1]), str(tmp_path / "back"), to="torch", progress=False)
    want = checkpoint.load_state_dict(str(text_dir))
    got = checkpoint.load_state_dict(back.dst)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
