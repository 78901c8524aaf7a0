"""Tensor-parallel inference over a 4-device mesh (``from_pretrained(..., mesh=)`` / ``model.shard``).

The partitioning rule is the spec layer's (``blip_core.sharding``), checked here by name and layout. The
device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax starts, so they run
``tests/mesh_check.py`` in a subprocess: tiny BLIP-2 OPT and T5 models (the fixtures' configs, one layer
per tower, widths divisible by 4) loaded once on one device and once split over 4 CPU devices. The
reference is the one-device run of the same backend (the one-device numbers are themselves checked against
transformers in test_jax_blip2*.py): identical greedy and beam ids, logits within the float32 tolerance.
"""
import json
import os
import subprocess
import sys

import pytest

from blip_core.configs import load_config
from blip_core.numerics import tolerance
from blip_core.sharding import COLUMN, REPLICATED, ROW, VOCAB, partition_specs, role
from blip_core.weights import weight_table
from fixture_utils import MODELS, ROOT, require

require("jax")
ATOL = tolerance("default", "float32")[0]


@pytest.mark.parametrize("name, expected", [
    ("vision_model.encoder.layers.0.self_attn.qkv.weight", COLUMN),
    ("vision_model.encoder.layers.0.self_attn.qkv.bias", COLUMN),
    ("vision_model.encoder.layers.0.self_attn.projection.weight", ROW),
    ("vision_model.encoder.layers.0.mlp.fc1.bias", COLUMN),
    ("vision_model.encoder.layers.0.mlp.fc2.weight", ROW),
    ("qformer.encoder.layer.0.crossattention.attention.key.weight", COLUMN),
    ("qformer.encoder.layer.0.attention.output.dense.weight", ROW),
    ("qformer.encoder.layer.0.intermediate_query.dense.weight", COLUMN),
    ("qformer.encoder.layer.0.output_query.dense.weight", ROW),
    ("qformer.encoder.layer.0.output_query.LayerNorm.weight", REPLICATED),
    ("language_model.model.decoder.layers.1.self_attn.v_proj.bias", COLUMN),
    ("language_model.model.decoder.layers.1.self_attn.out_proj.weight", ROW),
    ("language_model.model.decoder.layers.1.fc1.weight", COLUMN),
    ("language_model.model.decoder.layers.1.fc2.weight", ROW),
    ("language_model.model.decoder.embed_tokens.weight", VOCAB),
    ("language_model.model.decoder.embed_positions.weight", REPLICATED),
    ("language_model.lm_head.weight", VOCAB),
    ("language_model.encoder.block.0.layer.0.SelfAttention.q.weight", COLUMN),
    ("language_model.encoder.block.0.layer.0.SelfAttention.o.weight", ROW),
    ("language_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", REPLICATED),
    ("language_model.decoder.block.0.layer.1.EncDecAttention.k.weight", COLUMN),
    ("language_model.decoder.block.0.layer.2.DenseReluDense.wi_1.weight", COLUMN),
    ("language_model.decoder.block.0.layer.2.DenseReluDense.wo.weight", ROW),
    ("language_model.shared.weight", VOCAB),
    ("text_decoder.bert.encoder.layer.0.attention.self.query.weight", COLUMN),
    ("text_decoder.bert.encoder.layer.0.output.dense.bias", ROW),
    ("text_decoder.cls.predictions.bias", VOCAB),
    ("text_decoder.cls.predictions.transform.dense.weight", REPLICATED),
    ("language_projection.weight", REPLICATED),
    ("query_tokens", REPLICATED),
])
def test_roles_by_name(name, expected):
    assert role(name) == expected


