"""The spec layer's bicubic matrices reproduce torch.nn.functional.interpolate(mode="bicubic")."""
import numpy as np
import pytest
import torch

from blip_core.interpolate import bicubic_matrix, resize_grid


@pytest.mark.parametrize("h, w, oh, ow", [(4, 4, 6, 6), (4, 4, 3, 5), (24, 24, 36, 36), (5, 7, 2, 11), (3, 3, 3, 3),
                                          (1, 2, 4, 1)])
def test_matches_torch_bicubic(h, w, oh, ow):
    grid = np.random.default_rng(h * 100 + ow).standard_normal((h, w, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(oh, ow),
                                          mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    got = resize_grid(grid, oh, ow)
    assert got.dtype == grid.dtype
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_identity_size_is_identity_and_rows_sum_to_one():
    np.testing.assert_allclose(bicubic_matrix(7, 7), np.eye(7), atol=1e-12)
    np.testing.assert_allclose(bicubic_matrix(5, 9).sum(1), np.ones(9), atol=1e-12)
    with pytest.raises(ValueError):
        bicubic_matrix(0, 3)
