"""Elementwise normalizations used after second-order pooling."""

from __future__ import annotations

import torch

from bcnn.limits import Positive
from bcnn.ops._utils import check_args
from bcnn.ops.spectral import Power


class _SignedPower(torch.autograd.Function):
    """sign(x) ((|x| + eps)^p - eps^p) with the derivative p (|x| + eps)^(p - 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
        base = x.abs() + eps
        ctx.save_for_backward(base)
        ctx.p = p
        return torch.sign(x) * (base.pow(p) - eps**p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (base,) = ctx.saved_tensors
        # At x = 0 the unguarded derivative p |x|^(p - 1) is infinite and turns the whole
        # backward pass into NaN; the guarded one is p eps^(p - 1), finite.
        return grad * ctx.p * base.pow(ctx.p - 1.0), None, None


@check_args
def signed_power(x: torch.Tensor, p: Power, eps: Positive = 1e-8) -> torch.Tensor:
    """Signed power ``sign(x) |x|^p``, 0 < p <= 1, with a guarded gradient.

    The value is ``sign(x) ((|x| + eps)^p - eps^p)``: 0 at 0, close to the exact signed
    power; its derivative ``p (|x| + eps)^(p - 1)`` is at most ``p eps^(p - 1)``.

    Args:
        x: Any shape, any floating dtype.
        p: Exponent in (0, 1].
        eps: Guard added inside the power.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    return _SignedPower.apply(x, float(p), float(eps))


def signed_sqrt(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Signed square root ``signed_power(x, 0.5, eps)``: within sqrt(eps) of sign(x) |x|^0.5,
    derivative at most 1 / (2 sqrt(eps)).

    Args:
        x: Any shape, any floating dtype.
        eps: Guard added under the root, > 0.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    return signed_power(x, 0.5, eps)
