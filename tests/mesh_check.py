"""Run by tests/test_jax_sharding.py in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set before jax
starts): loads tiny BLIP-2 models once on one device and once split over a 4-device "model" axis, and
writes one JSON object of what the test asserts (shardings, per-device bytes, logits differences, ids).

``python tests/mesh_check.py OUT.json CASE...`` with cases ``opt`` (forward, greedy), ``t5`` (greedy),
``opt_beam``, ``t5_full`` (forward, beam), ``blip`` (BLIP captioning, greedy). The models are the committed
fixtures' configs with one layer per tower, feed-forward widths and vocabularies that divide by 4, and
seeded random weights.
"""
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import jax  # noqa: E402
from flax import traverse_util  # noqa: E402

import backends.jax as J  # noqa: E402
from blip_core.sharding import partition_specs  # noqa: E402
from blip_core.weights import weight_table  # noqa: E402
from fixture_utils import fixture  # noqa: E402

SMALLER = {  # per sub-config: one layer, widths and vocabularies divisible by 4 (so every rule really splits)
    "vision_config": dict(num_hidden_layers=1, intermediate_size=64),
    "qformer_config": dict(num_hidden_layers=1, intermediate_size=64, vocab_size=100),
    "text_config": dict(vocab_size=100, num_hidden_layers=1, ffn_dim=64, num_layers=1, num_decoder_layers=1,
                        d_ff=64, intermediate_size=64),
}


def _config(fixture_name):
    d, inputs, _ = fixture(fixture_name)
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    for sub, changes in SMALLER.items():      # the language model takes the names its kind has
        cfg[sub].update({k: v for k, v in changes.items() if sub != "text_config" or k in cfg[sub]})
    return cfg, inputs


def _models(cls, cfg, mesh, seed=0):
    """(one-device model, model split over ``mesh``), both loaded from one saved checkpoint."""
    model = cls(cfg, seed=seed)
    rng = np.random.default_rng(seed)          # the seeded init keeps the ViT near zero: use visible weights
    flat = traverse_util.flatten_dict(model.params)
    model.params = traverse_util.unflatten_dict(
        {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in flat.items()})
    path = tempfile.mkdtemp(prefix="mesh_check_")
    model.save_pretrained(path)
    return cls.from_pretrained(path), cls.from_pretrained(path, mesh=mesh)


def _leaf(params, path):
    for k in path:
        params = params[k]
    return params


def _sharding(arr):
    shards = sorted(arr.addressable_shards, key=lambda s: s.device.id)
    spec = [None if a is None else str(a) for a in arr.sharding.spec]
    return {"spec": spec + [None] * (arr.ndim - len(spec)),
            "shard_shapes": [list(s.data.shape) for s in shards], "devices": sorted(s.device.id for s in shards),
            "global_shape": list(arr.shape)}


def _bytes_per_device(params):
    per = {}
    for leaf in jax.tree_util.tree_leaves(params):
        for s in leaf.addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    return per


def _expected_bytes(cfg, model):
    """Per-device bytes the spec layer's rule implies: split params / 4, the rest whole."""
    specs, _ = partition_specs(weight_table(type(model).__name__, model.config), "jax", 4)
    flat = traverse_util.flatten_dict(model.params)
    return int(sum(a.nbytes // (4 if any(specs[p]) else 1) for p, a in flat.items()))


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def blip2_case(case, mesh):
    t5 = case.startswith("t5")
    cfg, inputs = _config("Blip2Model" if t5 else "Blip2ForConditionalGeneration")
    one, split = _models(J.Blip2ForConditionalGeneration, cfg, mesh)
    lm = ("language_model", "decoder", "block_0", "layer_2", "DenseReluDense", "wi_0", "kernel") if t5 else \
        ("language_model", "model", "decoder", "layers_0", "fc1", "kernel")
    emb = ("language_model", "shared", "embedding") if t5 else \
        ("language_model", "model", "decoder", "embed_tokens", "embedding")
    out = {"mlp_kernel": _sharding(_leaf(split.params, lm)),
           "vision_qkv": _sharding(_leaf(split.params, ("vision_model", "encoder", "layers_0", "self_attn", "qkv",
                                                        "kernel"))),
           "qformer_out": _sharding(_leaf(split.params, ("qformer", "encoder", "layer_0", "attention", "output",
                                                         "dense", "kernel"))),
           "embedding": _sharding(_leaf(split.params, emb)),
           "one_device_params": sorted({d.id for a in jax.tree_util.tree_leaves(one.params) for d in a.devices()}),
           "bytes_per_device": _bytes_per_device(split.params),
           "expected_bytes_per_device": _expected_bytes(cfg, one),
           "total_bytes": int(sum(a.nbytes for a in jax.tree_util.tree_leaves(one.params)))}
    kw = dict(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
              attention_mask=inputs["attention_mask"])
    if case in ("opt", "t5_full"):
        fwd = dict(kw, decoder_input_ids=inputs["decoder_input_ids"]) if t5 else kw
        a, b = one(**fwd), split(**fwd)
        out["logits_diff"] = _diff(a.logits, b.logits)
        out["logits_scale"] = float(np.abs(np.asarray(a.logits)).max())
        out["logits_devices"] = sorted(d.id for d in b.logits.devices())
    beams = {"opt": (1,), "opt_beam": (3,), "t5": (1,), "t5_full": (3,)}[case]
    for n in beams:
        ids_one = np.asarray(one.generate(**kw, max_new_tokens=6, num_beams=n))
        traced = split.trace_count("generate")
        ids_split = np.asarray(split.generate(**kw, max_new_tokens=6, num_beams=n))
        again = np.asarray(split.generate(**kw, max_new_tokens=6, num_beams=n))
        out[f"ids_{n}"] = {"one": ids_one.tolist(), "split": ids_split.tolist(), "again": again.tolist(),
                           "traces": split.trace_count("generate") - traced}
    return out


def blip_case(mesh):
    d, inputs, _ = fixture("BlipForConditionalGeneration")
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["vision_config"].update(num_hidden_layers=1, intermediate_size=64)
    cfg["text_config"].update(num_hidden_layers=1, intermediate_size=64, vocab_size=100)
    one, split = _models(J.BlipForConditionalGeneration, cfg, mesh)
    kw = dict(pixel_values=inputs["pixel_values"])
    return {"word_embeddings": _sharding(_leaf(split.params, ("text_decoder", "bert", "embeddings", "word_embeddings",
                                                              "embedding"))),
            "ids_1": {"one": np.asarray(one.generate(**kw, max_new_tokens=6)).tolist(),
                      "split": np.asarray(split.generate(**kw, max_new_tokens=6)).tolist()}}


def main():
    out_path, cases = sys.argv[1], sys.argv[2:]
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("model",))
    result = {"devices": jax.device_count()}
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        for case in cases:
            result[case] = blip_case(mesh) if case == "blip" else blip2_case(case, mesh)
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
