"""PyTorch inference linears: oneDNN's inner product without gradients, ``F.linear`` everywhere else.

``backends.torch.layout.Linear`` (every linear layer of the torch models) calls oneDNN on the weight as
it is when no gradient is recorded; training, traces (ONNX export, ``torch.jit``) and the
``BLIP_TORCH_DECODE_LAYOUT=0`` switch keep ``F.linear``. The product is ``F.linear``'s to float32
rounding; row counts of 128 or more that are not a multiple of 8 reach oneDNN padded with zero rows, and
``linear_act`` puts the exact / tanh GELU and ReLU in oneDNN's epilogue.
"""
import pytest
import torch
import torch.nn.functional as F

from backends.torch import layout

needs_onednn = pytest.mark.skipif(layout._ONEDNN is None, reason="this torch build has no oneDNN")


def _recording(monkeypatch):
    """Count the calls that reach oneDNN's inner product."""
    calls = []
    product, reorder = layout._ONEDNN

    def counted(*args):
        calls.append(args[0].shape)
        return product(*args)
    monkeypatch.setattr(layout, "_ONEDNN", (counted, reorder))
    return calls


def _layer(bias=True, n_in=96, n_out=80, dtype=torch.float32):
    torch.manual_seed(0)
    return layout.Linear(n_in, n_out, bias=bias).to(dtype).eval()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 577, 96), (5, 96), (1, 1, 96)])
def test_inference_product_is_f_linear_to_rounding(monkeypatch, bias, shape):
    calls = _recording(monkeypatch)
    lin = _layer(bias)
    x = torch.randn(shape)
    with torch.no_grad():
        got = lin(x)
        want = F.linear(x, lin.weight, lin.bias)
    rows = x.numel() // x.shape[-1]
    padded = rows + (-rows % layout.PAD_ROWS if rows >= layout.PAD_MIN_ROWS else 0)
    assert calls == [(padded, 96) if padded != rows else x.shape]
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_bfloat16_inference_product(monkeypatch):
    calls = _recording(monkeypatch)
    lin = _layer(dtype=torch.bfloat16)
    x = torch.randn(4, 96).to(torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
    assert calls == [x.shape] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), lin.weight.float(), lin.bias.float()),
                               rtol=2e-2, atol=2e-2)


@needs_onednn
# torch.jit.trace on purpose: it is what the ONNX exporter records (torch marks it deprecated)
@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*deprecated:DeprecationWarning")
def test_gradients_traces_and_the_switch_keep_f_linear(monkeypatch):
    calls = _recording(monkeypatch)
    lin = _layer()
    x = torch.randn(2, 7, 96)
    y = lin(x)                                   # gradients recorded: autograd's F.linear
    y.sum().backward()
    assert lin.weight.grad is not None and calls == []
    with torch.no_grad():
        traced = torch.jit.trace(lin, x, check_trace=False)     # what the ONNX exporter records
    assert "linear" in str(traced.graph) and "mkldnn" not in str(traced.graph) and calls == []
    monkeypatch.setattr(layout, "ENABLED", False)
    with torch.no_grad():
        lin(x)
    assert calls == []


@needs_onednn
def test_strided_input_falls_back(monkeypatch):
    calls = _recording(monkeypatch)
    lin = _layer()
    x = torch.randn(96, 6).t()                   # not contiguous
    with torch.no_grad():
        got = lin(x)
    assert calls == []
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias))


@needs_onednn
@pytest.mark.parametrize("rows", [577, 1731, 130])
def test_padded_rows_give_the_unpadded_numbers(monkeypatch, rows):
    """The zero rows change no output row: the padded call's first rows equal oneDNN's unpadded product
    bit for bit here, and the output is contiguous with the input's leading shape."""
    calls = _recording(monkeypatch)
    lin = _layer()
    x = torch.randn(1, rows, 96)
    with torch.no_grad():
        got = lin(x)
        unpadded = layout._ONEDNN[0](x, lin.weight, lin.bias, "none", [], "")
    assert calls[0] == (rows + (-rows % 8), 96) and calls[0][0] % 8 == 0
    assert got.shape == (1, rows, 80) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, unpadded, rtol=1e-6, atol=1e-6)


