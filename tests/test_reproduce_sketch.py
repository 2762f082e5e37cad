"""gamma-democratic aggregation in Tensor Sketch space (ECCV 2018 Tables 2-5 presets)."""

from __future__ import annotations

import pytest
import torch

from bcnn.ops import TensorSketch, democratic_pool
from bcnn.reproduce.sketch import DemocraticSketch


def _sketch_of_matrix(ts: TensorSketch, M: torch.Tensor) -> torch.Tensor:
    """The Tensor Sketch of a matrix from its definition: entry (c, c') goes to bin
    (h1[c] + h2[c']) mod D with sign s1[c] s2[c'] (the circular convolution of the two
    count sketches)."""
    out = M.new_zeros(M.shape[0], ts.out_dim)
    for c in range(M.shape[1]):
        for c2 in range(M.shape[2]):
            k = int(ts.h1[c] + ts.h2[c2]) % ts.out_dim
            out[:, k] += M[:, c, c2] * ts.s1[c] * ts.s2[c2]
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_democratic_sketch_is_the_sketch_of_the_democratic_matrix(gamma: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 6, generator=gen, dtype=torch.float64)
    x[0, :5] *= 10  # a few dominant locations, which democratic pooling evens out
    pool = DemocraticSketch(6, out_dim=32, seed=1, gamma=gamma, tau=0.5, iters=10)
    expected = _sketch_of_matrix(pool.sketch, democratic_pool(x, gamma=gamma))
    torch.testing.assert_close(pool(x), expected)
    if gamma == 1.0:  # sum pooling: the plain Tensor Sketch of (1/n) sum x x^T
        torch.testing.assert_close(pool(x), TensorSketch(6, out_dim=32, seed=1)(x))
    else:  # the weights matter: not the sum-pooled sketch
        assert not torch.allclose(pool(x), TensorSketch(6, out_dim=32, seed=1)(x))


def test_democratic_sketch_in_compact_pooling_and_one_stream_only() -> None:
    from bcnn.models.pooling import CompactPool

    head = CompactPool(8, sketch=lambda c, in_dim2=None: DemocraticSketch(c, 64, gamma=0.5))
    out = head(torch.rand(2, 8, 4, 4))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    assert head.output_shape.dims == (64,)
    with pytest.raises(ValueError, match="one stream"):
        DemocraticSketch(8, 64, in_dim2=16)
    with pytest.raises(ValueError, match="one stream"):
        DemocraticSketch(8, 64)(torch.rand(1, 4, 8), torch.rand(1, 4, 8))
