"""Checkpoint conversion (converters.convert, blip_core.formats).

References: the committed fixtures (written by transformers' save_pretrained), transformers' own
TF BLIP classes (tf_model.h5 written by them, and loading ours), flax.serialization, torch.save
and torch's bicubic interpolate. Nothing here needs our backends.
"""
import importlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blip_core import checkpoint
from blip_core.configs import load_config
from blip_core.formats import (flax_msgpack, hf_tf, open_tf_weights, read_flax_state_dict, read_flax_weights,
                               read_tf_state_dict)
from blip_core.pretrained import config_for
from blip_core.weights import weight_table
from converters import convert
from converters.cli import main as cli_main
from fixture_utils import CLASSES, MODELS, require

convert_module = importlib.import_module("converters.convert")   # the module, not the function
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_CLASSES = ["BlipVisionModel", "BlipTextModel", "BlipModel", "BlipForConditionalGeneration",
              "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]


def fx(name):
    return os.path.join(MODELS, name)


def state(path):
    return checkpoint.load_state_dict(path)


def assert_same_state(got: dict, want: dict):
    assert list(got) == list(want) or set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


def table_of(path):
    cfg = load_config(path)
    arch = cfg.architectures[0]
    return arch, weight_table(arch, config_for(arch, cfg))


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASSES)
def test_round_trip_torch_tf_jax_torch_is_bit_exact(name, tmp_path):
    src = fx(name)
    r1 = convert(src, tmp_path / "tf", to="tf")
    r2 = convert(tmp_path / "tf", tmp_path / "jax", to="jax")
    r3 = convert(tmp_path / "jax", tmp_path / "pt", to="torch")
    assert r1.verified and r2.verified and r3.verified
    assert (r1.files, r2.files, r3.files) == (["tf_model.h5"], ["flax_model.msgpack"], ["model.safetensors"])
    # transformers' own file, reproduced byte for byte (same names, order, header and data)
    with open(os.path.join(src, "model.safetensors"), "rb") as a, open(tmp_path / "pt" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert load_config(tmp_path / "pt").to_dict() == load_config(src).to_dict()
    # the eager readers a loader can use: canonical state dicts that pass the strict table check
    arch, table = table_of(src)
    want = checkpoint.check_state_dict(state(src), table)
    for got in (read_tf_state_dict(tmp_path / "tf", table, arch), read_flax_state_dict(tmp_path / "jax", table)):
        assert_same_state(checkpoint.check_state_dict(got, table), want)
    assert "inputs.npz" in r1.copied and "model.safetensors" not in r1.copied


def test_sharded_outputs_round_trip(tmp_path):
    src = fx("BlipForConditionalGeneration")
    for to, index in (("torch", "model.safetensors.index.json"), ("tf", "tf_model.h5.index.json"),
                      ("jax", "flax_model.msgpack.index.json")):
        r = convert(src, tmp_path / to, to=to, max_shard_size="40KB")
        assert index in r.files and len(r.files) > 3, r.files
        back = convert(tmp_path / to, tmp_path / f"{to}-back", to="torch")
        assert back.files == ["model.safetensors"]
        assert_same_state(state(tmp_path / f"{to}-back"), state(src))
    # our torch shards follow transformers' rule (state-dict order): as checkpoint.save_state_dict splits them
    _, table = table_of(src)
    ordered = checkpoint.strip_tied(checkpoint.check_state_dict(state(src), table), table)
    ref = checkpoint.save_state_dict(tmp_path / "ref", ordered, max_shard_size="40KB")
    for f in ref:
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "torch" / f).read_bytes(), f


