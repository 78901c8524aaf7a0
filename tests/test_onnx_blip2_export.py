"""BLIP-2 ONNX export (backends/torch/onnx_export_blip2.py) run by blip_runtime's OnnxBlip2, against torch.

The committed random BLIP-2 fixtures, OPT (``Blip2ForConditionalGeneration``: placeholders, prompts
of different lengths left-padded) and T5 (the ``Blip2Model`` fixture's weights loaded as a
``Blip2ForConditionalGeneration``: right-padded prompts), are each exported once per module. The
graphs' stages must lie within the float32 row of the tolerance table and the runner's ids must equal
the torch backend's ``generate`` (greedy, 3 beams, 3 beams returning 2 with penalties, and without a
prompt). The reference is the library's torch model: the runner's loop is numpy and the graphs run
on onnxruntime's kernels.
"""
import json
import os
import shutil

import numpy as np
import pytest

from blip_core import to_numpy
from blip_core.numerics import tolerance

from fixture_utils import fixture, require

require("onnxruntime")
torch = require("torch")

ATOL, RTOL = tolerance("default", "float32")
NAME = "Blip2ForConditionalGeneration"
GENERATE = {"greedy": dict(max_new_tokens=8), "beam3": dict(max_new_tokens=8, num_beams=3),
            "beam3_nrs2_penalties": dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=0.6,
                                         repetition_penalty=1.3, no_repeat_ngram_size=2)}


def _close(got, want):
    np.testing.assert_allclose(got, np.asarray(to_numpy(want)), atol=ATOL, rtol=RTOL)


def _same_ids(got, want):
    want = np.asarray(to_numpy(want))
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _as_captioner(src, dst):
    """A copy of a fixture directory whose config names ``Blip2ForConditionalGeneration`` (the T5 fixture is
    a ``Blip2Model``, whose weights are the captioner's)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    config["architectures"] = [NAME]
    with open(path, "w") as fh:
        json.dump(config, fh)
    return str(dst)


def _inputs(kind):
    _, inp, _ = fixture(NAME if kind == "opt" else "Blip2Model")
    return inp["pixel_values"], inp["input_ids"], inp["attention_mask"]


@pytest.fixture(scope="module", params=["opt", "t5"])
def bundle(request, tmp_path_factory):
    """(kind, torch model, OnnxBlip runner, checkpoint directory) exported once per language model."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_runtime import OnnxBlip
    kind = request.param
    root = tmp_path_factory.mktemp(f"blip2_{kind}")
    src = fixture(NAME if kind == "opt" else "Blip2Model")[0]
    model_dir = src if kind == "opt" else _as_captioner(src, root / "model")
    model = bt.Blip2ForConditionalGeneration.from_pretrained(model_dir)
    runner = OnnxBlip(export_onnx(model, root / "onnx", processor_dir=model_dir), threads=1)
    return kind, model, runner, model_dir


def test_stages(bundle):
    from blip_runtime.onnx_blip2 import OnnxBlip2
    kind, model, runner, _ = bundle
    assert isinstance(runner, OnnxBlip2) and runner.manifest["language_model"] == kind
    px, ids, mask = _inputs(kind)
    got = runner.image_stages(px)
    lm_inputs, vision, qformer = model.get_image_features(px, return_dict=True)
    _close(got["vision"], vision.last_hidden_state)
    _close(got["qformer"], qformer.last_hidden_state)
    _close(got["projection"], lm_inputs)
    # the logits of the first decode step (the prompt call; for T5 through the encoder graph)
    first = dict(input_ids=ids, attention_mask=mask, max_new_tokens=1, output_scores=True,
                 return_dict_in_generate=True)
    _close(runner.generate(px, **first).scores[0], model.generate(px, **first).scores[0])


@pytest.mark.parametrize("options", list(GENERATE.values()), ids=list(GENERATE))
def test_ids_with_padded_prompts(bundle, options):
    kind, model, runner, _ = bundle
    px, ids, mask = _inputs(kind)
    assert (mask == 0).any() and len(set(mask.sum(1))) == 2     # a padded batch of prompts of two lengths
    _same_ids(runner.generate(px, input_ids=ids, attention_mask=mask, **options),
              model.generate(px, input_ids=ids, attention_mask=mask, **options))


def test_ids_without_prompt(bundle):
    kind, model, runner, _ = bundle
    px = _inputs(kind)[0]
    for options in (GENERATE["greedy"], GENERATE["beam3"]):
        _same_ids(runner.generate(px, **options), model.generate(px, **options))


