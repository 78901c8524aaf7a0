"""TensorFlow BLIP-2 generation: the model side of the decoding contract, ``generate`` through the
XLA engine, and the SavedModel captioners, against transformers 4.57 and backends.torch.

Shares the tiny models and helpers of ``test_tf_blip2.py``; golden ids come from transformers'
and the torch backend's ``generate``.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import torch

from backends.torch import blip2 as torch_blip2
from test_tf_blip2 import (CASES, IMG, Q, TEXT_INPUT, _case_inputs, _greedy, _is_t5, _pixels, _prompt,  # noqa: F401
                           _reference, _t, close, pair)

@pytest.mark.parametrize("case", ["opt_placeholders", pytest.param("opt_concat", marks=pytest.mark.slow), "t5_placeholders", pytest.param("t5_tied_relu_concat", marks=pytest.mark.slow)])
def test_step_contract_matches_full_forward_and_torch_ids(pair, case):
    """Cached steps give the logits of a full forward over the growing sequence; greedy ids equal
    backends.torch's and transformers' generate (batched, left-padded prompts)."""
    cfg = CASES[case]
    hf, me, path = pair("Blip2ForConditionalGeneration", **cfg)
    px = _pixels(batch=3, seed=4)
    full_ids, full_mask, ids, mask = _case_inputs(cfg, (5, 2, 4), 5, seed=5)
    new = 6
    got, step_logits = _greedy(me, px, ids, mask, new)
    for i, logits in enumerate(step_logits):
        if _is_t5(cfg):
            full = me(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=got[:, :i + 1]).logits
        else:
            grown = np.concatenate([mask, np.ones((3, i), mask.dtype)], 1)
            full = me(pixel_values=px, input_ids=got[:, :ids.shape[1] + i], attention_mask=grown).logits
        close(logits, full[:, -1], f"step {i}")
    mine = torch_blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        theirs = mine.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=new).numpy()
        ref = _reference(hf, cfg).generate(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask),
                                           max_new_tokens=new).numpy()
    if not _is_t5(cfg) and cfg.get("image_token_index") is None:
        ref = ref[:, Q:]       # the concatenation path returns the given ids (no placeholders) + new tokens
    np.testing.assert_array_equal(got, theirs)
    np.testing.assert_array_equal(got, ref)


# Each option set is one XLA compile (seconds on CPU): greedy through the engine is covered by the
# right-padded OPT test and the T5 SavedModel below, greedy of every case by the step test above.
GENERATE = {
    "opt_placeholders": [dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)],
    "t5_placeholders": [dict(num_beams=3, repetition_penalty=1.5)],
    "opt_concat": [dict(num_beams=3)],
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "t5_placeholders" else c
                                  for c in sorted(GENERATE)])   # T5 greedy/beam: test_parity_generation
def test_generate_ids_identical(pair, case):
    """The XLA-compiled generate gives transformers' and backends.torch's ids (batched, left-padded
    prompts); a second call with the same shapes reuses the compiled program."""
    from backends.tf.generation import trace_count
    cfg = CASES[case]
    hf, me, path = pair("Blip2ForConditionalGeneration", **cfg)
    mine = torch_blip2.Blip2ForConditionalGeneration.from_pretrained(path)
    ref_model = _reference(hf, cfg)
    px = _pixels(batch=3, seed=4)
    full_ids, full_mask, ids, mask = _case_inputs(cfg, (5, 2, 4), 5, seed=5)
    for opts in GENERATE[case]:
        got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=7, **opts)
        assert got.dtype == tf.int64
        with torch.no_grad():
            theirs = mine.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=7, **opts)
            ref = ref_model.generate(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask),
                                     max_new_tokens=7, **opts).numpy()
        if not _is_t5(cfg) and cfg.get("image_token_index") is None:
            ref = ref[:, Q:]       # the concatenation path returns the given ids (no placeholders) + new tokens
        np.testing.assert_array_equal(got.numpy(), theirs.numpy(), err_msg=str(opts))
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=str(opts))
    traces = trace_count(me)
    again = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=7, **opts)
    np.testing.assert_array_equal(again.numpy(), got.numpy())
    assert trace_count(me) == traces


def test_generate_right_padded_batch_matches_transformers(pair):
    """A right-padded OPT batch: the prefill's last slot is padding, whose position id is 1 in
    transformers' generate; the first new token depends on it. Ids and every step's scores."""
    hf, me, _ = pair("Blip2ForConditionalGeneration", **CASES["opt_placeholders"])
    px = _pixels(batch=3, seed=6)
    text, text_mask = _prompt([5, 2, 4], 5, seed=7, placeholders=False)
    order = np.argsort(1 - text_mask, axis=1, kind="stable")         # real tokens first, padding after
    text, text_mask = np.take_along_axis(text, order, 1), np.take_along_axis(text_mask, order, 1)
    ids = np.concatenate([np.full((3, Q), IMG), text], 1)
    mask = np.concatenate([np.ones((3, Q), np.int64), text_mask], 1)
    assert mask[:, -1].tolist() == [1, 0, 0]
    for opts in [dict(), dict(num_beams=2)]:
        kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, **opts)
        with torch.no_grad():
            ref = hf.generate(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), **kw)
        got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
        np.testing.assert_array_equal(got.sequences.numpy(), ref.sequences.numpy(), err_msg=str(opts))
        assert len(got.scores) == len(ref.scores)
        for ours, theirs in zip(got.scores, ref.scores):      # every step's scores, the first one included
            ours, theirs = np.asarray(ours), theirs.numpy()
            finite = np.isfinite(theirs)
            np.testing.assert_array_equal(np.isfinite(ours), finite)
            close(ours[finite], theirs[finite], f"scores {opts}")


@pytest.mark.parametrize("opts", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
@pytest.mark.parametrize("case", ["opt_placeholders", "opt_concat",
                                  pytest.param("t5_tied_relu_concat", marks=pytest.mark.slow)])
def test_generate_from_inputs_embeds(pair, case, opts):
    """A prompt given as embeddings alone (placeholders found by their embedding; or, OPT concatenating the
    queries in front, the queries and the prompt as the prefix): transformers' ids (the same weights with
    placeholders), for OPT the new tokens alone."""
    cfg = CASES[case]
    hf, me, path = pair("Blip2ForConditionalGeneration", **cfg)
    ref_model = _reference(hf, cfg)
    px = _pixels(batch=3, seed=8)
    full_ids, full_mask, ids, mask = _case_inputs(cfg, (5, 2, 4), 5, seed=9)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(_t(ids))
        ref = ref_model.generate(pixel_values=_t(px), inputs_embeds=ref_model.get_input_embeddings()(_t(full_ids)),
                                 attention_mask=_t(full_mask), max_new_tokens=5, **opts).numpy()
        theirs = torch_blip2.Blip2ForConditionalGeneration.from_pretrained(path).generate(
            pixel_values=px, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, **opts).numpy()
    got = me.generate(pixel_values=px, inputs_embeds=embeds.numpy(), attention_mask=mask, max_new_tokens=5,
                      **opts).numpy()
    np.testing.assert_array_equal(got, theirs)
    np.testing.assert_array_equal(got, ref)
    assert got.shape[1] == (6 if _is_t5(cfg) else 5)


@pytest.mark.parametrize("opts", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
def test_opt_concat_fills_its_position_table_exactly(pair, opts):
    """The boundary of that rule: 41 ids (Q queries + prompt + new tokens, every one but the last fed, 40
    positions) decode transformers' ids (stop 41: TF counted the last token too and refused this call)."""
    cfg = CASES["opt_concat"]
    hf, me, _ = pair("Blip2ForConditionalGeneration", **cfg)
    px = _pixels(batch=2, seed=3)
    full_ids, full_mask, ids, mask = _case_inputs(cfg, (5, 3), 5, seed=3)
    new = 41 - full_ids.shape[1]
    with torch.no_grad():
        ref = _reference(hf, cfg).generate(pixel_values=_t(px), input_ids=_t(full_ids), attention_mask=_t(full_mask),
                                           max_new_tokens=new, min_new_tokens=new, **opts).numpy()
    got = me.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=new,
                      min_new_tokens=new, **opts).numpy()
    assert ref.shape[1] == 41
    np.testing.assert_array_equal(got, ref[:, Q:])


