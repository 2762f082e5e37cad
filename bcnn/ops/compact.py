"""Compact bilinear pooling (Gao et al., CVPR 2016): Tensor Sketch and Random Maclaurin.

Both map the averaged outer product (1/n) sum_i x_i y_i^T of ``(..., n, C)`` features to
``out_dim`` numbers whose inner products are (x^T u)(y^T v) in expectation. The random
projections are buffers drawn from a local generator seeded by ``seed`` (the global RNG is
never touched). See docs/ops.md.
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


def _rademacher(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float32).mul_(2).sub_(1)


class _CompactBilinear(nn.Module):
    """Dimensions, input checks and compute dtype shared by the compact bilinear maps."""

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
        self._draw(torch.Generator(device="cpu").manual_seed(int(seed)))

    def _draw(self, gen: torch.Generator) -> None:
        """Registers the random projections, drawn from ``gen``, as buffers."""
        raise NotImplementedError

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        """The map of checked ``(..., n, C)`` inputs in the compute dtype: ``(..., out_dim)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Compact map of (1/n) sum_i x_i y_i^T (y = x when omitted).

        Args:
            x: ``(..., n, in_dim)`` features, channels last.
            y: ``(..., n, in_dim2)`` or None.

        Returns:
            ``(..., out_dim)``; float32, or float64 for float64 input.
        """
        name, d1, d2 = type(self).__name__, self.in_dim, self.in_dim2
        if x.dim() < 2 or x.shape[-1] != d1:
            raise ValueError(f"{name}: expected x of shape (..., n, {d1}), got {tuple(x.shape)}")
        if y is None:
            if d2 != d1:
                raise ValueError(f"{name}: in_dim2={d2} != in_dim={d1}: pass y")
            y = x
        elif y.shape[:-1] != x.shape[:-1] or y.shape[-1] != d2:
            raise ValueError(
                f"{name}: expected y of shape {(*x.shape[:-1], d2)}, got {tuple(y.shape)}"
            )
        dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
        with autocast_disabled(x.device.type):
            return self._map(x.to(dtype), y.to(dtype))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, in_dim2={self.in_dim2}, out_dim={self.out_dim}"


class TensorSketch(_CompactBilinear):
    """Tensor Sketch of the (averaged) outer product.

    TS(x, y) = irfft(rfft(CS1(x)) * rfft(CS2(y))), with count sketches CS_k(v)_j =
    sum_{c: h_k(c) = j} s_k(c) v_c. The symmetric form uses both sketches on x. The
    circular convolution equals the count sketch of the matrix itself, sum_ab s1(a) s2(b)
    M_ab e_((h1(a) + h2(b)) mod D), so it is computed by one of two routes, equal up to
    summation order: ``"fft"`` (per location, as the paper: n * D values per image) or
    ``"pooled"`` (a scatter of the pooled C x C2 matrix M = (1/n) sum_i x_i y_i^T). By
    default each call takes the smaller: the pooled route for VGG's 512 channels at
    n = 28 x 28, D = 8192 (25 times less memory), the FFT route for ResNet's 2048 at 14 x 14.

    Args:
        in_dim: Channels C of x.
        out_dim: Sketch dimension D.
        seed: Seed of the hashes h (bins) and signs s.
        in_dim2: Channels of y for the two-input form (default: ``in_dim``).

    Attributes:
        route: None (the smaller per call, ``route_for``), ``"fft"`` or ``"pooled"`` (the
            exported graph: no FFT, exact up to summation order).
    """

    h1: Tensor
    s1: Tensor
    h2: Tensor
    s2: Tensor
    route: str | None = None

    def _draw(self, gen: torch.Generator) -> None:
        # Hashes into [0, out_dim) and +-1 signs, drawn in the order h1, s1, h2, s2.
        for k, dim in ((1, self.in_dim), (2, self.in_dim2)):
            self.register_buffer(f"h{k}", torch.randint(0, self.out_dim, (dim,), generator=gen))
            self.register_buffer(f"s{k}", _rademacher((dim,), gen))

    def route_for(self, n: int) -> str:
        """The route a call on ``n`` locations takes: ``route``, else the one holding fewer
        values per image (C * C2 against n * D)."""
        if self.route is not None:
            return self.route
        return "pooled" if self.in_dim * self.in_dim2 <= n * self.out_dim else "fft"

    def _count_sketch(self, v: Tensor, h: Tensor, s: Tensor) -> Tensor:
        out = v.new_zeros(*v.shape[:-1], self.out_dim)
        return out.index_add(-1, h, v * s.to(v.dtype))

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        if self.route_for(x.shape[-2]) == "pooled":
            pooled = x.transpose(-2, -1) @ y / x.shape[-2]  # (..., C, C2); .mT: no ONNX
            signed = (pooled * (self.s1[:, None] * self.s2[None, :]).to(x.dtype)).flatten(-2)
            index = ((self.h1[:, None] + self.h2[None, :]) % self.out_dim).flatten()
            out = signed.new_zeros(*signed.shape[:-1], self.out_dim)
            # scatter_add, not index_add: the ONNX exporter maps it to ScatterElements(add).
            return out.scatter_add(-1, index.expand_as(signed), signed)
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
        self.register_buffer("W1", _rademacher((self.in_dim, self.out_dim), gen))
        self.register_buffer("W2", _rademacher((self.in_dim2, self.out_dim), gen))

    def _map(self, x: Tensor, y: Tensor) -> Tensor:
        px = x @ self.W1.to(x.dtype)
        py = y @ self.W2.to(y.dtype)
        return (px * py).mean(-2) * self.out_dim**-0.5
