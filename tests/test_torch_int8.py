"""PyTorch inference layouts: int8 linear layers (``quantize="int8"``) and the oneDNN decoding layout.

int8 is not float32 to rounding, so its tolerance is measured, not assumed: on the bundled trained
captioner and the held-out synthetic test split (``blip_apps.synthetic``, seed 0), greedy captions
in int8 equal float32's on 200 of 200 images since stop 42 (98.5% at first; ``python benchmarks/lowprec.py``);
the default test takes the first 64 and asks for >= 90% (at most 6 differ), a slow test all 200 and >= 95%.
The oneDNN decoding layout (``backends/torch/layout.py``, opt-in) is float32 maths in another
kernel: ids must stay identical to the committed goldens (transformers' own ids).
"""
import numpy as np
import pytest
import torch

import backends.torch as bt
from backends.torch import layout, quantize
from backends.torch.quantize import Int8Linear, quantize_int8
from blip_core import to_numpy
from fixture_utils import fixture
from hf_configs import randomize

INT8_AGREEMENT = {64: 0.90, 200: 0.95}   # measured 98.5% on 200 (see the module docstring)


def _agreement(n):
    from benchmarks.lowprec import BUNDLED, caption_ids, heldout_pixels
    pixels = heldout_pixels(BUNDLED, n)
    with torch.no_grad():
        ref = caption_ids(bt.BlipForConditionalGeneration.from_pretrained(BUNDLED), pixels)
        got = caption_ids(bt.BlipForConditionalGeneration.from_pretrained(BUNDLED, quantize="int8"), pixels)
    return float(np.mean([a == b for a, b in zip(got, ref)]))


def test_int8_captions_agree_with_float32_on_heldout_images():
    assert _agreement(64) >= INT8_AGREEMENT[64]


@pytest.mark.slow
def test_int8_captions_agree_with_float32_on_the_whole_heldout_split():
    assert _agreement(200) >= INT8_AGREEMENT[200]