@pytest.mark.parametrize("prompt", [5, None], ids=["prompt", "default_prompt"])
def test_opt_concat_positions_count_the_queries_in_front(pair, prompt):
    """OPT's 40 positions must hold the Q=4 queries in front, the prompt and the new tokens fed back (every
    one but the last): a call needing 41 is refused before decoding (inside XLA an out-of-table position
    would be clamped)."""
    hf, me, _ = pair("Blip2ForConditionalGeneration", **CASES["opt_concat"])
    px = _pixels(batch=2, seed=3)
    kw = {}
    if prompt is not None:
        _, _, ids, mask = _case_inputs(CASES["opt_concat"], (5, 3), prompt, seed=3)
        kw = dict(input_ids=ids, attention_mask=mask)
    length = prompt or 1                                   # the default prompt is OPT's bos
    with pytest.raises(ValueError, match="positions but OPT has only max_position_embeddings=40"):
        me.generate(pixel_values=px, max_new_tokens=42 - Q - length, **kw)


# -- SavedModel export -----------------------------------------------------------------------------
# Runs with ``python -S`` (no .pth files, so no editable install of this repository), cwd outside the
# repository and only site-packages on the path: TensorFlow and numpy, not this library.
LOADER = """
import json, os, sys
sys.path.extend(sys.argv[1].split(os.pathsep))
import numpy as np
import tensorflow as tf
found = []
for name in ("blip_core", "backends"):
    try:
        __import__(name)
        found.append(name)
    except ImportError:
        pass
out = {"importable": found}
for name in sys.argv[2:]:
    data = np.load(os.path.join(name, "inputs.npz"))
    model = tf.saved_model.load(name)
    args = {k: tf.constant(data[k]) for k in ("pixel_values", "input_ids", "attention_mask")}
    out[name] = model.serve(**args)["sequences"].numpy().tolist()
    try:
        model.serve(**dict(args, input_ids=tf.constant(data["no_placeholders"])))
        out[name + ":error"] = ""
    except tf.errors.InvalidArgumentError as exc:
        out[name + ":error"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_saved_model_captioners_run_without_the_library(pair, tmp_path):
    """OPT (beam search) and T5 (greedy) captioners, image + prompt ids in, ids out, loaded with plain
    ``tf.saved_model.load``; ids equal backends.torch's and transformers' generate."""
    import subprocess
    import sys
    import sysconfig
    from backends.tf.blip2_export import export_blip2_captioner
    px = _pixels(batch=3, seed=20)
    runs = {"opt_placeholders": dict(max_new_tokens=6, num_beams=2), "t5_placeholders": dict(max_new_tokens=6)}
    dirs = {}
    for case, kw in runs.items():
        _, me, _ = pair("Blip2ForConditionalGeneration", **CASES[case])
        ids, mask = _prompt([5, 2, 4], 5, seed=21)
        dirs[case] = export_blip2_captioner(me, str(tmp_path / case), prompt_length=ids.shape[1], **kw)
        np.savez(os.path.join(dirs[case], "inputs.npz"), pixel_values=px, input_ids=ids, attention_mask=mask,
                 no_placeholders=np.where(ids == IMG, 5, ids))
    outside = tmp_path / "outside"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    site = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    r = subprocess.run([sys.executable, "-S", "-c", LOADER, site, *dirs.values()], cwd=str(outside), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["importable"] == []          # the SavedModel needs nothing from this repository
    for case, kw in runs.items():
        hf, _, path = pair("Blip2ForConditionalGeneration", **CASES[case])
        ids, mask = _prompt([5, 2, 4], 5, seed=21)
        with torch.no_grad():
            theirs = torch_blip2.Blip2ForConditionalGeneration.from_pretrained(path).generate(
                pixel_values=px, input_ids=ids, attention_mask=mask, **kw).numpy()
            ref = hf.generate(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(mask), **kw).numpy()
        got = np.array(result[dirs[case]])
        np.testing.assert_array_equal(got, theirs, err_msg=case)
        np.testing.assert_array_equal(got, ref, err_msg=case)
        assert "placeholder" in result[dirs[case] + ":error"], case


def test_export_refuses_other_models_and_short_prompts(pair, tmp_path):
    from backends.tf.blip2_export import export_blip2_captioner
    _, retrieval, _ = pair("Blip2ForImageTextRetrieval", **TEXT_INPUT)
    with pytest.raises(ValueError, match="Blip2ForConditionalGeneration"):
        export_blip2_captioner(retrieval, str(tmp_path / "x"), prompt_length=5)
    _, me, _ = pair("Blip2ForConditionalGeneration", **CASES["opt_placeholders"])
    with pytest.raises(ValueError, match="placeholders"):
        export_blip2_captioner(me, str(tmp_path / "y"), prompt_length=Q - 1)
    with pytest.raises(ValueError, match="seed"):
        export_blip2_captioner(me, str(tmp_path / "z"), prompt_length=6, do_sample=True)
