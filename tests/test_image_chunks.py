"""Vision towers over many images run a few images at a time (``blip_core.batching``): same numbers."""
import numpy as np
import pytest
import torch

from blip_core import batching
from blip_core.configs import BlipVisionConfig


def test_images_per_chunk_rule():
    # BLIP base at 384 px: a (577 * images, 3072) float32 output per image is 7.1 MB -> 9 fit in 64 MB
    assert batching.images_per_chunk(32, 577, 3072, 4) == 8          # 4 equal chunks, not 9 + 9 + 9 + 5
    assert batching.images_per_chunk(8, 577, 3072, 4) == 8           # one chunk: the batch itself
    assert batching.images_per_chunk(9, 577, 3072, 4) == 9
    assert batching.images_per_chunk(10, 577, 3072, 4) == 5
    assert batching.images_per_chunk(3, 10 ** 6, 10 ** 4, 4) == 1    # never fewer than one image
    assert batching.images_per_chunk(0, 577, 3072, 4) == 0
    assert batching.images_per_chunk(64, 577, 3072, 2) == 16         # bfloat16: twice as many
    assert batching.images_per_chunk(32, 577, 3072, 4, budget=1) == 1


@pytest.fixture
def tower(monkeypatch):
    import backends.torch as B
    cfg = BlipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
    # widest output: qkv, 17 tokens x 96 x 4 bytes = 6528 bytes per image; a budget of 20,000 bytes holds 3
    monkeypatch.setattr(batching, "CHUNK_BYTES", 20_000)
    torch.manual_seed(0)
    return B.BlipVisionModel(cfg).eval()


def test_chunked_tower_matches_one_pass(tower, monkeypatch):
    from backends.torch import vision
    calls = []
    real = vision.BlipEncoder._layers
    monkeypatch.setattr(vision.BlipEncoder, "_layers", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    px = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        chunked = tower(pixel_values=px)
    assert calls == [3, 3, 1]                   # ceil(7 / 3) = 3 chunks of ceil(7 / 3) = 3 images
    monkeypatch.setattr(batching, "CHUNK_BYTES", 1 << 40)
    calls.clear()
    with torch.no_grad():
        whole = tower(pixel_values=px)
    assert calls == []                          # one pass through the plain loop
    # bit for bit on the machines measured; a product kernel chosen by row count may round differently
    torch.testing.assert_close(chunked.last_hidden_state, whole.last_hidden_state, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.pooler_output, whole.pooler_output, rtol=1e-6, atol=1e-6)


def test_gradients_and_per_layer_outputs_run_in_one_pass(tower):
    px = np.random.default_rng(1).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = tower(pixel_values=px, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.attentions[0].shape == (7, 4, 17, 17)
    loss = tower(pixel_values=px).last_hidden_state.sum()      # gradients recorded: one pass, backward works
    loss.backward()
    assert tower.encoder.layers[0].mlp.fc1.weight.grad is not None


@pytest.mark.parametrize("tokens, widest, itemsize", [(577, 3072, 4), (17, 96, 4), (257, 6144, 2)])
def test_images_per_chunk_gives_the_fewest_equal_chunks_within_the_budget(tokens, widest, itemsize):
    """For every batch: chunks of ``images_per_chunk`` images fit the budget, and running the batch in such chunks
    takes the fewest chunks any split within the budget can (ceil(batch / images that fit)), the last one no
    larger than the others -- checked against a brute-force search over chunk sizes."""
    budget = 20_000 if tokens == 17 else batching.CHUNK_BYTES
    per_image = tokens * widest * itemsize
    for batch in range(1, 70):
        got = batching.images_per_chunk(batch, tokens, widest, itemsize, budget=budget)
        fits = [n for n in range(1, batch + 1) if n * per_image <= budget] or [1]
        fewest = min(-(-batch // n) for n in fits)
        assert got * per_image <= budget or got == 1, (batch, got)
        assert -(-batch // got) == fewest, (batch, got)
        assert got == min(n for n in fits if -(-batch // n) == fewest), (batch, got)   # as even as possible