@needs_onednn
def test_padded_output_feeds_the_next_product_without_a_copy(monkeypatch):
    """A padded product's output (a view of its first rows) reaches the next layer's oneDNN call as the
    padded buffer itself, and the kept rows equal those of a fresh padded copy bit for bit; a view that
    is not such a prefix (other rows, a wider base) is copied as before."""
    calls = []
    product, reorder = layout._ONEDNN
    monkeypatch.setattr(layout, "_ONEDNN", (lambda *a: calls.append(a[0]) or product(*a), reorder))
    torch.manual_seed(0)
    fc1, fc2 = layout.Linear(96, 200).eval(), layout.Linear(200, 96).eval()
    x = torch.randn(1, 577, 96)
    with torch.no_grad():
        h = layout.linear_act(fc1, x, "gelu")
        got = fc2(h)
        fresh = fc2(h.clone())       # a tensor of its own: copied into a new padded buffer
        assert calls[1].data_ptr() == h.data_ptr() and calls[1].shape == (584, 200)
        assert calls[2].data_ptr() != h.data_ptr()
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)
        assert got.shape == (1, 577, 96)
        calls.clear()
        wide = torch.randn(600, 200)
        fc2(wide[:577])               # the first rows of a larger tensor: not a padded buffer
        tail = torch.randn(591, 200)
        fc2(tail[7:])                 # rows that do not start at the base's first element
        assert calls[0].data_ptr() != wide.data_ptr() and calls[1].data_ptr() != tail.data_ptr()
        torch.testing.assert_close(fc2(wide[:577]), F.linear(wide[:577], fc2.weight, fc2.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("rows", [5, 577])
def test_activation_epilogue_is_the_activation_to_rounding(monkeypatch, act, rows):
    from backends.torch._base import activation
    posts = []
    product, reorder = layout._ONEDNN
    monkeypatch.setattr(layout, "_ONEDNN", (lambda *a: posts.append(a[3:]) or product(*a), reorder))
    lin = _layer()
    x = torch.randn(rows, 96) * 3
    with torch.no_grad():
        got = layout.linear_act(lin, x, act)
        want = activation(act)(F.linear(x, lin.weight, lin.bias))
    post, algorithm = layout.EPILOGUES[act]
    assert posts == [(post, [], algorithm)]      # the activation ran inside the product's call
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_activation_without_an_epilogue_composes(monkeypatch):
    """Gradients, an activation oneDNN lacks, a plain ``nn.Linear`` and a layer with a forward hook all get
    ``activation(lin(x))``; the hook still sees the call."""
    from backends.torch._base import activation
    calls = _recording(monkeypatch)
    lin = _layer()
    x = torch.randn(6, 96)
    want = activation("quick_gelu")(F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        torch.testing.assert_close(layout.linear_act(lin, x, "quick_gelu"), want, rtol=1e-5, atol=1e-5)
    y = layout.linear_act(lin, x, "gelu")
    assert y.requires_grad and calls == [x.shape]      # the quick_gelu product only; the gelu one recorded grads
    plain = torch.nn.Linear(96, 80)
    with torch.no_grad():
        torch.testing.assert_close(layout.linear_act(plain, x, "relu"), F.relu(plain(x)))
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(layout.linear_act(lin, x, "gelu"), F.gelu(F.linear(x, lin.weight, lin.bias)),
                                   rtol=1e-5, atol=1e-5)
    assert seen == [(6, 80)]
    fresh, everywhere = _layer(), []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: everywhere.append(type(m)))
    try:
        with torch.no_grad():
            layout.linear_act(fresh, x, "gelu")
    finally:
        handle.remove()
    assert everywhere == [layout.Linear]          # a global hook sees the layer's call too


# -- prepare_wide: products of many rows on a weight packed once ---------------------------------------------------
def _weights_seen(monkeypatch):
    """The weight argument of every call that reaches oneDNN's inner product (a packed copy is an mkldnn tensor)."""
    seen = []
    product, reorder = layout._ONEDNN

    def counted(x, w, *args):
        seen.append(("packed" if w.is_mkldnn else "plain", x.shape[0]))
        return product(x, w, *args)
    monkeypatch.setattr(layout, "_ONEDNN", (counted, reorder))
    return seen


class _Tower(torch.nn.Module):
    """Two layers as a vision MLP has them (GELU in the first product's epilogue)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2 = layout.Linear(96, 160), layout.Linear(160, 96)
        self.to(dtype).eval()

    def forward(self, x):
        return self.fc2(layout.linear_act(self.fc1, x, "gelu"))


@needs_onednn
@pytest.mark.parametrize("rows", [25, 130, 577, 1154])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_copy_gives_the_plain_weights_numbers(monkeypatch, rows, dtype):
    """More than PACK_MAX_ROWS rows run on the packed copy, whose products are oneDNN's on the plain weights bit for
    bit (padded rows and the GELU epilogue included) and F.linear's to rounding; fewer rows keep the plain weights."""
    seen = _weights_seen(monkeypatch)
    tower = _Tower(dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    with torch.no_grad():
        plain = tower(x)
        layout.prepare_wide(tower)
        seen.clear()
        wide = tower(x)
        small = tower(x[:, :layout.PACK_MAX_ROWS])
    assert [kind for kind, _ in seen] == ["packed", "packed", "plain", "plain"]
    assert torch.equal(wide, plain) and torch.equal(small, plain[:, :layout.PACK_MAX_ROWS])
    h = F.gelu(F.linear(x.float(), tower.fc1.weight.float(), tower.fc1.bias.float()))
    want = F.linear(h, tower.fc2.weight.float(), tower.fc2.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(wide.float(), want, rtol=tol, atol=tol)


@needs_onednn
def test_wide_copy_follows_the_weights_and_is_released(monkeypatch):
    """An in-place change of the weights (an optimizer step, ``load_state_dict``) makes the copy stale: the products
    follow the new weights at once, and the next ``prepare_wide`` packs them again; ``release_layouts`` drops it."""
    seen = _weights_seen(monkeypatch)
    tower = _Tower()
    x = torch.randn(200, 96)
    with torch.no_grad():
        layout.prepare_wide(tower)
        first = tower.fc1._wide_layout
        tower.fc1.weight.mul_(2)
        seen.clear()
        got = tower.fc1(x)
        assert seen == [("plain", 200)]
        torch.testing.assert_close(got, F.linear(x, tower.fc1.weight, tower.fc1.bias), rtol=1e-5, atol=1e-5)
        tower.load_state_dict({k: v + 1 for k, v in tower.state_dict().items()})
        layout.prepare_wide(tower)
        assert tower.fc1._wide_layout is not first and tower.fc1._wide_layout.fresh(tower.fc1)
        seen.clear()
        got = tower.fc1(x)
        assert seen == [("packed", 200)]
        torch.testing.assert_close(got, F.linear(x, tower.fc1.weight, tower.fc1.bias), rtol=1e-5, atol=1e-5)
    layout.release_layouts(tower)
    assert tower.fc1._wide_layout is None and tower.fc2._wide_layout is None


@needs_onednn
def test_no_wide_copy_in_training_with_gradients_under_the_switches_or_over_the_size(monkeypatch):
    """No copy while training (mode or gradients), under ``BLIP_TORCH_DECODE_LAYOUT=0`` / ``unpacked`` (no copies),
    for int8 layers (their own oneDNN products), or where the module's weights exceed ``WIDE_MAX_BYTES``."""
    from backends.torch.quantize import quantize_int8
    tower = _Tower()
    layout.prepare_wide(tower)                       # gradients enabled
    with torch.no_grad():
        layout.prepare_wide(tower.train())
        tower.eval()
        for name, value in (("ENABLED", False), ("COPIES", False), ("WIDE_MAX_BYTES", 160 * 96 * 4 * 2 - 1)):
            with monkeypatch.context() as m:
                m.setattr(layout, name, value)
                layout.prepare_wide(tower)
        assert tower.fc1._wide_layout is None and tower.fc2._wide_layout is None
        monkeypatch.setattr(layout, "WIDE_MAX_BYTES", 160 * 96 * 4 * 2)
        layout.prepare_wide(tower)
        assert tower.fc1._wide_layout is not None and tower.fc2._wide_layout is not None
        q = quantize_int8(_Tower())
        assert q.fc1.int8 and q.fc2.int8
        layout.prepare_wide(q)
        assert all(getattr(m, "_wide_layout", None) is None for m in q.modules())


@needs_onednn
def test_the_vision_tower_runs_on_wide_copies_at_inference():
    """A vision model's inference call packs every linear of its tower once (the next call reuses the copies); its
    states are those of the tower without copies bit for bit. Training calls make none."""
    import numpy as np
    import backends.torch as bt
    from fixture_utils import fixture
    model = bt.BlipVisionModel.from_pretrained(fixture("BlipVisionModel")[0])
    px = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    lins = [m for m in model.modules() if isinstance(m, layout.Linear)]
    model.train()
    model(pixel_values=px)
    assert lins and all(lin._wide_layout is None for lin in lins)
    model.eval()
    with torch.no_grad():
        got = model(pixel_values=px).last_hidden_state
        copies = [lin._wide_layout for lin in lins]
        assert all(c is not None for c in copies)
        again = model(pixel_values=px).last_hidden_state
        assert [lin._wide_layout for lin in lins] == copies
        layout.release_layouts(model)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(layout, "COPIES", False)
            plain = model(pixel_values=px).last_hidden_state
    assert torch.equal(got, plain) and torch.equal(again, plain)
