"""Compact bilinear pooling (Gao et al., CVPR 2016): Tensor Sketch and Random Maclaurin.

Both map the pooled outer product (1/n) sum_i x_i y_i^T (C x C2 dimensions) to ``out_dim``
dimensions such that inner products are preserved in expectation:
E <phi(x, y), phi(u, v)> = (x^T u)(y^T v), so E <phi(x), phi(y)> = (x^T y)^2 for the
symmetric form. The random projections are buffers (saved in the state dict) drawn from a
local ``torch.Generator`` seeded by ``seed``: the global RNG is never touched.

Feature layout: ``(..., n, C)``, n locations (H*W) and channels last; a ``(B, C, H, W)``
map becomes ``x.flatten(2).transpose(1, 2)``. Outputs average over the n locations.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor, nn

from bcnn.limits import Seed, checked
from bcnn.ops._utils import autocast_disabled, compute_dtype

# Output dimension of a sketch (8192 in the papers); 2^24 floats per image is the most a
# batch can hold.
SketchDim = Annotated[int, Interval(ge=1, le=2**24)]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _rademacher(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float32).mul_(2).sub_(1)


def _check_pair(x: Tensor, y: Tensor | None, in_dim: int, in_dim2: int, name: str) -> Tensor:
    if x.dim() < 2 or x.shape[-1] != in_dim:
        raise ValueError(f"{name}: expected x of shape (..., n, {in_dim}), got {tuple(x.shape)}")
    if y is None:
        if in_dim2 != in_dim:
            raise ValueError(f"{name}: in_dim2={in_dim2} != in_dim={in_dim}: pass y")
        return x
    if y.shape[:-1] != x.shape[:-1] or y.shape[-1] != in_dim2:
        raise ValueError(
            f"{name}: expected y of shape {(*x.shape[:-1], in_dim2)}, got {tuple(y.shape)}"
        )
    return y


class _CompactBilinear(nn.Module):
    """Shared dimensions, input checks and compute dtype of the compact bilinear maps.

    Subclasses draw their random projections (buffers) in ``_draw`` and implement ``_map``.

    Args:
        in_dim: Channels C of x.
        out_dim: Output dimension D.
        seed: Seed of the random projections.
        in_dim2: Channels of y for the two-input form (default: ``in_dim``).
    """

    @checked
    def __init__(
        self,
        in_dim: int,
        out_dim: SketchDim = 8192,
        seed: Seed = 0,
        in_dim2: int | None = None,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.in_dim2 = in_dim if in_dim2 is None else in_dim2
        self.out_dim = out_dim
        self._draw(_generator(seed))

    def _draw(self, gen: torch.Generator) -> None:
        """Register the random projections, drawn from ``gen``, as buffers."""
        raise NotImplementedError

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        """The averaged map of checked ``(..., n, C)`` inputs already in the compute dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Compact map of (1/n) sum_i x_i y_i^T (y = x when omitted).

        Args:
            x: ``(..., n, in_dim)`` features, channels last.
            y: ``(..., n, in_dim2)`` or None.

        Returns:
            ``(..., out_dim)``; float32, or float64 for float64 input.
        """
        y = _check_pair(x, y, self.in_dim, self.in_dim2, type(self).__name__)
        dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
        with autocast_disabled(x.device.type):
            return self._map(x.to(dtype), y.to(dtype))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, in_dim2={self.in_dim2}, out_dim={self.out_dim}"


class TensorSketch(_CompactBilinear):
    """Tensor Sketch of the (averaged) outer product, computed with ``torch.fft``.

    TS(x, y) = irfft(rfft(CS1(x)) * rfft(CS2(y))), with count sketches CS_k(v)_j =
    sum_{c: h_k(c) = j} s_k(c) v_c. The symmetric form uses both sketches on x.

    Args:
        in_dim: Channels C of x.
        out_dim: Sketch dimension D.
        seed: Seed of the hashes h (bins) and signs s.
        in_dim2: Channels of y for the two-input form (default: ``in_dim``).
    """

    h1: Tensor
    s1: Tensor
    h2: Tensor
    s2: Tensor

    def _draw(self, gen: torch.Generator) -> None:
        """Hashes h1 (in_dim,), h2 (in_dim2,) into [0, out_dim) and +-1 signs s1, s2."""
        bins = self.out_dim
        self.register_buffer("h1", torch.randint(0, bins, (self.in_dim,), generator=gen))
        self.register_buffer("s1", _rademacher((self.in_dim,), gen))
        self.register_buffer("h2", torch.randint(0, bins, (self.in_dim2,), generator=gen))
        self.register_buffer("s2", _rademacher((self.in_dim2,), gen))

    def _count_sketch(self, v: Tensor, h: Tensor, s: Tensor) -> Tensor:
        out = v.new_zeros(*v.shape[:-1], self.out_dim)
        return out.index_add(-1, h, v * s.to(v.dtype))

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        """Sketch of (1/n) sum_i x_i y_i^T for ``(..., n, C)`` inputs; ``(..., out_dim)``."""
        fx = torch.fft.rfft(self._count_sketch(x, self.h1, self.s1), dim=-1)
        fy = torch.fft.rfft(self._count_sketch(y, self.h2, self.s2), dim=-1)
        # The sketch is linear in x y^T: average in the frequency domain, one irfft.
        return torch.fft.irfft((fx * fy).mean(-2), n=self.out_dim, dim=-1)


class RandomMaclaurin(_CompactBilinear):
    """Random Maclaurin features of the (averaged) outer product.

    RM(x, y) = (x W1) o (y W2) / sqrt(D) with Rademacher (+-1) matrices W1 (C x D) and
    W2 (C2 x D). Memory: the two buffers hold (C + C2) * D floats (32 MB for C = 512,
    D = 8192).

    Args:
        in_dim: Channels C of x.
        out_dim: Output dimension D.
        seed: Seed of W1, W2.
        in_dim2: Channels of y for the two-input form (default: ``in_dim``).
    """

    W1: Tensor
    W2: Tensor

    def _draw(self, gen: torch.Generator) -> None:
        """Rademacher matrices W1 (in_dim, out_dim) and W2 (in_dim2, out_dim)."""
        self.register_buffer("W1", _rademacher((self.in_dim, self.out_dim), gen))
        self.register_buffer("W2", _rademacher((self.in_dim2, self.out_dim), gen))

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        """Features of (1/n) sum_i x_i y_i^T for ``(..., n, C)`` inputs; ``(..., out_dim)``."""
        px = x @ self.W1.to(x.dtype)
        py = y @ self.W2.to(y.dtype)
        return (px * py).mean(-2) * self.out_dim**-0.5
