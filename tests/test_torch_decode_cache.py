"""The torch text decoder's cache (``backends/torch/text.py``, ``TextCache``) against transformers 4.57.

Self-attention keys/values are written in place into buffers that start with room for
``TextCache.MIN_ROOM`` positions and double when full; beam search reorders them. Decoding past
that room (beam 3: growth and reordering, every token forced) must give transformers' ids, which grow their
cache by concatenation. A bfloat16 model keeps the image's keys/values in float32 (exact up-casts)
and attends in float32 during decoding: its cached steps must match its own uncached forward
(which attends in bfloat16) to bfloat16 rounding, and the cache must hold exactly the up-cast keys.
The decoding layout by default: packed copies in bfloat16; in float32 a transposed copy read by an
embedding-bag sum at one row (bit for bit the same sums however many column blocks), otherwise oneDNN
on the weights as they are.
"""
import numpy as np
import pytest
import torch

import backends.torch as bt
from backends.torch.text import BlipTextSelfAttention, TextCache
from blip_core import to_numpy
from fixture_utils import fixture, require

transformers = require("transformers")

NAME = "BlipForConditionalGeneration"


def test_beam_decoding_past_the_first_buffer_matches_transformers():
    path, inputs, _ = fixture(NAME)
    ref = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()
    ours, pixels = bt.BlipForConditionalGeneration.from_pretrained(path), inputs["pixel_values"]
    n = ours.config.text_config.max_position_embeddings - 2      # prompt (bos) + n tokens fit the positions
    assert n > TextCache.MIN_ROOM + 1                          # the buffers grow at least once
    kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=3)
    calls = []
    real = bt._base.one_query_attention
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(bt.text, "one_query_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = to_numpy(ours.generate(pixel_values=pixels, **kw))
        want = ref.generate(pixel_values=torch.from_numpy(pixels), **kw).numpy()
    np.testing.assert_array_equal(got, want)
    # every step (the prompt is bos alone: one query row from the first) attends to the cached image
    # keys/values through one_query_attention
    assert len(calls) == n * ours.config.text_config.num_hidden_layers


def test_cache_buffers_grow_and_reorder_like_concatenation():
    cache, ref = TextCache(1), None
    g = torch.Generator().manual_seed(0)
    for step in range(TextCache.MIN_ROOM * 2 + 5):
        t = 3 if step == 0 else 1
        k, v = torch.randn(4, 2, t, 8, generator=g), torch.randn(4, 2, t, 8, generator=g)
        got = cache.append(0, k, v)
        ref = (k, v) if ref is None else (torch.cat([ref[0], k], 2), torch.cat([ref[1], v], 2))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and cache.length == ref[0].shape[2]
        if step % 7 == 3:
            idx = torch.tensor([2, 2, 0, 1])
            cache.reorder(idx)
            ref = (ref[0][idx], ref[1][idx])
            assert torch.equal(cache.self_kv[0][0], ref[0]) and torch.equal(cache.self_kv[0][1], ref[1])


@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_matches_sdpa(masked):
    """The decoding steps' attention over the cached image keys/values (two embedding-bag sums) gives
    ``scaled_dot_product_attention``'s context to float32 rounding, with and without a padding mask."""
    from backends.torch._base import attention, fits_one_query_attention, one_query_attention
    g = torch.Generator().manual_seed(0)
    b, h, s, hd = 3, 4, 37, 16
    q = torch.randn(b, h, 1, hd, generator=g)
    k = torch.randn(b, h, hd, s, generator=g).transpose(-1, -2)       # stored transposed, as TextCache keeps it
    v = torch.randn(b, h, s, hd, generator=g)
    mask = None
    if masked:
        keep = torch.ones(b, s)
        keep[1, 30:] = 0
        mask = ((1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min)
    with torch.no_grad():
        assert fits_one_query_attention(q, k, v) and not fits_one_query_attention(q, k.contiguous(), v)
        got = one_query_attention(q, k, v, mask, scale=hd ** -0.5)
        want, _ = attention(q, k.contiguous(), v, mask, scale=hd ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():   # bfloat16: float32 sums, scores / probabilities / context rounded to bfloat16
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        assert fits_one_query_attention(qb, kb, vb)
        got = one_query_attention(qb, kb, vb, mask, scale=hd ** -0.5)
        exact, _ = attention(qb.double(), kb.double().contiguous(), vb.double(), mask, scale=hd ** -0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=0.0, atol=0.02 * float(exact.abs().max()))


@pytest.mark.parametrize("dtype,kv_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_half_precision_decoding_image_keys(dtype, kv_dtype):
    """The cached image keys/values: bfloat16 as computed, float16 up-cast to float32 (exactly); a stepped
    decode gives the full pass's logits to the dtype's rounding."""
    path, inputs, _ = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path, dtype=dtype)
    dec = model.text_decoder
    ids = torch.from_numpy(inputs["input_ids"]).long()
    with torch.no_grad():
        states = model.vision_model(inputs["pixel_values"]).last_hidden_state
        full = dec(ids, encoder_hidden_states=states, use_cache=False).logits.float()
        cache, steps = None, []
        for i in range(ids.shape[1]):
            out = dec(ids[:, i:i + 1], torch.ones(ids.shape[0], i + 1), encoder_hidden_states=states,
                      past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.float())
        layer = dec.bert.encoder.layer[0].crossattention.self
        k, v = cache.cross_kv[0]
        # the layouts one_query_attention reads: keys stored transposed, values contiguous
        assert k.dtype == v.dtype == kv_dtype and k.transpose(-1, -2).is_contiguous() and v.is_contiguous()
        assert torch.equal(k, layer.split(layer.key(states)).to(kv_dtype))
        assert torch.equal(v, layer.split(layer.value(states)).to(kv_dtype))
    stepped = torch.cat(steps, 1)
    assert stepped.dtype == full.dtype and stepped.shape == full.shape
    # bfloat16 rounding of logits spanning a few units: both attend to the same values
    torch.testing.assert_close(stepped, full, atol=0.05 * float(full.abs().max()), rtol=0.0)


@pytest.mark.parametrize("dtype,batch,beams,plan", [("bfloat16", 2, 1, "packed"), ("bfloat16", 1, 1, "transposed"),
                                                     ("float32", 1, 1, "transposed"), ("float32", 1, 3, "packed"),
                                                     ("float32", 2, 3, "packed"), ("float32", 2, 1, "unpacked")])
def test_decoding_layout_default_plan(monkeypatch, dtype, batch, beams, plan):
    """One row decodes from a transposed copy in either dtype; more rows from packed copies (bfloat16; float32 at
    ``PACK_MIN_ROWS`` to ``PACK_MAX_ROWS`` rows) or, float32 at two rows, oneDNN on the weights themselves (no copy);
    float32 ids are transformers'."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "ENABLED", None)          # the default (BLIP_TORCH_DECODE_LAYOUT unset)
    monkeypatch.setattr(layout, "COPIES", True)
    path, inputs, ref = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path, dtype=dtype)
    kw = dict(max_new_tokens=6, num_beams=beams)   # the goldens' length (beam search's best depends on it)
    with torch.no_grad():
        ids = to_numpy(model.generate(pixel_values=inputs["pixel_values"][:batch], **kw))
    laid = [m for m in model.modules() if isinstance(m, layout.Linear) and m._layout is not None]
    assert bool(laid) == layout.layout_supported(model)
    if not laid:
        return
    assert all(m._layout.rows == batch * beams and m._layout.how == plan and not m.runs_once for m in laid)
    selfs = [m for m in model.modules() if isinstance(m, BlipTextSelfAttention) and m.fused_projections]
    # one row: each self-attention's query, key and value share one transposed copy (``layout.project``)
    assert selfs and all((m.__dict__.get("_fused") is not None) == (plan == "transposed") for m in selfs)
    if plan != "transposed":
        copies = [m._layout.weight.is_mkldnn or m._layout.weight.data_ptr() != m.weight.data_ptr() for m in laid]
        assert all(copies) if plan == "packed" else not any(copies)
    before = [m._layout for m in laid]
    with torch.no_grad():   # a second call with as many rows reuses the layouts
        again = to_numpy(model.generate(pixel_values=inputs["pixel_values"][:batch], **kw))
    np.testing.assert_array_equal(again, ids)
    assert all(m._layout is lay for m, lay in zip(laid, before))
    if dtype == "float32":   # the goldens: transformers' ids
        want = ref["greedy_ids" if beams == 1 else "beam_ids"][:batch, : ids.shape[1]]
        np.testing.assert_array_equal(ids, want)
    lin = model.text_decoder.cls.predictions.decoder
    x = torch.randn(batch * beams, lin.in_features, dtype=lin.weight.dtype)
    with torch.no_grad():   # oneDNN's product: F.linear's to float32 (bfloat16) rounding
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=0.02, atol=0.02)
        torch.testing.assert_close(lin(x).float(), torch.nn.functional.linear(x, lin.weight, lin.bias).float(), **tol)
    monkeypatch.setattr(layout, "ENABLED", False)         # switched off at run time: the next call drops them
    with torch.no_grad():
        model.generate(pixel_values=inputs["pixel_values"][:batch], max_new_tokens=2, num_beams=beams)
    assert not any(isinstance(m, layout.Linear) and m._layout is not None for m in model.modules())
    assert not any("_fused" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_transposed_one_row_product(threads, monkeypatch):
    """The one-row layout (an embedding-bag sum over a transposed copy in column blocks, the bias as one more
    row) gives F.linear's product to float32 rounding, and the same bits for every block count and width,
    the last block padded where the width does not divide the outputs; with the bias, exactly ``y + b``."""
    from backends.torch import layout
    g = torch.Generator().manual_seed(0)
    for out, n_in in [(768, 96), (96, 768), (30, 64), (7 * 64, 64), (1100, 48), (30524, 16)]:
        w, b, x = (torch.randn(out, n_in, generator=g), torch.randn(out, generator=g),
                   torch.randn(1, 1, n_in, generator=g))
        t = layout._Transposed(w, b, threads)
        k, width = layout._blocks(out, threads)
        assert (t.k, tuple(t.table.shape)) == (k, (k * (n_in + 1), width))
        assert k % threads == 0 and width <= layout.MAX_WIDTH and 0 <= k * width - out < k
        y = t(x)
        assert y.shape == (1, 1, out)
        want = (x.double() @ w.double().T + b.double()).float()
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * n_in ** 0.5)
        assert torch.equal(layout._Transposed(w, None, threads)(x) + b, y)   # the bias last, as y + b
        for max_width in (64, 100, 10 ** 9):    # the same ordered sums in any blocks
            monkeypatch.setattr(layout, "MAX_WIDTH", max_width)
            assert torch.equal(y, layout._Transposed(w, b, 1)(x))
        monkeypatch.undo()


def test_transposed_one_row_product_bfloat16():
    """bfloat16 weights: float32 sums with the bias inside, rounded once, as oneDNN's product on the same
    weights rounds them (bits may differ by the order of the float32 sums only)."""
    from backends.torch import layout
    if layout._ONEDNN is None:
        pytest.fail("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(1)
    for out, n_in in [(3072, 768), (768, 3072), (1100, 48)]:
        w, b, x = (torch.randn(out, n_in, generator=g).bfloat16(), torch.randn(out, generator=g).bfloat16(),
                   torch.randn(1, n_in, generator=g).bfloat16())
        y = layout._Transposed(w, b, 2)(x)
        assert y.dtype == torch.bfloat16 and y.shape == (1, out)
        exact = x.double() @ w.double().T + b.double()
        torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-6 * n_in)   # one bfloat16 rounding
        onednn = layout._ONEDNN[0](x, layout._ONEDNN[1](w, 1), b, "none", [], "")
        torch.testing.assert_close(y, onednn, rtol=2 ** -7, atol=0.0)
        assert (y == onednn).float().mean() > 0.95


def test_decoding_layout_switches(monkeypatch):
    """``BLIP_TORCH_DECODE_LAYOUT``'s values as run-time settings: the default plan, ``unpacked`` (no transposed
    copies, float32 on its weights at every row count), ``1`` (packed everywhere), ``0`` (``F.linear``)."""
    from backends.torch import layout
    f32, bf16 = torch.float32, torch.bfloat16
    settings = {"default": (None, True), "unpacked": (None, False), "1": (True, True), "0": (False, True)}
    want = {"default": {(f32, 1): "transposed", (f32, 2): "unpacked", (f32, 3): "packed", (f32, 24): "packed",
                        (f32, 25): "unpacked", (f32, 32): "unpacked", (bf16, 1): "transposed", (bf16, 2): "packed",
                        (bf16, 32): "packed"},
            "unpacked": {(f32, 1): "unpacked", (f32, 2): "unpacked", (f32, 3): "unpacked", (f32, 24): "unpacked",
                         (bf16, 1): "packed", (bf16, 2): "packed"},
            "1": {(f32, 1): "packed", (f32, 3): "packed", (bf16, 1): "packed"},
            "0": {(f32, 1): "plain", (f32, 3): "plain", (bf16, 2): "plain"}}
    assert (layout.PACK_MIN_ROWS, layout.PACK_MAX_ROWS) == (3, 24)
    for mkl_rows in (0, 3):
        monkeypatch.setattr(layout, "MKL_ROWS", mkl_rows)
        for name, (enabled, copies) in settings.items():
            monkeypatch.setattr(layout, "ENABLED", enabled)
            monkeypatch.setattr(layout, "COPIES", copies)
            expected = dict(want[name])
            if name == "default" and mkl_rows:      # an Intel CPU's plan: float32 at 1-3 rows through MKL, no copy
                expected.update({(f32, 1): "plain", (f32, 2): "plain", (f32, 3): "plain", (f32, 4): "packed"})
            assert {key: layout.plan(*key) for key in expected} == expected, (name, mkl_rows)
            # int8 layers (float32 parameters) keep their one-row int8 copy under every default plan
            if name == "default":
                assert layout.plan(f32, 1, int8=True) == "transposed"


@pytest.mark.parametrize("batch,beams", [(1, 1), (2, 1), (1, 3)])
def test_intel_plan_decodes_few_rows_through_mkl_without_copies(monkeypatch, batch, beams):
    """Under ``MKL_ROWS`` (3 on Intel CPUs) float32 decoding at 1-3 rows makes no copy of any weight and runs every
    product of 1-3 rows through ``F.linear``, never oneDNN; its ids are transformers'."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    monkeypatch.setattr(layout, "MKL_ROWS", 3)
    path, inputs, ref = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    onednn_rows, plain_rows = [], []
    product, linear = layout._ONEDNN[0], torch.nn.functional.linear
    monkeypatch.setattr(layout, "_ONEDNN", (lambda x, *a: onednn_rows.append(x.numel() // x.shape[-1])
                                            or product(x, *a), layout._ONEDNN[1]))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: plain_rows.append(x.numel() // x.shape[-1])
                        or linear(x, *a))
    with torch.no_grad():
        ids = to_numpy(model.generate(pixel_values=inputs["pixel_values"][:batch], max_new_tokens=6, num_beams=beams))
    np.testing.assert_array_equal(ids, ref["greedy_ids" if beams == 1 else "beam_ids"][:batch, : ids.shape[1]])
    assert all(m._layout is None for m in model.modules() if isinstance(m, layout.Linear))
    assert not any(m.__dict__.get("_fused") for m in model.modules())
    # every step after the first: at least the 8 products of each decoder layer at batch x beams rows
    assert plain_rows.count(batch * beams) >= 8 * model.config.text_config.num_hidden_layers * (ids.shape[1] - 2)
    assert all(r > 3 for r in onednn_rows) and onednn_rows       # the vision tower and image keys/values: oneDNN


@pytest.mark.parametrize("how", ["from_pretrained", "quantize_int8"])
def test_int8_model_keeps_its_one_row_copy_under_the_intel_plan(monkeypatch, how):
    """An int8 model's parameters are float32, but its one-row products stay on the int8 copy under ``MKL_ROWS``:
    loaded with ``quantize="int8"``, or a float32 model that has decoded (through MKL, no copy) quantised after."""
    from backends.torch import layout
    from backends.torch.quantize import Int8Linear, int8_supported, quantize_int8
    if not int8_supported():
        pytest.fail("this torch build has no fbgemm int8 engine")
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    monkeypatch.setattr(layout, "MKL_ROWS", 3)
    path, inputs, _ = fixture(NAME)
    if how == "from_pretrained":
        model = bt.BlipForConditionalGeneration.from_pretrained(path, quantize="int8")
    else:
        model = bt.BlipForConditionalGeneration.from_pretrained(path)
        with torch.no_grad():
            model.generate(pixel_values=inputs["pixel_values"][:1], max_new_tokens=3)
        quantize_int8(model)
    with torch.no_grad():
        model.generate(pixel_values=inputs["pixel_values"][:1], max_new_tokens=3)
    decoding = [m for m in model.text_decoder.modules() if isinstance(m, Int8Linear) and not m.runs_once]
    fused = [m.__dict__.get("_fused") for m in model.text_decoder.modules() if m.__dict__.get("_fused")]
    assert decoding and fused
    assert all(m._layout is not None and m._layout.how == "transposed" for m in decoding
               if not any(m in f.lins for f in fused))


@pytest.mark.parametrize("setting,vendor,want", [("", "GenuineIntel", 3), ("", "AuthenticAMD", 0), ("", "", 0),
                                                 ("0", "GenuineIntel", 0), ("5", "AuthenticAMD", 5)])
def test_mkl_rows_setting(monkeypatch, setting, vendor, want):
    """``MKL_ROWS``: ``BLIP_TORCH_MKL_ROWS`` where set, else 3 on Intel CPUs and 0 elsewhere; a word is refused."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "_cpu_vendor", lambda: vendor)
    monkeypatch.setenv("BLIP_TORCH_MKL_ROWS", setting)
    assert layout._mkl_rows() == want
    monkeypatch.setenv("BLIP_TORCH_MKL_ROWS", "three")
    with pytest.raises(ValueError, match="BLIP_TORCH_MKL_ROWS"):
        layout._mkl_rows()


def test_transposed_layout_follows_its_bias():
    """A transposed copy holds the bias: an in-place change to the bias (or a new one) retires the layout."""
    from backends.torch import layout
    lin = layout.Linear(64, 96).eval()
    with torch.no_grad():
        layout.prepare_decoding(lin, 1)
        assert lin._layout is not None and lin._layout.how == layout.plan(torch.float32, 1)
        x = torch.randn(1, 64)
        before = lin(x)
        lin.bias.add_(1.0)
        torch.testing.assert_close(lin(x), before + 1.0)
        assert not lin._layout.fresh(lin)
        layout.prepare_decoding(lin, 1)
        assert lin._layout.fresh(lin)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        lin.bias = torch.nn.Parameter(torch.zeros(96))
        assert not lin._layout.fresh(lin)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_decoding_layout_follows_a_weight_parametrization():
    """A parametrization registered after the layout was made turns ``weight`` into a computed tensor: the
    layer's calls must use it, not the copy of the old parameter."""
    from backends.torch import layout
    from torch.nn.utils import parametrize
    lin = layout.Linear(64, 96).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        layout.prepare_decoding(lin, 1)
        assert lin._layout is not None and lin._layout.fresh(lin)
        plain = lin(x)
        parametrize.register_parametrization(lin, "weight", _Doubled())
        assert not lin._layout.fresh(lin)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        torch.testing.assert_close(lin(x) - lin.bias, 2 * (plain - lin.bias))


class _ThreeProjections(torch.nn.Module):
    """Three layers reading one input, named for fusion as a self-attention names its query, key and value."""

    fused_projections = ("a", "b", "c")

    def __init__(self, n_in, outs, bias=True):
        super().__init__()
        from backends.torch import layout
        self.a, self.b, self.c = (layout.Linear(n_in, out, bias=bias) for out in outs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_projections_are_their_layers_products(threads, bias, monkeypatch):
    """``prepare_decoding`` gives the layers a module names in ``fused_projections`` one transposed copy; one
    call (``project``) returns each layer's one-row product bit for bit as its own transposed copy would, and
    any call the copy cannot serve (more rows, gradients, a hook, a changed weight) is each layer's own call."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    torch.set_num_threads(threads)
    try:
        mod = _ThreeProjections(96, (96, 40, 300), bias).eval()
        lins = (mod.a, mod.b, mod.c)
        with torch.no_grad():
            layout.prepare_decoding(mod, 1)
            fused = mod.__dict__["_fused"]
            assert fused is not None and all(lin._layout is None for lin in lins)   # one copy serves all three
            x = torch.randn(1, 1, 96)
            got = layout.project(mod, x, lins)
            for y, lin in zip(got, lins):
                alone = layout._Transposed(lin.weight, lin.bias, threads)(x)
                assert y.shape == (1, 1, lin.out_features) and torch.equal(y, alone)
                torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
            two = torch.randn(2, 1, 96)     # two rows: each layer's own product
            for y, lin in zip(layout.project(mod, two, lins), lins):
                torch.testing.assert_close(y, torch.nn.functional.linear(two, lin.weight, lin.bias))
            seen = []
            handle = mod.b.register_forward_hook(lambda m, i, o: seen.append(o))
            layout.project(mod, x, lins)
            assert len(seen) == 1          # a hooked layer is called, not skipped
            handle.remove()
            mod.c.weight.mul_(2.0)         # an in-place change retires the shared copy
            assert not fused.fits(x)
            torch.testing.assert_close(layout.project(mod, x, lins)[2],
                                       torch.nn.functional.linear(x, mod.c.weight, mod.c.bias))
            layout.prepare_decoding(mod, 1)
            assert mod.__dict__["_fused"] is not fused and mod.__dict__["_fused"].fits(x)
        with torch.enable_grad():          # gradients: the plain layers, which autograd sees
            ys = layout.project(mod, x, lins)
            assert all(y.requires_grad for y in ys)
        layout.release_layouts(mod)
        assert "_fused" not in mod.__dict__
    finally:
        torch.set_num_threads(2)


def test_one_row_products_from_two_threads():
    """Each thread fills its own copy of a transposed layout's input buffer: two threads multiplying different
    rows through one layout at once each get their own products."""
    import threading
    from backends.torch import layout
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(768, 256, generator=g), torch.randn(768, generator=g)
    t = layout._Transposed(w, b, 2)
    xs = [torch.randn(1, 256, generator=g) for _ in range(2)]
    want = [t(x) for x in xs]
    bad = []

    def run(i):
        for _ in range(300):
            if not torch.equal(t(xs[i]), want[i]):
                bad.append(i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    assert not bad and not torch.equal(want[0], want[1])


def test_no_decoding_copies_where_they_would_not_fit(monkeypatch):
    """Copies of the decoding weights are made only where they fit in ``COPY_FRACTION`` of the memory the kernel
    reports available; otherwise the layers multiply the weights as they are, with the same ids. Copies made
    earlier and still fresh are kept (nothing new to allocate)."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    path, inputs, ref = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    pixels = inputs["pixel_values"][:1]
    for available, how in [(1, layout.UNPACKED), (None, layout.TRANSPOSED), (1, layout.TRANSPOSED)]:
        monkeypatch.setattr(layout, "memory_available", lambda: available)
        with torch.no_grad():
            ids = to_numpy(model.generate(pixel_values=pixels, max_new_tokens=6))
        np.testing.assert_array_equal(ids, ref["greedy_ids"][:1, : ids.shape[1]])
        laid = [m for m in model.modules() if isinstance(m, layout.Linear) and m._layout is not None]
        assert laid and all(m._layout.how == how for m in laid)
        if how == layout.UNPACKED:     # the weights themselves, no copy; no shared copies either
            assert all(m._layout.weight is m.weight.detach() or m._layout.weight.data_ptr() == m.weight.data_ptr()
                       for m in laid)
            assert not any(m.__dict__.get("_fused") is not None for m in model.modules())


def test_large_decoding_copies_wait_for_the_second_call(monkeypatch):
    """Copies above ``DEFER_BYTES`` are made from a model's second decoding call with as many rows on; the first
    multiplies the weights as they are. Ids are the goldens on both calls."""
    from backends.torch import layout
    monkeypatch.setattr(layout, "ENABLED", None)
    monkeypatch.setattr(layout, "COPIES", True)
    monkeypatch.setattr(layout, "DEFER_BYTES", 1)          # every copy counts as large
    monkeypatch.setattr(layout, "memory_available", lambda: None)
    path, inputs, ref = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    pixels = inputs["pixel_values"][:1]
    for how in (layout.UNPACKED, layout.TRANSPOSED, layout.TRANSPOSED):
        with torch.no_grad():
            ids = to_numpy(model.generate(pixel_values=pixels, max_new_tokens=6))
        np.testing.assert_array_equal(ids, ref["greedy_ids"][:1, : ids.shape[1]])
        laid = [m for m in model.modules() if isinstance(m, layout.Linear) and m._layout is not None]
        assert laid and all(m._layout.how == how for m in laid)
    layout.release_layouts(model)      # a released model starts over
    with torch.no_grad():
        model.generate(pixel_values=pixels, max_new_tokens=2)
    assert all(m._layout.how == layout.UNPACKED for m in model.modules()
               if isinstance(m, layout.Linear) and m._layout is not None)


def test_repeated_rows():
    """Runs of equal neighbouring rows, as beam search's ``repeat_interleave`` gives each input's beams."""
    from backends.torch._base import repeated_rows
    a, b, c = (torch.randn(5, 4) for _ in range(3))
    stack = lambda *rows: torch.stack(rows)   # noqa: E731
    assert repeated_rows(stack(a, a, a, b, b, b)) == 3
    assert repeated_rows(stack(a, a, a, a)) == 4
    assert repeated_rows(stack(a, b, c)) == 1
    assert repeated_rows(stack(a)) == 1
    assert repeated_rows(stack(a, a, b, b, b, c)) == 1       # runs of different lengths
    assert repeated_rows(stack(a, a, b, c)) == 1
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert repeated_rows(stack(nan, nan, b, b)) == 1          # NaN equals nothing: every row computed


def test_cross_kv_of_repeated_rows_is_one_per_image():
    """Beam search's copies of one image: keys/values computed and kept once per image, equal to each row's own."""
    from blip_core.configs import BlipTextConfig
    cfg = BlipTextConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=1,
                         vocab_size=50, encoder_hidden_size=48)
    layer = BlipTextSelfAttention(cfg, is_cross_attention=True).eval()
    images = torch.randn(2, 7, 48)
    states = images.repeat_interleave(3, 0)
    seen = []
    hook = layer.key.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        k, v = layer.cross_kv(states)
        assert seen == [2]        # the key product ran once per image, not once per beam
        hook.remove()
        for row in range(6):
            k1, v1 = layer.cross_kv(states[row:row + 1])
            torch.testing.assert_close(k[row // 3:row // 3 + 1], k1, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v[row // 3:row // 3 + 1], v1, rtol=1e-6, atol=1e-6)
    assert k.shape == (2, 4, 7, 16) and k.transpose(-1, -2).is_contiguous() and v.is_contiguous()


@pytest.mark.parametrize("output_attentions", [False, True])
def test_shared_image_keys_attend_as_each_rows(output_attentions):
    """A decoding step whose rows share one cached row of image keys/values per image (three beams each, a padding
    mask that differs per row) gives each row's context from its own keys/values: through the one-query sums, and
    through the full attention when the probabilities are asked for."""
    from blip_core.configs import BlipTextConfig
    cfg = BlipTextConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=1,
                         vocab_size=50, encoder_hidden_size=48)
    layer = BlipTextSelfAttention(cfg, is_cross_attention=True).eval()
    states = torch.randn(2, 7, 48).repeat_interleave(3, 0)
    x = torch.randn(6, 1, 64)
    keep = torch.ones(6, 7)
    keep[4, 5:] = 0
    mask = (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min
    with torch.no_grad():
        shared = layer.cross_kv(states)
        own = layer.cross_kv(states, repeats=1)
        assert shared[0].shape[0] == 2 and own[0].shape[0] == 6
        got, probs, _ = layer(x, mask, states, shared, output_attentions=output_attentions)
        want, want_probs, _ = layer(x, mask, states, own, output_attentions=output_attentions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if output_attentions:
        torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-7)


def test_beam_search_keeps_one_image_copy():
    """After a beam-3 ``generate`` over two images, the decoder's cache holds one row of image keys/values per
    image, not one per beam (BLIP base: 42 MB a row read every step)."""
    path, inputs, _ = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    seen = []
    real = bt.text.TextCache.reorder
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bt.text.TextCache, "reorder", lambda self, idx: seen.append(self) or real(self, idx))
        with torch.no_grad():
            model.generate(pixel_values=inputs["pixel_values"][:2], num_beams=3, max_new_tokens=3)
    assert seen and all(kv[0].shape[0] == kv[1].shape[0] == 2 for kv in seen[-1].cross_kv)


@pytest.mark.parametrize("idx", [[0, 1, 2, 3, 4, 5], [2, 0, 1, 5, 5, 3], [3, 4, 5, 0, 1, 2], [4, 0], [1, 1, 4, 4, 5, 0, 2, 3]])
def test_reordered_cache_follows_its_rows(idx):
    """A cache whose image keys/values are shared by runs of rows (two images, three rows each), reordered by any
    selection (beams among themselves, rows moved between images, fewer or more rows): the next step's logits equal
    those of a cache built for the selected rows from the start."""
    path, inputs, _ = fixture(NAME)
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    dec = model.text_decoder
    idx = torch.tensor(idx)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = model.vision_model(inputs["pixel_values"][:2]).last_hidden_state
        states = images.repeat_interleave(3, 0)
        ids = torch.randint(0, dec.config.vocab_size, (6, 3), generator=g)
        nxt = torch.randint(0, dec.config.vocab_size, (len(idx), 1), generator=g)
        cache = dec(ids, encoder_hidden_states=states, use_cache=True).past_key_values
        assert cache.cross_kv[0][0].shape[0] == 2
        cache.reorder(idx)
        got = dec(nxt, torch.ones(len(idx), 4), encoder_hidden_states=states[idx], past_key_values=cache,
                  use_cache=True).logits
        fresh = dec(ids[idx], encoder_hidden_states=states[idx], use_cache=True).past_key_values
        want = dec(nxt, torch.ones(len(idx), 4), encoder_hidden_states=states[idx], past_key_values=fresh,
                   use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k, v = cache.cross_kv[0]
    assert k.transpose(-1, -2).is_contiguous() and v.is_contiguous()
    kept = torch.equal(idx // 3, torch.arange(6) // 3)
    assert k.shape[0] == (2 if kept else len(idx))