def test_dtype_cast_and_bfloat16_limits(tmp_path):
    import ml_dtypes
    src = fx("Blip2VisionModel")
    convert(src, tmp_path / "jax", to="jax", dtype="bfloat16")
    leaves = read_flax_weights(tmp_path / "jax")
    assert {a.dtype for a in leaves.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert load_config(tmp_path / "jax").extra["torch_dtype"] == "bfloat16"
    back = state(convert(tmp_path / "jax", tmp_path / "pt", to="torch").dst)
    want = checkpoint.cast_state_dict(state(src), "bfloat16")
    assert_same_state(back, want)
    with pytest.raises(ValueError, match="bfloat16"):   # HDF5 has no bfloat16: refused before writing
        convert(tmp_path / "pt", tmp_path / "tf", to="tf")
    assert not (tmp_path / "tf").exists()


# -- Hugging Face TF interop (transformers' TF BLIP in a subprocess: tf-keras) -----------------------------
_TF_SCRIPT = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import transformers as T

work, jobs = sys.argv[1], json.loads(sys.argv[2])

def run(model, name, x):
    if name == "BlipVisionModel":
        o = model(pixel_values=x["pixel_values"])
        return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
    if name == "BlipTextModel":
        o = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                  encoder_hidden_states=x["encoder_hidden_states"])
        return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
    if name == "BlipModel":
        o = model(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"])
        return {"logits_per_image": o.logits_per_image, "text_embeds": o.text_embeds, "image_embeds": o.image_embeds}
    if name == "BlipForConditionalGeneration":
        o = model(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        return {"logits": o.logits}
    if name == "BlipForImageTextRetrieval":
        args = dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"])
        return {"itm_score": model(**args, use_itm_head=True).itm_score,
                "cosine": model(**args, use_itm_head=False).itm_score}
    if name == "BlipForQuestionAnswering":   # the committed golden: greedy ids of transformers' PyTorch
        return {"greedy_ids": model.generate(input_ids=x["input_ids"].astype(np.int32), pixel_values=x["pixel_values"],
                                             max_new_tokens=5)}
    raise ValueError("no outputs to compare for " + name)

out = {}
for label, name, fixture, ours in jobs:
    cls = getattr(T, "TF" + name)
    x = dict(np.load(os.path.join(fixture, "inputs.npz")))
    ref = dict(np.load(os.path.join(fixture, "reference.npz")))
    res = {}
    cfg = {"BlipVisionModel": T.BlipVisionConfig, "BlipTextModel": T.BlipTextConfig}.get(name, T.BlipConfig)
    cfg = cfg.from_pretrained(fixture)
    getattr(cfg, "vision_config", cfg).num_channels = 3   # TF BLIP's input signature needs it
    if ours is None:   # transformers' own PyTorch -> TF conversion, saved as tf_model.h5
        model = cls.from_pretrained(fixture, config=cfg, from_pt=True)
        model.save_pretrained(os.path.join(work, "hf_tf", name))
    else:              # our tf_model.h5, loaded by transformers' TF class
        model, info = cls.from_pretrained(ours, config=cfg, output_loading_info=True)
        res["loading_info"] = {k: [str(i) for i in v] for k, v in info.items()}
    res["max_abs"] = {k: float(np.max(np.abs(np.asarray(v) - ref[k]))) if np.shape(v) == ref[k].shape else float("inf")
                      for k, v in run(model, name, x).items()}
    out[label] = res
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tf_interop(tmp_path_factory):
    """Run transformers' TF BLIP once for all TF tests: its own h5 files and ours, loaded and run."""
    require("tf_keras")
    work = tmp_path_factory.mktemp("tf_interop")
    jobs = []
    for name in TF_CLASSES:
        convert(fx(name), work / "ours_tf" / name, to="tf")
        jobs += [[f"hf:{name}", name, fx(name), None], [f"ours:{name}", name, fx(name), str(work / "ours_tf" / name)]]
    sharded = work / "ours_tf_sharded"
    convert(fx("BlipForConditionalGeneration"), sharded, to="tf", max_shard_size="40KB")
    jobs.append(["ours-sharded:BlipForConditionalGeneration", "BlipForConditionalGeneration",
                 fx("BlipForConditionalGeneration"), str(sharded)])
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", USE_FLAX="0", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="-1")
    proc = subprocess.run([sys.executable, "-c", _TF_SCRIPT, str(work), json.dumps(jobs)], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return work, json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("name", TF_CLASSES)
def test_tf_names_are_those_transformers_writes(name, tf_interop):
    work, _ = tf_interop
    arch, table = table_of(fx(name))
    with open_tf_weights(work / "hf_tf" / name) as h5:
        assert set(h5.keys()) == set(hf_tf.tf_names(table, arch).values())


@pytest.mark.parametrize("name", TF_CLASSES)
def test_transformers_tf_h5_converts_to_the_source_pytorch_weights(name, tf_interop, tmp_path):
    work, _ = tf_interop
    report = convert(work / "hf_tf" / name, tmp_path / "pt", to="torch")
    assert report.source_format == "tf"
    assert_same_state(state(tmp_path / "pt"), state(fx(name)))
    tied_note = any("cls.predictions.decoder.weight" in n and "tie wins" in n for n in report.notes)
    # transformers' TF BLIP leaves the LM decoder random when it loads PyTorch safetensors
    assert tied_note == (name in ("BlipForConditionalGeneration", "BlipForQuestionAnswering"))


@pytest.mark.parametrize("name", TF_CLASSES)
def test_our_tf_h5_loads_in_transformers_tf_and_matches_pytorch(name, tf_interop):
    _, results = tf_interop
    ours = results[f"ours:{name}"]
    assert all(not v for v in ours["loading_info"].values()), ours["loading_info"]
    assert ours["max_abs"], "no outputs compared"
    for key, diff in ours["max_abs"].items():
        assert diff <= 1e-4, (key, diff)
    if name == "BlipForQuestionAnswering":
        assert ours["max_abs"]["greedy_ids"] == 0
    if name == "BlipForConditionalGeneration":
        assert "logits" in ours["max_abs"]
        # the bug we fix: transformers' own conversion has an untied, random LM head
        assert results[f"hf:{name}"]["max_abs"]["logits"] > 1e-2
        sharded = results["ours-sharded:BlipForConditionalGeneration"]
        assert not any(sharded["loading_info"].values()) and sharded["max_abs"]["logits"] <= 1e-4


# -- sources: .bin, original BLIP, LAVIS BLIP-2 --------------------------------------------------------------
def _torch_save(sd: dict, path, wrap: bool = False):
    """torch.save a numpy state dict, optionally wrapped as Salesforce/LAVIS do ({"model": ..., "epoch": ...})."""
    import torch
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    torch.save({"model": tensors, "epoch": 3} if wrap else tensors, path)


def test_bin_with_tied_duplicates_needs_opt_in(tmp_path):
    src = fx("BlipForConditionalGeneration")
    sd = state(src)
    full = dict(sd, **{"text_decoder.cls.predictions.decoder.weight": sd["text_decoder.bert.embeddings.word_embeddings.weight"],
                       "text_decoder.cls.predictions.decoder.bias": sd["text_decoder.cls.predictions.bias"]})
    os.makedirs(tmp_path / "bin")
    _torch_save(full, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((open(os.path.join(src, "config.json")).read()))
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle_bin"):
        convert(tmp_path / "bin", tmp_path / "out", to="jax")
    convert(tmp_path / "bin", tmp_path / "out", to="jax", allow_pickle_bin=True)
    convert(tmp_path / "out", tmp_path / "pt", to="torch")
    assert_same_state(state(tmp_path / "pt"), sd)
    # sharded .bin (transformers' index format), read a shard at a time
    os.makedirs(tmp_path / "bins")
    names = list(full)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        _torch_save({k: full[k] for k in part}, tmp_path / "bins" / f"pytorch_model-0000{i + 1}-of-00002.bin")
        weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00002.bin" for k in part})
    (tmp_path / "bins" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "bins" / "config.json").write_text((tmp_path / "bin" / "config.json").read_text())
    convert(tmp_path / "bins", tmp_path / "pt2", to="torch", allow_pickle_bin=True)
    assert_same_state(state(tmp_path / "pt2"), sd)


def _original_blip_names(sd: dict) -> dict:
    """The Salesforce BLIP names of a Hugging Face BLIP state dict (the inverse of the documented renaming)."""
    rules = [("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
             ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
             ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
             ("vision_model.post_layernorm.", "visual_encoder.norm."),
             ("vision_model.encoder.layers.", "visual_encoder.blocks."), (".self_attn.projection.", ".attn.proj."),
             (".self_attn.qkv.", ".attn.qkv."), (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2.")]
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["BlipForConditionalGeneration", "BlipForImageTextRetrieval"])
def test_original_blip_pth_converts_to_the_hf_weights(name, tmp_path):
    src = fx(name)
    sd = state(src)
    orig = _original_blip_names(sd)
    assert not any(k.startswith("vision_model") for k in orig)
    rng = np.random.default_rng(0)
    # what a Salesforce checkpoint also holds: momentum encoder, queues, temperature, buffers
    orig["visual_encoder_m.cls_token"] = orig["visual_encoder.cls_token"]
    orig["image_queue"] = rng.standard_normal((4, 8)).astype(np.float32)
    orig["temp"] = np.array(0.07, np.float32)
    prefix = "text_decoder.bert" if name == "BlipForConditionalGeneration" else "text_encoder"
    orig[f"{prefix}.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
    if name == "BlipForConditionalGeneration":   # .pth files hold the tied decoder too
        orig["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
        orig["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    _torch_save(orig, tmp_path / "model_base.pth", wrap=True)
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle_bin"):
        convert(tmp_path / "model_base.pth", tmp_path / "out", to="torch", config=src)
    report = convert(tmp_path / "model_base.pth", tmp_path / "out", to="torch", config=src, allow_pickle_bin=True)
    assert report.source_format == "original" and any("left out 4" in n for n in report.notes), report.notes
    assert_same_state(state(tmp_path / "out"), sd)


def test_original_at_another_resolution_resizes_like_torch_bicubic(tmp_path):
    import torch
    src = fx("BlipVisionModel")   # 32 px, patch 8: a 4x4 grid
    sd = state(src)
    orig = _original_blip_names({f"vision_model.{k}": v for k, v in sd.items()})
    rng = np.random.default_rng(1)
    low = rng.standard_normal((1, 1 + 2 * 2, sd["embeddings.class_embedding"].shape[-1])).astype(np.float32)
    orig["visual_encoder.pos_embed"] = low      # trained at 16 px: a 2x2 grid
    _torch_save(orig, tmp_path / "vit.pth")
    report = convert(tmp_path / "vit.pth", tmp_path / "out", to="torch", config=src, allow_pickle_bin=True)
    assert any("resized embeddings.position_embedding" in n for n in report.notes)
    got = state(tmp_path / "out")["embeddings.position_embedding"]
    grid = torch.from_numpy(low[0, 1:].reshape(2, 2, -1)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    want = want[0].permute(1, 2, 0).reshape(1, 16, -1).numpy()
    np.testing.assert_array_equal(got[:, :1], low[:, :1])
    # PyTorch's compiled kernel fuses some multiply-adds, so agreement is to float32 rounding, not bits
    np.testing.assert_allclose(got[:, 1:], want, atol=1e-6, rtol=0)
    # --image-size on a Hugging Face checkpoint: same resize, config updated
    convert(src, tmp_path / "48", to="jax", image_size=48)
    assert load_config(tmp_path / "48").image_size == 48
    assert read_flax_weights(tmp_path / "48")[("embeddings", "position_embedding")].shape == (1, 37, 32)


def test_lavis_blip2_qv_bias_fusion_and_language_model_file(tmp_path):
    src = fx("Blip2ForConditionalGeneration")
    sd = state(src)
    rng = np.random.default_rng(2)
    d = sd["vision_model.embeddings.class_embedding"].shape[-1]
    lavis, want = {}, dict(sd)
    for k, v in sd.items():
        if k.endswith("self_attn.qkv.bias"):
            i = k.split(".")[3]
            q, vb = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
            lavis[f"visual_encoder.blocks.{i}.attn.q_bias"], lavis[f"visual_encoder.blocks.{i}.attn.v_bias"] = q, vb
            want[k] = np.concatenate([q, np.zeros(d, np.float32), vb])
            continue
        n = _original_blip_names({k: v})
        (k2,) = n
        k2 = (k2.replace("visual_encoder.norm.", "ln_vision.").replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
              .replace("qformer.", "Qformer.bert.").replace("attention.attention.", "attention.self.")
              .replace("language_projection.", "opt_proj.").replace("language_model.", "opt_model."))
        lavis[k2] = v
    assert "ln_vision.weight" in lavis and "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    lavis["Qformer.cls.predictions.bias"] = np.zeros(99, np.float32)   # Q-Former LM head: unused here
    _torch_save(lavis, tmp_path / "blip2_opt.pth", wrap=True)
    convert(tmp_path / "blip2_opt.pth", tmp_path / "out", to="torch", config=src, allow_pickle_bin=True)
    assert_same_state(state(tmp_path / "out"), want)
    # LAVIS checkpoints leave the frozen LM out: take it from a Hugging Face OPT checkpoint
    no_lm = {k: v for k, v in lavis.items() if not k.startswith("opt_model.")}
    _torch_save(no_lm, tmp_path / "nolm.pth")
    with pytest.raises(checkpoint.StateDictMismatchError, match="language_model.model.decoder"):
        convert(tmp_path / "nolm.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True)
    checkpoint.save_state_dict(tmp_path / "opt", {k[len("language_model."):]: v for k, v in sd.items()
                                                  if k.startswith("language_model.")})
    convert(tmp_path / "nolm.pth", tmp_path / "x", to="torch", config=src, allow_pickle_bin=True,
            language_model=tmp_path / "opt")
    assert_same_state(state(tmp_path / "x"), want)


# -- strictness, atomicity, verification -------------------------------------------------------------------
def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_strict_mismatch_lists_every_problem_and_leaves_nothing(tmp_path):
    src = fx("BlipVisionModel")
    sd = state(src)
    del sd["post_layernorm.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["embeddings.patch_embedding.weight"] = sd["embeddings.patch_embedding.weight"][:-1]
    checkpoint.save_state_dict(tmp_path / "bad", sd)
    (tmp_path / "bad" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(checkpoint.StateDictMismatchError) as err:
        convert(tmp_path / "bad", tmp_path / "out", to="tf")
    msg = str(err.value)
    assert "post_layernorm.bias" in msg and "extra.weight" in msg and "embeddings.patch_embedding.weight" in msg
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_failure_mid_write_or_in_verification_leaves_no_output(tmp_path, monkeypatch):
    src = fx("BlipForImageTextRetrieval")
    real = convert_module.write_target

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk full")
    monkeypatch.setattr(convert_module, "write_target", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "out", to="jax")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    monkeypatch.setattr(convert_module, "write_target", real)
    monkeypatch.setattr(convert_module, "_sha256", lambda arr, n=iter(range(10 ** 6)): str(next(n)))
    with pytest.raises(convert_module.ConversionError, match="checksum"):
        convert(src, tmp_path / "out", to="tf")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("to", ["torch", "tf", "jax"])
def test_a_tensor_written_with_other_bytes_fails_verification(to, tmp_path, monkeypatch):
    """The writer stores other values than the ones fetched, with the same name, shape and dtype: only
    the SHA-256 of the re-read tensor can tell, and the destination never appears."""
    src = fx("BlipVisionModel")
    real, victim = convert_module.write_target, "post_layernorm.weight"

    def write_altered(target, directory, rows, fetch, *args, **kwargs):
        def altered(name):
            arr = fetch(name)
            if name == victim:
                arr = arr.copy()
                arr.reshape(-1)[0] += 1
            return arr
        return real(target, directory, rows, altered, *args, **kwargs)
    monkeypatch.setattr(convert_module, "write_target", write_altered)
    with pytest.raises(convert_module.ConversionError, match=f"{victim}: checksum differs"):
        convert(src, tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("name", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_a_tied_row_written_to_safetensors_fails_verification(name, tmp_path, monkeypatch):
    """PyTorch checkpoints leave tied rows out (as transformers writes them): a writer that stores the
    LM head beside the word embeddings it is tied to writes a file the check names as unexpected."""
    src = fx(name)
    _, table = table_of(src)
    tied = sorted(n for n, s in table.items() if s.tied_to is not None)[0]
    owner = table[tied].tied_to
    real = convert_module.write_target

    def write_tied_too(target, directory, rows, fetch, *args, **kwargs):
        dtype = next(d for n, _, d in rows if n == owner)
        rows = rows + [(tied, tuple(table[tied].shape), dtype)]
        return real(target, directory, rows, lambda n: fetch(owner if n == tied else n), *args, **kwargs)
    monkeypatch.setattr(convert_module, "write_target", write_tied_too)
    with pytest.raises(convert_module.ConversionError, match=f"unexpected {tied}"):
        convert(src, tmp_path / "out", to="torch")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_position_table_of_another_size_is_a_mismatch_without_image_size(fmt, tmp_path):
    """A Hugging Face checkpoint is resized only when asked (``image_size=``); unasked, a position table
    of another grid is a shape mismatch like any other (original .pth files are resized: they come
    from other resolutions by design)."""
    src = fx("BlipVisionModel")                  # 32 px, patch 8: 1 + 4x4 positions
    sd = state(src)
    sd["embeddings.position_embedding"] = sd["embeddings.position_embedding"][:, :5]    # 1 + 2x2
    (tmp_path / "bad").mkdir()
    if fmt == "safetensors":
        checkpoint.save_state_dict(tmp_path / "bad", sd)
    else:
        _torch_save(sd, tmp_path / "bad" / "pytorch_model.bin")
    (tmp_path / "bad" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(checkpoint.StateDictMismatchError,
                       match=r"shape mismatch:\n    embeddings.position_embedding: expected \(1, 17, 32\), found \(1, 5, 32\)"):
        convert(tmp_path / "bad", tmp_path / "out", to="jax", allow_pickle_bin=True)
    assert not (tmp_path / "out").exists()
    report = convert(tmp_path / "bad", tmp_path / "out", to="jax", allow_pickle_bin=True, image_size=32)
    assert any("resized embeddings.position_embedding from (1, 5, 32) to (1, 17, 32)" in n for n in report.notes)


def test_float16_through_tf_records_the_dtype_and_round_trips(tmp_path):
    src = fx("BlipTextModel")
    convert(src, tmp_path / "tf", to="tf", dtype="float16")
    with open_tf_weights(tmp_path / "tf") as h5:
        assert {np.dtype(h5.dtype(k)) for k in h5.keys()} == {np.dtype("float16")}
    assert load_config(tmp_path / "tf").extra["torch_dtype"] == "float16"
    back = convert(tmp_path / "tf", tmp_path / "pt", to="torch")
    assert load_config(back.dst).extra["torch_dtype"] == "float16"
    assert_same_state(state(back.dst), checkpoint.cast_state_dict(state(src), "float16"))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_mixed_dtype_safetensors_are_laid_out_as_the_safetensors_library_writes_them(half, tmp_path):
    """A source whose tensors have two dtypes, kept as they are: the file is byte for byte the one the
    safetensors library writes for the same tensors (wider dtypes first, then by name)."""
    import torch
    from safetensors.torch import save_file
    src = fx("BlipVisionModel")
    sd = state(src)
    names = sorted(sd)
    mixed = {k: torch.from_numpy(v) if i % 2 else torch.from_numpy(v).to(getattr(torch, half))
             for i, (k, v) in enumerate((k, sd[k]) for k in names)}
    (tmp_path / "src").mkdir()
    save_file(mixed, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "src" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    convert(tmp_path / "src", tmp_path / "out", to="torch")
    assert ((tmp_path / "out" / "model.safetensors").read_bytes()
            == (tmp_path / "src" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_bin_is_not_unpickled_without_the_opt_in(tmp_path, layout):
    """A ``pytorch_model.bin``, single or sharded (transformers' index), is pickle: converting it without
    ``allow_pickle_bin=True`` raises the opt-in error and writes nothing."""
    src = fx("BlipVisionModel")
    sd = state(src)
    d = tmp_path / "bin"
    os.makedirs(d)
    if layout == "single":
        _torch_save(sd, d / "pytorch_model.bin")
    else:
        names = list(sd)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            _torch_save({k: sd[k] for k in part}, d / f"pytorch_model-0000{i + 1}-of-00002.bin")
            weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00002.bin" for k in part})
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle_bin"):
        convert(d, tmp_path / "out", to="torch")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    convert(d, tmp_path / "out", to="torch", allow_pickle_bin=True)
    assert_same_state(state(tmp_path / "out"), sd)


def _two_original_vision_files(tmp_path):
    """A folder with two original ViT checkpoints (a base and a fine-tuned one) of the vision fixture."""
    sd = state(fx("BlipVisionModel"))
    d = tmp_path / "pths"
    os.makedirs(d)
    orig = _original_blip_names({f"vision_model.{k}": v for k, v in sd.items()})
    _torch_save(orig, d / "model_base.pth")
    _torch_save({k: v + np.float32(1) for k, v in orig.items()}, d / "model_finetuned.pth")
    return d, sd


def test_a_folder_of_several_original_files_names_none_of_them(tmp_path):
    """``detect_format`` takes a folder's original ``.pth`` only when it is the only one: with two, which is
    meant is the caller's to say (by the file's path)."""
    from converters import detect_format
    d, _ = _two_original_vision_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="single original .pth"):
        detect_format(d)
    with pytest.raises(FileNotFoundError, match="single original .pth"):
        detect_format(d, "original")
    assert detect_format(d / "model_finetuned.pth") == ("original", str(d / "model_finetuned.pth"))


def test_converting_a_folder_of_several_original_files_raises_and_writes_nothing(tmp_path):
    d, sd = _two_original_vision_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="single original .pth"):
        convert(d, tmp_path / "out", to="torch", config=fx("BlipVisionModel"), allow_pickle_bin=True)
    assert not (tmp_path / "out").exists()
    convert(d / "model_base.pth", tmp_path / "out", to="torch", config=fx("BlipVisionModel"), allow_pickle_bin=True)
    assert_same_state(state(tmp_path / "out"), sd)


def test_existing_destination_is_refused_unless_overwrite(tmp_path):
    src = fx("BlipTextModel")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert(src, tmp_path / "out", to="jax")
    assert (tmp_path / "out" / "old.txt").exists()
    convert(src, tmp_path / "out", to="jax", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "flax_model.msgpack", "inputs.npz", "reference.npz"]
    assert not _leftovers(tmp_path)


# -- the msgpack format against flax itself ----------------------------------------------------------------
def test_flax_msgpack_matches_flax_serialization(tmp_path, monkeypatch):
    serialization = require("flax.serialization")
    src = fx("Blip2QFormerModel")
    convert(src, tmp_path / "jax", to="jax")
    arch, table = table_of(src)
    ours = read_flax_weights(tmp_path / "jax")
    tree = serialization.msgpack_restore((tmp_path / "jax" / "flax_model.msgpack").read_bytes())
    for name, path in flax_msgpack.flax_paths(table).items():
        leaf = tree
        for p in path:
            leaf = leaf[p]
        np.testing.assert_array_equal(np.asarray(leaf), ours[path])
        np.testing.assert_array_equal(table[name].from_backend("jax", np.asarray(leaf)), state(src)[name])
    # chunked leaves (arrays above the chunk size), written by flax and by us, read by both
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 256)
    monkeypatch.setattr(flax_msgpack, "MAX_CHUNK_SIZE", 256)
    big = {"a": {"kernel": np.arange(300, dtype=np.float32).reshape(20, 15)}, "s": np.float32(2.0) * np.ones(())}
    (tmp_path / "f.msgpack").write_bytes(serialization.msgpack_serialize(big))
    got = read_flax_weights(tmp_path / "f.msgpack")
    np.testing.assert_array_equal(got[("a", "kernel")], big["a"]["kernel"])
    flax_msgpack.write_flax_weights(tmp_path, [(("a", "kernel"), (20, 15), np.float32, lambda: big["a"]["kernel"])])
    back = serialization.msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    np.testing.assert_array_equal(back["a"]["kernel"], big["a"]["kernel"])


def test_a_checkpoint_flax_wrote_in_chunks_converts_to_its_weights(tmp_path, monkeypatch):
    """flax writes arrays above its chunk size as numbered chunks: a checkpoint serialized by flax with a
    512-byte chunk size (most leaves in several chunks) converts back to the weights it was written from."""
    serialization = require("flax.serialization")
    src = fx("BlipTextModel")
    convert(src, tmp_path / "jax", to="jax")
    tree = flax_msgpack._tree(read_flax_weights(tmp_path / "jax").items())       # nested {name: array} as flax's
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 512)
    (tmp_path / "chunked").mkdir()
    (tmp_path / "chunked" / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    (tmp_path / "chunked" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    back = convert(tmp_path / "chunked", tmp_path / "pt", to="torch")
    assert_same_state(state(back.dst), state(src))


# -- command line ------------------------------------------------------------------------------------------
def test_cli_convert(tmp_path, capsys):
    assert cli_main(["convert", fx("Blip2VisionModel"), str(tmp_path / "o"), "--to", "tf", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "tf_model.h5" in out
    assert {a.dtype for a in state(convert(tmp_path / "o", tmp_path / "p", to="torch").dst).values()} == {np.dtype("float16")}
    assert cli_main(["convert", fx("Blip2VisionModel"), str(tmp_path / "o"), "--to", "jax"]) == 1
    assert "already exists" in capsys.readouterr().err
    from blip_apps.cli import main as blip_main   # registered as `blip convert`
    assert blip_main(["convert", str(tmp_path / "o"), str(tmp_path / "j"), "--to", "jax", "--no-progress"]) == 0
    assert "flax_model.msgpack" in capsys.readouterr().out


def test_importing_converters_loads_no_framework():
    code = ("import sys, converters, converters.parity, converters.cli, blip_core.formats; "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'transformers', 'h5py', 'msgpack') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_progress_bar_only_on_a_terminal():
    from converters.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress(2000, "converting", stream=stream)
        bar.update(1000)
        bar.update(1000)
        bar.close()
    assert "100%" in terminal.getvalue() and "converting" in terminal.getvalue() and pipe.getvalue() == ""