@pytest.mark.parametrize("bias", [True, False])
def test_int8_weights_use_the_whole_symmetric_range_per_output_channel(bias):
    """The packed weights are ``round(w / s)`` with ``s = max |w| / 127`` per output row (zero point 0): every
    row reaches +-127, so no bit of the eight is wasted and nothing is clipped."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    q = Int8Linear.from_linear(lin)
    with torch.no_grad():
        q(torch.randn(3, 64))                         # packs on first use
    w_q, b = torch.ops.quantized.linear_unpack(q._packed)
    w = lin.weight.detach()
    scale = w.abs().amax(dim=1) / 127.0
    np.testing.assert_allclose(w_q.q_per_channel_scales().numpy(), scale.numpy(), rtol=1e-6)
    assert not w_q.q_per_channel_zero_points().any()
    ints = w_q.int_repr().to(torch.int32)
    assert (ints.abs().amax(dim=1) == 127).all()
    assert (ints - torch.round(w / scale[:, None]).to(torch.int32)).abs().max() <= 1     # ties may round either way
    assert (b is None) == (not bias)


def test_int8_model_keeps_its_weights_ties_and_files(tmp_path):
    path, inputs, ref = fixture("BlipForConditionalGeneration")
    f32 = bt.BlipForConditionalGeneration.from_pretrained(path)
    q = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    assert q.text_decoder.cls.predictions.decoder.weight is q.text_decoder.bert.embeddings.word_embeddings.weight
    sd, sd32 = q.state_dict(), f32.state_dict()
    assert list(sd) == list(sd32) and all(torch.equal(sd[k], sd32[k]) for k in sd)
    q.save_pretrained(tmp_path)      # the float32 weights, loadable as ever
    again = bt.BlipForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], sd32[k]) for k in sd32)
    # int8 logits: near float32's, not equal to them (measured on this random fixture: max |diff| 0.50
    # on logits spanning 8.8, i.e. 5.7%; random weights amplify rounding more than trained ones)
    kw = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        a, b = to_numpy(q(**kw).logits), to_numpy(f32(**kw).logits)
    assert np.allclose(b, ref["logits"], atol=1e-4)
    diff = np.abs(a - b).max()
    assert 0 < diff <= 0.08 * np.ptp(b), diff


def test_int8_follows_in_place_weight_changes():
    lin = torch.nn.Linear(16, 8)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = q(x)
        lin.weight.mul_(2.0)          # the same Parameter: the int8 copy must follow
        after = q(x)
        assert torch.allclose(after, 2 * (before - lin.bias) + lin.bias, atol=0.1)
        assert torch.allclose(after, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=0.1)
        lin.bias.add_(5.0)            # and the bias
        np.testing.assert_allclose(q(x).numpy(), (after + 5.0).numpy(), rtol=0, atol=1e-5)


def _dynamic_product(x, w, b, levels):
    """numpy model of a dynamically quantised product: ``x`` rounded to ``levels`` steps (255: 8 bits, 127: the 7
    bits fbgemm's kernel takes) between min(x, 0) and max(x, 0), one scale and zero point for the whole call; ``w``
    per output row symmetric in int8; integer sums, then the scales and the bias. Independent of the code under test."""
    x, w = x.double().numpy(), w.detach().double().numpy()
    w_scale = np.abs(w).max(1) / 127
    w_q = np.clip(np.round(w / w_scale[:, None]), -128, 127)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = float(np.float32((hi - lo) / levels))
    zero = np.clip(np.round(-lo / scale), 0, levels)
    x_q = np.clip(np.round(x / scale) + zero, 0, levels)
    y = ((x_q - zero) @ w_q.T) * scale * w_scale
    return y if b is None else y + b.detach().double().numpy()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_wide_products_take_8bit_inputs_through_onednn(monkeypatch, bias):
    """From ``ONEDNN_ROWS`` rows (the vision tower, batched decoding; on CPUs with AMX) the product is oneDNN's, whose
    inputs are rounded to 8 bits; below it fbgemm's, whose inputs are rounded to 7. Each equals its numpy model to
    float32 rounding and not the other's, at the threshold and one row below, 2-D and 3-D."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.fail("this torch build has no oneDNN quantised engine")
    monkeypatch.setattr(quantize, "ONEDNN_ROWS", 24)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=bias)
    q = Int8Linear.from_linear(lin)
    for shape, levels in [((24, 96), 255), ((23, 96), 127), ((2, 20, 96), 255), ((1, 23, 96), 127), ((2, 96), 127)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = q(x).double().numpy()
        assert got.shape == (*shape[:-1], 200)
        want = _dynamic_product(x.reshape(-1, 96), lin.weight, lin.bias, levels).reshape(got.shape)
        other = _dynamic_product(x.reshape(-1, 96), lin.weight, lin.bias, {255: 127, 127: 255}[levels])
        other = other.reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(got - other).max() > 1e-3, shape


def test_int8_wide_and_narrow_copies_follow_in_place_weight_changes(monkeypatch):
    """Both packed copies (fbgemm's, oneDNN's) are made again after the weights change in place."""
    monkeypatch.setattr(quantize, "ONEDNN_ROWS", 24)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    wide, narrow = torch.randn(30, 64), torch.randn(3, 64)
    with torch.no_grad():
        q(wide), q(narrow)
        lin.weight.mul_(-0.5)
        lin.bias.add_(1.0)
        for x, levels in [(wide, 255), (narrow, 127)]:
            np.testing.assert_allclose(q(x).double().numpy(), _dynamic_product(x, lin.weight, lin.bias, levels),
                                       rtol=0, atol=1e-5)


def test_int8_takes_onednn_only_where_the_cpu_has_amx(monkeypatch):
    """oneDNN's int8 GEMM beats fbgemm's only with AMX tiles (both use VNNI otherwise): the default threshold is 0
    (never) without them."""
    monkeypatch.setattr(quantize, "_amx_int8", lambda: False)
    assert quantize._onednn_rows() == 0
    monkeypatch.setattr(quantize, "_amx_int8", lambda: True)
    assert quantize._onednn_rows() == (24 if "onednn" in torch.backends.quantized.supported_engines else 0)


def test_int8_wide_products_stay_fbgemms_without_amx(monkeypatch):
    """On a CPU without AMX the threshold the rule gives keeps a vision tower's 577 rows on fbgemm's 7-bit inputs."""
    monkeypatch.setattr(quantize, "_amx_int8", lambda: False)
    monkeypatch.setattr(quantize, "ONEDNN_ROWS", quantize._onednn_rows())
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    x = torch.randn(577, 96)
    with torch.no_grad():
        got = Int8Linear.from_linear(lin)(x).double().numpy()
    np.testing.assert_allclose(got, _dynamic_product(x, lin.weight, lin.bias, 127), rtol=0, atol=1e-5)


def test_int8_refuses_what_it_cannot_do(tmp_path):
    path, _, _ = fixture("BlipForConditionalGeneration")
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(bt.BlipForConditionalGeneration.from_pretrained(path, dtype="bfloat16"))
    with pytest.raises(ValueError, match="quantize"):
        bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int4")
    import backends.jax as bj
    with pytest.raises(NotImplementedError, match="torch backend only"):
        bj.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")


def test_cli_quantize_option(capsys):
    import json
    from benchmarks.lowprec import BUNDLED
    from blip_apps import synthetic
    from blip_apps.cli import main
    image = synthetic.render(synthetic.scenes(1, 0, "test")[0])
    import tempfile
    import os
    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, "shape.png")
        image.save(png)
        assert main(["caption", png, "--model", BUNDLED, "--quantize", "int8", "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["caption"]
        assert main(["caption", png, "--model", BUNDLED, "--backend", "jax", "--quantize", "int8"]) != 0
        assert "torch backend only" in capsys.readouterr().err


@pytest.mark.parametrize("golden,kw", [("greedy_ids", dict(max_new_tokens=6)),
                                       ("beam_ids", dict(max_new_tokens=6, num_beams=3))])
def test_decode_layout_keeps_ids_and_logits(monkeypatch, golden, kw):
    path, inputs, ref = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    monkeypatch.setattr(layout, "ENABLED", True)
    with torch.no_grad():
        ids = to_numpy(model.generate(pixel_values=inputs["pixel_values"], **kw))
    packed = [m for m in model.modules() if isinstance(m, layout.Linear) and m._layout is not None]
    if layout.layout_supported(model):
        assert packed and all(m._layout.rows == 2 * kw.get("num_beams", 1) for m in packed)
        assert not any(m.runs_once for m in packed)
    np.testing.assert_array_equal(ids, ref[golden][:, : ids.shape[1]])
    # the layout serves forward calls of the same row count, within float32 rounding of F.linear
    lin = model.text_decoder.cls.predictions.decoder
    x = torch.randn(2 * kw.get("num_beams", 1), lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.add_(1.0)          # an in-place change makes the layout stale: the plain path runs
        assert lin._layout is None or not lin._layout.fresh(lin)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    layout.release_layouts(model)
    assert not any(isinstance(m, layout.Linear) and m._layout is not None for m in model.modules())


def test_quantizing_drops_the_decoding_copies(monkeypatch):
    """A model that has decoded in float32 holds transposed copies of its decoder's weights (a shared one per
    self-attention); quantizing it drops them with the layers they belonged to, and it decodes again."""
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    pixels = inputs["pixel_values"][:1]
    with torch.no_grad():
        before = to_numpy(model.generate(pixel_values=pixels, max_new_tokens=4))
    assert any(m.__dict__.get("_fused") is not None for m in model.modules())
    quantize_int8(model)
    assert not any("_fused" in m.__dict__ for m in model.modules())
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, Int8Linear) and m._layout is None for m in lins)
    with torch.no_grad():
        after = to_numpy(model.generate(pixel_values=pixels, max_new_tokens=4))
    assert after.shape == before.shape and (after[:, 0] == before[:, 0]).all()    # the start token
    # decoding one row gave the decoder's int8 layers int8 transposed copies (a shared one per self-attention)
    fused = [m.__dict__["_fused"] for m in model.modules() if m.__dict__.get("_fused") is not None]
    laid = [m for m in lins if m._layout is not None]
    assert fused and all(f.product.int8 and f.product.table.dtype == torch.uint8 for f in fused)
    assert laid and all(m._layout.how == layout.TRANSPOSED and m._layout.weight.int8 for m in laid)
    assert not any(m.runs_once for m in laid) and not any(m._layout is not None for m in model.vision_model.modules()
                                                          if isinstance(m, Int8Linear))


def _rowwise_bound(x, w, b, width):
    """The most a one-row product can move when each row of the transposed weights' column blocks (one input
    feature's weights to ``width`` outputs, and the bias row) is rounded to 256 levels between its min and max:
    half a level per weight, times |x|. Independent of the code under test (plain float64 arithmetic)."""
    out, n_in = w.shape
    bound = torch.zeros(out, dtype=torch.float64)
    for lo in range(0, out, width):
        blk = torch.cat([w[lo:lo + width].t(), b[None, lo:lo + width]]).double()      # (n_in + 1, cols)
        cols = blk.shape[1]
        if cols < width:     # the last block's padding columns are zeros, inside its rows' ranges
            blk = torch.cat([blk, blk.new_zeros(n_in + 1, width - cols)], 1)
        half = (blk.amax(1) - blk.amin(1)) / 255 / 2
        xs = torch.cat([x.double().abs().reshape(-1), torch.ones(1, dtype=torch.float64)])
        bound[lo:lo + cols] = (xs * half).sum()
    return bound


@pytest.mark.parametrize("out_features", [640, 200])
def test_int8_one_row_products_are_weight_only(out_features):
    """At one row (greedy decoding) an int8 layer multiplies float32 inputs by int8 weights quantised per row of the
    transposed copy: within half a quantisation level per weight of float32, and a fraction of fbgemm's dynamic
    product's error (its inputs are rounded to 8 bits too). More rows, or a stale copy, take fbgemm's product."""
    torch.manual_seed(0)
    lin = Int8Linear.from_linear(torch.nn.Linear(96, out_features))
    mod = torch.nn.Sequential(lin).eval().requires_grad_(False)
    x = torch.randn(1, 96)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        dynamic = lin(x)                                   # no layout yet: fbgemm's dynamic product
        layout.prepare_decoding(mod, 1)
        if not layout.layout_supported(mod):
            pytest.fail("this torch build has no oneDNN: the decoding layouts cannot be checked")
        lay = lin._layout
        assert lay is not None and lay.how == layout.TRANSPOSED and lay.weight.int8
        assert lay.weight.table.dtype == torch.uint8
        assert lay.weight.table.numel() < lin.weight.nbytes / 3    # a byte a weight, 8 bytes of scale a row
        got = lin(x)
        width = layout._blocks(out_features, torch.get_num_threads())[1]
        bound = _rowwise_bound(x, lin.weight, lin.bias, width)
        err = (got - ref).double().abs().reshape(-1)
        assert (err <= bound + 1e-5).all(), (err - bound).max()
        assert err.max() < 0.5 * (dynamic - ref).abs().max()
        two = torch.randn(2, 96)                           # two rows: fbgemm's product, as before
        torch.testing.assert_close(lin(two), torch.ops.quantized.linear_dynamic(two, lin._packed, True))
        lin.weight.mul_(2.0)                               # stale: the dynamic product on the new weights
        assert not lay.fresh(lin)
        torch.testing.assert_close(lin(x), torch.ops.quantized.linear_dynamic(x, lin._packed, True))


def _int8_model(way):
    """The two ways to an int8 model: quantising a float32 one that has decoded (and holds its float32 decoding
    copies), and loading with ``quantize="int8"``."""
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    if way == "from_pretrained":
        return bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    decoded = bt.BlipForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        decoded.generate(pixel_values=inputs["pixel_values"][:1], max_new_tokens=3)
    return quantize_int8(decoded)


@pytest.mark.parametrize("way", ["quantize_int8", "from_pretrained"])
def test_int8_model_is_for_inference_and_keeps_its_run_once_layers(monkeypatch, way):
    """Eval mode and no gradients (``quantize_int8``'s docstring); the image's cross-attention keys and values,
    computed once per input, stay marked so and get no decoding copy when the model decodes one row."""
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    model = _int8_model(way)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(m.__dict__.get("_fused") is not None for m in model.modules())     # no float32 decoding copy left
    _, inputs, _ = fixture("BlipForConditionalGeneration")
    with torch.no_grad():
        model.generate(pixel_values=inputs["pixel_values"][:1], max_new_tokens=3)
    cross = [m for layer in model.text_decoder.bert.encoder.layer
             for m in (layer.crossattention.self.key, layer.crossattention.self.value)]
    assert cross and all(isinstance(m, Int8Linear) and m.runs_once and m._layout is None for m in cross)
    assert any(m._layout is not None for m in model.modules() if isinstance(m, Int8Linear))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_refuses_a_half_precision_model(dtype):
    path, _, _ = fixture("BlipForConditionalGeneration")
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(bt.BlipForConditionalGeneration.from_pretrained(path).to(dtype))


@pytest.mark.parametrize("kw", [dict(max_new_tokens=5), dict(max_new_tokens=5, output_scores=True,
                                                                return_dict_in_generate=True)])
def test_int8_prompt_of_several_tokens_after_a_one_row_decode(monkeypatch, kw):
    """A one-row layout serves only one-row calls: a batch-1 prompt of several tokens (1, n, d) runs fbgemm's
    product whether or not an earlier call left the layers their one-row copies."""
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    prompt = dict(pixel_values=inputs["pixel_values"][:1], input_ids=inputs["input_ids"][:1, :4], **kw)
    with torch.no_grad():
        first = model.generate(**prompt)
        assert any(m._layout is not None for m in model.modules() if isinstance(m, Int8Linear))
        again = model.generate(**prompt)
    if isinstance(first, torch.Tensor):
        np.testing.assert_array_equal(to_numpy(again), to_numpy(first))
    else:
        np.testing.assert_array_equal(to_numpy(again.sequences), to_numpy(first.sequences))
        for a, b in zip(again.scores, first.scores):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("onednn_rows", [0, 1], ids=["fbgemm", "onednn"])
def test_int8_model_follows_load_state_dict(monkeypatch, onednn_rows):
    """New weights copied into an int8 model (``load_state_dict`` writes in place) are the ones it multiplies by:
    its outputs equal those of the new weights quantised afresh, bit for bit, through either kernel (the model has
    run before, so its packed copies exist)."""
    monkeypatch.setattr(quantize, "ONEDNN_ROWS", onednn_rows)
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    other = randomize(bt.BlipForConditionalGeneration(model.config, seed=None), seed=1, std=0.2)
    px = torch.as_tensor(inputs["pixel_values"])
    with torch.no_grad():
        model.vision_model(pixel_values=px)
        model.load_state_dict(other.state_dict())
        fresh = quantize_int8(other)
        got = model.vision_model(pixel_values=px).last_hidden_state
        want = fresh.vision_model(pixel_values=px).last_hidden_state
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _fbgemm_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` (float32, 2-D) as an 8-bit row-wise table stores it, read back: 256 levels between the row's
    min and max, scale (max - min) / 255, code round((x - min) * 255 / (max - min + 1e-8)), fbgemm's documented
    rounding. Plain numpy, independent of the code under test."""
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    codes = np.rint((x - lo) * (np.float32(255) / (hi - lo + np.float32(1e-8)))).astype(np.float32)
    return codes * scale + lo


@pytest.mark.parametrize("beams", [1, 3])
def test_int8_decoding_attends_to_rowwise_8bit_image_keys_values(beams):
    """An int8 model's decoding step reads the image's keys and values from 8-bit row-wise tables (a key row: one
    feature of one head over every image position; a value row: one position of one head), the query and the
    probabilities unrounded: its context equals float64 attention over the keys/values so rounded, and not the one
    over the float32 keys/values. Beam search's rows of one image read its one copy."""
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    att = model.text_decoder.bert.encoder.layer[1].crossattention.self
    torch.manual_seed(0)
    with torch.no_grad():
        enc = model.vision_model(pixel_values=torch.as_tensor(inputs["pixel_values"][:2])).last_hidden_state
        images = enc.repeat_interleave(beams, 0)
        cached = att.cross_kv(images, beams)
        k, v = cached
        assert cached.rows8 is not None and all(t.dtype == torch.uint8 for t in cached.rows8)
        n, heads, s, hd = v.shape            # a byte an element, and 8 bytes of scale and min a row
        assert [tuple(t.shape) for t in cached.rows8] == [(n * heads * hd, s + 8), (n * heads * s, hd + 8)]
        x = torch.randn(images.shape[0], 1, att.query.in_features)
        got = att(x, None, images, cached)[0].double().numpy()
        q = att.query(x).view(-1, heads, hd).double().numpy()     # the layer's own (int8) query product
    keys = _fbgemm_rows(k.transpose(-1, -2).reshape(n * heads * hd, s).numpy()).reshape(n, heads, hd, s)
    values = _fbgemm_rows(v.reshape(n * heads * s, hd).numpy()).reshape(n, heads, s, hd)

    def context(keys_t, values):     # float64 attention of each row over its image's keys/values
        keys_t, values = (np.repeat(t.astype(np.float64), beams, 0) for t in (keys_t, values))
        scores = np.einsum("bhd,bhds->bhs", q, keys_t) / np.sqrt(hd)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bhs,bhsd->bhd", p, values).reshape(got.shape)

    rounded, plain = context(keys, values), context(k.transpose(-1, -2).numpy(), v.numpy())
    assert np.abs(rounded - plain).max() > 1e-4          # the rounding shows at this size
    np.testing.assert_allclose(got, rounded, rtol=0, atol=2e-5)


@pytest.mark.parametrize("rows", [[1, 1, 0], [1]])
def test_int8_image_tables_follow_rows_moved_between_images(rows):
    """A cache whose rows move between images or are dropped (a selection other than beam search's reorder) gives
    each new row its image's keys/values and 8-bit tables: byte for byte its image's blocks of the tables made for
    all the images (each table row is rounded on its own, so a block depends on its image alone)."""
    from backends.torch.text import TextCache
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    att = model.text_decoder.bert.encoder.layer[0].crossattention.self
    with torch.no_grad():
        enc = model.vision_model(pixel_values=torch.as_tensor(inputs["pixel_values"][:2])).last_hidden_state
        full = att.cross_kv(enc, 1)
        cache = TextCache(1)
        cache.cross_kv, cache.cross_repeats = [full], 1
        moved = cache.reorder(torch.tensor(rows)).cross_kv[0]
    assert moved.rows8 is not None and full.rows8 is not None
    for got, whole in zip(moved, full):
        assert torch.equal(got, whole[rows])
    for got, whole in zip(moved.rows8, full.rows8):      # (images x their rows, bytes): one block per image
        blocks = whole.view(2, -1, whole.shape[-1])
        assert torch.equal(got, blocks[rows].reshape(-1, whole.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_models_attend_to_their_image_keys_values_as_computed(dtype):
    """Only an int8 model rounds the image's keys/values to 8 bits: float32 and bfloat16 models keep them in their
    dtype, and their decoding step attends to them (float32: torch's attention to float32 rounding)."""
    path, inputs, _ = fixture("BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path).to(dtype)
    att = model.text_decoder.bert.encoder.layer[0].crossattention.self
    torch.manual_seed(0)
    with torch.no_grad():
        pixels = torch.as_tensor(inputs["pixel_values"][:2], dtype=dtype)
        enc = model.vision_model(pixel_values=pixels).last_hidden_state
        cached = att.cross_kv(enc, 1)
        assert cached.rows8 is None and cached[0].dtype == dtype
        if dtype == torch.float32:
            x = torch.randn(2, 1, att.query.in_features)
            got = att(x, None, enc, cached)[0]
            k, v = (att.split(lin(enc)) for lin in (att.key, att.value))
            want = torch.nn.functional.scaled_dot_product_attention(att.split(att.query(x)), k, v)
            torch.testing.assert_close(got, want.transpose(1, 2).reshape(got.shape), rtol=1e-5, atol=1e-5)
