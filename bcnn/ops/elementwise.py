"""Elementwise normalizations used after second-order pooling."""

from __future__ import annotations

import torch


class _SignedSqrt(torch.autograd.Function):
    """sign(x) * sqrt(|x| + eps) - sign(x) * sqrt(eps) with a bounded derivative at 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        root = torch.sqrt(x.abs() + eps)
        ctx.save_for_backward(root)
        return torch.sign(x) * (root - eps**0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (root,) = ctx.saved_tensors
        # d/dx sqrt(|x| + eps) = 1 / (2 sqrt(|x| + eps)); at x = 0 this is 1 / (2 sqrt(eps)),
        # finite, where the unguarded 1 / (2 sqrt(|x|)) is infinite and gives NaN downstream.
        return grad / (2.0 * root), None


def signed_sqrt(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Signed square root ``sign(x) * sqrt(|x|)`` with a guarded gradient.

    The forward value is ``sign(x) * (sqrt(|x| + eps) - sqrt(eps))``, which is 0 at 0,
    continuous and within ``sqrt(eps)`` of the exact signed square root; its derivative is
    ``1 / (2 sqrt(|x| + eps))``, at most ``1 / (2 sqrt(eps))``.

    Args:
        x: Any shape, any floating dtype.
        eps: Guard added under the root; must be > 0.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    if eps <= 0:
        raise ValueError(f"signed_sqrt: eps must be > 0, got {eps}")
    return _SignedSqrt.apply(x, eps)