@pytest.mark.parametrize("arch", ["Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
                                  "BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_partition_specs_follow_each_backends_layout(arch):
    """Column = output features: canonical (out, in) dim 0, the jax/tf kernel's (in, out) dim 1; row the other
    way; a row-parallel bias stays whole; a dimension that does not divide is replicated and reported."""
    table = weight_table(arch, load_config(os.path.join(MODELS, arch)))
    torch_specs, uneven = partition_specs(table, "torch", 4)
    jax_specs, _ = partition_specs(table, "jax", 4)
    split = 0
    for spec in table.values():
        if spec.tied_to is not None:
            continue
        t, j = torch_specs[spec.name], jax_specs[spec.backend_path("jax")]
        assert len(t) == len(spec.shape) and len(j) == len(spec.backend_shape("jax"))
        r = role(spec.name)
        if spec.name in uneven or r == REPLICATED or (r == ROW and len(spec.shape) == 1):
            assert not any(t) and not any(j), spec.name
            continue
        split += 1
        dim = 1 if r == ROW else 0
        assert t == tuple("model" if i == dim else None for i in range(len(t))), spec.name
        assert spec.shape[dim] % 4 == 0
        if spec.kind == "linear_weight":
            assert j == t[::-1], spec.name
    assert split >= 20
    assert all(spec.shape[1 if role(spec.name) == ROW else 0] % 4 for spec in (table[n] for n in uneven))


def _run_mesh_check(tmp_path, cases, timeout=900):
    out = tmp_path / "mesh.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_check.py"), str(out), *cases],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 4
    return result


def _split_over_4(s, dim):
    assert s["devices"] == [0, 1, 2, 3]
    assert s["spec"][dim] == "model" and all(a is None for i, a in enumerate(s["spec"]) if i != dim)
    want = list(s["global_shape"])
    want[dim] //= 4
    assert s["shard_shapes"] == [want] * 4


def _check_blip2(r, beams):
    _split_over_4(r["mlp_kernel"], 1)            # fc1 / wi_0 kernel (in, out): output features split
    _split_over_4(r["vision_qkv"], 1)
    _split_over_4(r["qformer_out"], 0)           # row-parallel attention output: input features split
    _split_over_4(r["embedding"], 0)             # vocabulary rows
    assert r["one_device_params"] == [0]
    per_device = r["bytes_per_device"]
    assert sorted(per_device) == ["0", "1", "2", "3"]
    assert all(b == r["expected_bytes_per_device"] < r["total_bytes"] * 0.6 for b in per_device.values())
    if "logits_diff" in r:
        assert r["logits_devices"] == [0, 1, 2, 3]
        assert r["logits_diff"] <= ATOL and r["logits_scale"] > 0.1
    for n in beams:
        ids = r[f"ids_{n}"]
        assert ids["split"] == ids["one"] == ids["again"], n
        assert ids["traces"] == 1                  # one compiled program, not traced again on the second call
        assert len(ids["one"]) == 2 and len(set(ids["one"][0][-6:])) >= 1


def test_blip2_opt_and_t5_over_four_devices_match_one_device(tmp_path):
    """OPT: forward logits and greedy ids; T5: greedy ids; each split over 4 devices vs one device."""
    result = _run_mesh_check(tmp_path, ["opt", "t5"])
    _check_blip2(result["opt"], (1,))
    _check_blip2(result["t5"], (1,))


@pytest.mark.slow
def test_beam_search_t5_forward_and_blip_over_four_devices(tmp_path):
    """Beam ids of OPT and T5, T5's forward logits, BLIP captioning: split over 4 devices vs one device."""
    result = _run_mesh_check(tmp_path, ["opt_beam", "t5_full", "blip"])
    _check_blip2(result["opt_beam"], (3,))
    _check_blip2(result["t5_full"], (3,))
    _split_over_4(result["blip"]["word_embeddings"], 0)
    assert result["blip"]["ids_1"]["split"] == result["blip"]["ids_1"]["one"]


