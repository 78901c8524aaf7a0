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