def test_sampling(bundle):
    """Sampling runs through the numpy engine: seeded draws repeat, and top_k=1 draws are the greedy ids."""
    kind, model, runner, _ = bundle
    px, ids, mask = _inputs(kind)
    prompt = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    a, b = (runner.generate(px, do_sample=True, seed=3, num_return_sequences=2, **prompt) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert a.shape[0] == 2 * px.shape[0]
    _same_ids(runner.generate(px, do_sample=True, top_k=1, seed=5, **prompt), model.generate(px, **prompt))


def _concat_bundle(runner, model_dir, tmp_path):
    """The bundle and checkpoint copied with ``image_token_index`` removed: the queries go in front."""
    import backends.torch as bt
    from blip_runtime import OnnxBlip
    art, ckpt = shutil.copytree(runner.path, tmp_path / "onnx"), shutil.copytree(model_dir, tmp_path / "ckpt")
    for d in (art, ckpt):
        with open(os.path.join(d, "config.json")) as fh:
            config = json.load(fh)
        config.pop("image_token_index")
        with open(os.path.join(d, "config.json"), "w") as fh:
            json.dump(config, fh)
    return bt.Blip2ForConditionalGeneration.from_pretrained(str(ckpt)), OnnxBlip(art, threads=1)


def test_concatenated_queries(bundle, tmp_path):
    """Configs without ``image_token_index`` put the queries in front; the graphs are the same."""
    kind, _, runner, model_dir = bundle
    q = runner.config.num_query_tokens
    model, concat = _concat_bundle(runner, model_dir, tmp_path)
    px, ids, mask = _inputs(kind)
    ids, mask = ids[:, q:], mask[:, q:]
    for options in (GENERATE["greedy"], GENERATE["beam3_nrs2_penalties"]):
        _same_ids(concat.generate(px, input_ids=ids, attention_mask=mask, **options),
                  model.generate(px, input_ids=ids, attention_mask=mask, **options))


@pytest.mark.parametrize("start", [5, 7])
def test_t5_decoder_start_option(bundle, start):
    """T5's ``decoder_start_token_id`` option: the decoder ids start from it, as the library's; OPT (no
    decoder start) takes the option as the library does."""
    kind, model, runner, _ = bundle
    px, ids, mask = _inputs(kind)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, decoder_start_token_id=start)
    got = runner.generate(px, **kw)
    _same_ids(got, model.generate(px, **kw))
    if kind == "t5":
        assert (got[:, 0] == start).all()


@pytest.mark.parametrize("prompt", ["given", "default"])
def test_concatenated_queries_fill_the_position_table(bundle, tmp_path, prompt):
    """Queries in front: OPT's 40 positions hold the Q queries, the prompt (given, or the default one: OPT's
    bos) and the new tokens fed back (all but the last): 41 ids decode as the library's, one more is refused
    with a ValueError (not an out-of-table gather); T5's relative positions have no table."""
    kind, _, runner, model_dir = bundle
    model, concat = _concat_bundle(runner, model_dir, tmp_path)
    q = runner.config.num_query_tokens
    px, ids, mask = _inputs(kind)
    kw = dict(input_ids=ids[:, q:], attention_mask=mask[:, q:]) if prompt == "given" else {}
    if kind == "t5" and prompt == "default":      # neither placeholders nor a bos: no default prompt
        for generate in (concat.generate, model.generate):
            with pytest.raises(ValueError, match="pass input_ids"):
                generate(px, max_new_tokens=2)
        return
    new = 41 - q - (ids.shape[1] - q if prompt == "given" else 1)             # OPT's default prompt: bos
    kw.update(max_new_tokens=new, min_new_tokens=new)
    got = concat.generate(px, **kw)
    _same_ids(got, model.generate(px, **kw))
    kw.update(max_new_tokens=new + 1, min_new_tokens=new + 1)
    if kind == "opt":
        assert got.shape[1] + q == 41
        with pytest.raises(ValueError, match="OPT has only 40 positions"):
            concat.generate(px, **kw)
    else:
        _same_ids(concat.generate(px, **kw), model.generate(px, **kw))