def test_mesh_errors():
    jax = require("jax")
    import numpy as np
    from jax.sharding import Mesh

    import backends.jax as J
    model = J.BlipVisionModel(load_config(os.path.join(MODELS, "BlipVisionModel")))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="'model'"):
        model.shard(mesh)
    with pytest.raises(ValueError, match="jax.sharding.Mesh"):
        model.shard("model")
    with pytest.raises(ValueError, match="mesh or device"):
        J.BlipVisionModel.from_pretrained(os.path.join(MODELS, "BlipVisionModel"), device="cuda:0",
                                          mesh=Mesh(np.array(jax.devices()[:1]), ("model",)))
    one = model.shard(Mesh(np.array(jax.devices()[:1]), ("model",)))   # a 1-device mesh is a valid mesh
    assert one.mesh is not None and one.astype("bfloat16").mesh is one.mesh


def test_half_precision_loading_onto_a_mesh_casts_on_the_host():
    """float16 BLIP-2 keeps the Q-Former and query tokens float32 (transformers' rule) on the mesh path too."""
    jax = require("jax")
    import numpy as np
    from jax.sharding import Mesh

    import backends.jax as J
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    path = os.path.join(MODELS, "Blip2ForConditionalGeneration")
    for dtype, kept in (("float16", "float32"), ("bfloat16", "bfloat16")):
        model = J.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, mesh=mesh)
        plain = J.Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
        for top, leaves in model.params.items():
            want = kept if top in ("qformer", "query_tokens") else dtype
            for a, b in zip(jax.tree_util.tree_leaves(leaves), jax.tree_util.tree_leaves(plain.params[top])):
                assert a.dtype == np.dtype(want) == b.dtype, top
                assert isinstance(a.sharding, jax.sharding.NamedSharding)
                np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("arch", ["BlipVisionModel", "BlipForConditionalGeneration", "Blip2VisionModel"])
def test_loading_onto_a_mesh_gives_every_leaf_the_dtype_asked_for(arch):
    """A float32 file loaded with ``dtype="bfloat16"`` onto a mesh: every leaf is bfloat16, holding the file's values
    cast once (numpy's cast of the checkpoint, laid out as the one-device load lays it out)."""
    jax = require("jax")
    import numpy as np
    from flax import traverse_util
    from jax.sharding import Mesh

    import backends.jax as J
    path = os.path.join(MODELS, arch)
    dtype = "bfloat16"
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    model = getattr(J, arch).from_pretrained(path, dtype=dtype, mesh=mesh)
    plain = traverse_util.flatten_dict(getattr(J, arch).from_pretrained(path).params)     # float32, as stored
    got = traverse_util.flatten_dict(model.params)
    assert set(got) == set(plain)
    for k, v in got.items():
        assert v.dtype == np.dtype(dtype), k
        assert isinstance(v.sharding, jax.sharding.NamedSharding)
        np.testing.assert_array_equal(np.asarray(v, np.float32),
                                      np.asarray(plain[k]).astype(dtype).astype(np.float32), err_msg=str(k))


@pytest.mark.parametrize("arch", ["BlipVisionModel", "Blip2ForConditionalGeneration"])
def test_shard_over_a_mesh_axis_of_another_name(arch):
    """``shard(mesh, axis="tp")``: the params are split over that axis (the spec layer's specs for that
    name), and the model's outputs stay those of the unsplit model."""
    jax = require("jax")
    import numpy as np
    from flax import traverse_util
    from jax.sharding import Mesh

    import backends.jax as J
    config = load_config(os.path.join(MODELS, arch))
    model = getattr(J, arch)(config, seed=0)
    before = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(model.params).items()}
    model.shard(Mesh(np.array(jax.devices()[:1]), ("tp",)), axis="tp")
    want, _ = partition_specs(weight_table(arch, config), "jax", 1, "tp")
    got = traverse_util.flatten_dict(model.params)
    assert set(got) == set(want) == set(before)
    assert sum("tp" in s for s in want.values()) >= 4
    for k, v in got.items():
        assert v.sharding.mesh.axis_names == ("tp",), k
        assert tuple(v.sharding.spec) + (None,) * (v.ndim - len(v.sharding.spec)) == want[k], k
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=str(k))
