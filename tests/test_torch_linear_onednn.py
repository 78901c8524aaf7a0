"""PyTorch inference linears: oneDNN's inner product without gradients, ``F.linear`` everywhere else.

``backends.torch.layout.Linear`` (every linear layer of the torch models) calls oneDNN on the weight as
it is when no gradient is recorded; training, traces (ONNX export, ``torch.jit``) and the
``BLIP_TORCH_DECODE_LAYOUT=0`` switch keep ``F.linear``. The product is ``F.linear``'s to float32
rounding.
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
    assert calls == [x.shape]
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