def test_refusals(bundle):
    kind, _, runner, _ = bundle
    px, ids, mask = _inputs(kind)
    with pytest.raises(ValueError, match="placeholder"):
        runner.generate(px, input_ids=ids[:, 1:], attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="vocabulary"):
        runner.generate(px, input_ids=np.where(ids == ids[0, -1], 10_000, ids), attention_mask=mask)
    with pytest.raises(ValueError, match="batch"):
        runner.generate(px[:1], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="unknown option"):
        runner.generate(px, max_new_tokens=2, beams=3)
    if kind == "opt":       # OPT's position table, as the library raises it
        with pytest.raises(ValueError, match="position"):
            runner.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=40)


def test_another_image_size_is_refused(bundle, tmp_path):
    """BLIP-2 bundles take the config's image size only: another one is refused before anything is written."""
    from backends.torch.onnx_export import export_onnx
    _, model, _, model_dir = bundle
    size = model.config.vision_config.image_size + model.config.vision_config.patch_size
    with pytest.raises(ValueError, match="image size"):
        export_onnx(model, tmp_path / "other", processor_dir=model_dir, image_size=size)
    assert not (tmp_path / "other").exists()


def _export_and_check(model_dir, out, capsys):
    from blip_apps.cli import main
    assert main(["export", model_dir, out, "--format", "onnx", "--task", "caption"]) == 0
    capsys.readouterr()
    code = main(["export-parity", out, model_dir, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["stage"] for r in rows} == {"vision_qformer.vision", "vision_qformer.qformer",
                                          "vision_qformer.projection", "decoder_step.logits",
                                          "generate.num_beams=1", "generate.num_beams=3", "generate.default_prompt"}
    assert all(r["ok"] for r in rows), rows
    assert code == 0


def test_cli_export_and_parity_opt(tmp_path, capsys):
    """``blip export --format onnx`` of a BLIP-2 OPT checkpoint, then ``blip export-parity`` exits 0."""
    _export_and_check(fixture(NAME)[0], str(tmp_path / "cli"), capsys)


@pytest.mark.slow
def test_cli_export_and_parity_t5(tmp_path, capsys):
    _export_and_check(_as_captioner(fixture("Blip2Model")[0], tmp_path / "model"), str(tmp_path / "cli"), capsys)


@pytest.mark.slow
def test_parity_catches_a_perturbed_blip2_export(tmp_path, capsys):
    import backends.torch as bt
    from blip_apps.cli import main
    model = bt.Blip2ForConditionalGeneration.from_pretrained(fixture(NAME)[0])
    with torch.no_grad():
        model.language_projection.bias[0] += 0.5
    model.save_pretrained(str(tmp_path / "bad"))
    assert main(["export", str(tmp_path / "bad"), str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    capsys.readouterr()
    assert main(["export-parity", str(tmp_path / "onnx"), fixture(NAME)[0]]) == 1
    assert "vision_qformer.projection" in [line.split()[0] for line in capsys.readouterr().out.splitlines()
                                           if line.endswith("FAIL")]


@pytest.fixture(scope="module")
def opt_with_processor(tmp_path_factory):
    """A random OPT BLIP-2 captioner with a Blip2Processor (byte-level BPE, ``<image>`` placeholders)."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_core.configs import load_config
    from blip_core.processing import Blip2Processor, BlipImageProcessor, load_tokenizer
    from blip_runtime import OnnxBlip
    from hf_configs import randomize
    from test_tokenization import make_bpe_dir
    root = tmp_path_factory.mktemp("blip2_processor")
    q = 4
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}),
                               load_tokenizer(str(make_bpe_dir(root / "tok"))), num_query_tokens=q)
    model_dir = str(root / "model")
    shutil.copytree(fixture(NAME)[0], model_dir)
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    config["image_token_index"] = processor.image_token_id
    config["text_config"].update(vocab_size=len(processor.tokenizer), bos_token_id=2, eos_token_id=2, pad_token_id=1)
    with open(os.path.join(model_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    model = randomize(bt.Blip2ForConditionalGeneration(load_config(model_dir), seed=0), seed=1, std=0.3)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model, processor, OnnxBlip(export_onnx(model, root / "onnx", processor_dir=model_dir), threads=1)


def test_caption_with_processor(opt_with_processor):
    """``caption(images, prompt)``: the bundle's own Blip2Processor, the library's ids, decoded."""
    from PIL import Image
    model, processor, runner = opt_with_processor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    for prompt, options in ((None, dict(max_new_tokens=6)), ("a photo of", dict(max_new_tokens=6, num_beams=3))):
        kw = {} if prompt is None else {"text": [prompt] * 2}
        inputs = processor(images=images, return_tensors="np", **kw)
        want = model.generate(inputs["pixel_values"], input_ids=inputs.get("input_ids"),
                              attention_mask=inputs.get("attention_mask"), **options)
        assert runner.caption(images, prompt=prompt, **options) == processor.batch_decode(to_numpy(want),
                                                                                          skip_special_tokens=True)


BLOCKED = ("torch", "tensorflow", "jax", "flax", "transformers", "keras", "backends", "converters", "blip_apps",
           "safetensors")
RUN_BLOCKED = r"""
import importlib.abc, json, sys
import numpy as np
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in %(blocked)r:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from blip_runtime import OnnxBlip
inp = np.load(sys.argv[2])
runner = OnnxBlip(sys.argv[1], threads=1)
kw = dict(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], max_new_tokens=6)
print(json.dumps({"greedy": runner.generate(inp["pixel_values"], **kw).tolist(),
                  "beam": runner.generate(inp["pixel_values"], num_beams=3, **kw).tolist(),
                  "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_runner_source_reaches_no_framework():
    from fixture_utils import ROOT
    from test_core_imports import violations
    for name in ("onnx_blip2.py", "onnx_runner.py", "numpy_engine.py", "artifact.py"):
        path = os.path.join(ROOT, "blip_runtime", name)
        with open(path) as fh:
            assert violations(fh.read(), path) == []


def test_runner_decodes_with_frameworks_blocked(bundle):
    """A fresh interpreter that cannot import torch, TF, JAX, transformers or the backends gives torch's ids."""
    import subprocess
    import sys

    from fixture_utils import ROOT
    kind, model, runner, _ = bundle
    inputs = os.path.join(fixture(NAME if kind == "opt" else "Blip2Model")[0], "inputs.npz")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", RUN_BLOCKED % {"blocked": BLOCKED}, runner.path, inputs], check=False,
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert not set(out["modules"]) & set(BLOCKED)
    px, ids, mask = _inputs(kind)
    for key, beams in (("greedy", 1), ("beam", 3)):
        _same_ids(np.array(out[key], np.int64), model.generate(px, input_ids=ids, attention_mask=mask,
                                                               max_new_tokens=6, num_beams=beams))


VARIANTS = {   # language-model variants beyond the fixtures: (fixture, text_config changes, config changes)
    "opt_post_ln_no_bias": (NAME, dict(do_layer_norm_before=False, enable_bias=False), {}),
    "t5_tied_relu_short_buckets_concat": ("Blip2Model", dict(feed_forward_proj="relu", is_gated_act=False,
                                                             dense_act_fn="relu", tie_word_embeddings=True,
                                                             relative_attention_num_buckets=8,
                                                             relative_attention_max_distance=10),
                                          dict(image_token_index=None)),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_language_model_variants(tmp_path, variant):
    """Post-LN OPT without biases; tied T5 (output rescaled) with ReLU and short relative-position buckets
    (12 new tokens reach the log-spaced buckets), queries concatenated in front."""
    import backends.torch as bt
    from backends.torch.onnx_export import export_onnx
    from blip_core.configs import load_config
    from blip_runtime import OnnxBlip
    from hf_configs import randomize
    src, text, extra = VARIANTS[variant]
    model_dir = _as_captioner(fixture(src)[0], tmp_path / "model")
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    config["text_config"].update(text)
    config.update(extra)
    with open(os.path.join(model_dir, "config.json"), "w") as fh:
        json.dump({k: v for k, v in config.items() if v is not None}, fh)
    model = randomize(bt.Blip2ForConditionalGeneration(load_config(model_dir), seed=0), seed=2, std=0.3)
    runner = OnnxBlip(export_onnx(model, tmp_path / "onnx"), threads=1)
    px, ids, mask = _inputs("opt" if src == NAME else "t5")
    if "image_token_index" in extra:
        ids, mask = ids[:, config["num_query_tokens"]:], mask[:, config["num_query_tokens"]:]
    for options in (dict(max_new_tokens=12), dict(max_new_tokens=12, repetition_penalty=1.5),
                    dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, repetition_penalty=1.5)):
        _same_ids(runner.generate(px, input_ids=ids, attention_mask=mask, **options),
                  model.generate(px, input_ids=ids, attention_mask=mask, **options))
