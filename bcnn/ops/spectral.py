"""Matrix logarithm and matrix power of batched SPD matrices with stable gradients.

Both use A = V diag(l) V^T, f(A) = V f(l) V^T and the Daleckii-Krein gradient
G_A = V (D o V^T sym(G) V) V^T, D_ij = f[l_i, l_j] formed from eigenvalue ratios (log1p /
expm1), so close and repeated eigenvalues give the limit f'(l), not 0/0 or cancellation noise.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast

import torch
from annotated_types import Interval
from torch import Tensor

from bcnn.limits import Positive, PositiveInt
from bcnn.ops._utils import (
    add_to_diagonal_,
    autocast_disabled,
    check_args,
    check_square,
    frobenius_norm,
    from_spectrum,
    symmetrize,
    to_compute,
)
from bcnn.ops.sqrtm import sqrtm

LogMethod = Literal["eigh", "iterative"]
Power = Annotated[float, Interval(gt=0, le=1)]


def divided_difference(a: Tensor, b: Tensor, eps: float, p: float | None) -> Tensor:
    """f[a, b] = (f(a) - f(b)) / (a - b) elementwise (broadcasting), f'(a) where a == b.

    f is x -> log(max(x, eps)) (p is None) or x -> max(x, eps)^p, and this is the exact
    divided difference of the clamped function: a pair of clamped values gets 0 and a
    clamped/unclamped pair is scaled by (max(a, eps) - max(b, eps)) / (a - b).

    Args:
        a: Values (unclamped), broadcastable with ``b``.
        b: Values (unclamped).
        eps: Clamp.
        p: Power, or None for the logarithm.

    Returns:
        The divided differences, of the broadcast shape of a and b.
    """
    lc_a, lc_b = a.clamp_min(eps), b.clamp_min(eps)
    hi, lo = torch.maximum(lc_a, lc_b), torch.minimum(lc_a, lc_b)
    x = (hi - lo) / hi  # in [0, 1)
    equal = x == 0
    x_safe = torch.where(equal, torch.ones_like(x), x)
    # u = log(lo / hi): log1p where the ratio is close to 1 (no cancellation), the
    # difference of logs where it is far from 1 (no rounding of 1 - x).
    u = torch.where(x < 0.5, torch.log1p(-x_safe), torch.log(lo) - torch.log(hi))
    if p is None:
        dd = torch.where(equal, 1.0 / hi, -u / (x_safe * hi))
    else:
        dd = torch.where(equal, p * hi ** (p - 1), hi ** (p - 1) * -torch.expm1(p * u) / x_safe)
    # Chain rule through the clamp.
    raw_gap = a - b
    same = raw_gap == 0
    ratio = (lc_a - lc_b) / torch.where(same, torch.ones_like(raw_gap), raw_gap)
    ratio = torch.where(same, torch.ones_like(ratio), ratio)
    ratio = torch.where(torch.lt(a, eps) & torch.lt(b, eps), torch.zeros_like(ratio), ratio)
    return dd * ratio


class _SpectralFunction(torch.autograd.Function):
    """f(A) = V f(max(L, eps)) V^T with the Daleckii-Krein backward (p None: the log)."""

    @staticmethod
    def forward(ctx, A: Tensor, eps: float, p: float | None) -> Tensor:
        L, V = torch.linalg.eigh(A)
        lc = L.clamp_min(eps)
        f = torch.log(lc) if p is None else lc**p
        ctx.eps, ctx.p = eps, p
        ctx.save_for_backward(L, V)
        return from_spectrum(V, f)

    @staticmethod
    def backward(ctx, grad: Tensor):
        L, V = ctx.saved_tensors
        with autocast_disabled(grad.device.type):
            # The exact derivative of the clamped function (gradcheck passes at the clamp).
            D = divided_difference(L[..., :, None], L[..., None, :], ctx.eps, ctx.p)
            gA = V @ (D * (V.mT @ symmetrize(grad) @ V)) @ V.mT
        return gA, None, None


@check_args
def powm(A: Tensor, p: Power, eps: Positive = 1e-8) -> Tensor:
    """Matrix power A^p, 0 < p <= 1, of batched symmetric PSD matrices (symmetrised first).

    Eigenvalues are clamped at ``eps``, so rank-deficient and zero matrices give finite
    values and gradients (those of the clamped function; the largest entries are about
    p eps^(p - 1)).

    Args:
        A: ``(..., d, d)`` symmetric PSD matrices.
        p: Exponent in (0, 1].
        eps: Eigenvalue floor (absolute, in the units of A).

    Returns:
        ``(..., d, d)`` A^p; float32 (float64 for float64 input), autocast disabled.
    """
    check_square(A, "powm")
    with autocast_disabled(A.device.type):
        return _SpectralFunction.apply(symmetrize(to_compute(A)), float(eps), float(p))


def _logm_iterative(
    A: Tensor, eps: float, num_roots: int, sqrt_iters: int, series_terms: int
) -> Tensor:
    A = add_to_diagonal_(A.clone(), eps)
    # log(A) = log(c) I + 2^k log((A / c)^(1 / 2^k)); the scaling keeps the spectrum in
    # (0, 1] so that the repeated roots move every eigenvalue towards 1.
    c = frobenius_norm(A)
    R = A / c
    for _ in range(num_roots):
        R = cast(Tensor, sqrtm(R, "newton_schulz", sqrt_iters, "lyapunov_iterative"))
    X = add_to_diagonal_(R.clone(), -1.0)
    # log(I + X) by the Mercator series X - X^2/2 + X^3/3 - ... in Horner form (||X|| < 1).
    acc = add_to_diagonal_(torch.zeros_like(X), 1.0 / series_terms)
    for j in range(series_terms - 1, 0, -1):
        acc = add_to_diagonal_(-(X @ acc), 1.0 / j)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return X @ acc * float(2**num_roots) + torch.log(c) * eye


@check_args
def logm(
    A: Tensor,
    method: LogMethod = "eigh",
    eps: Positive = 1e-6,
    *,
    num_roots: PositiveInt = 6,
    sqrt_iters: int = 20,
    series_terms: PositiveInt = 8,
) -> Tensor:
    """Matrix logarithm of batched symmetric positive definite matrices (see docs/ops.md).

    Eigenvalues below ``eps`` are clamped to ``eps`` (``eigh``) or ``eps * I`` is added
    (``iterative``), so singular Gram matrices give finite values and gradients.

    Args:
        A: ``(..., d, d)`` symmetric positive definite matrices.
        method: ``eigh`` (exact, Daleckii-Krein gradient) or ``iterative`` (matmuls only:
            ``num_roots`` Newton-Schulz square roots and a Mercator series).
        eps: Eigenvalue floor (absolute, in the units of A).
        num_roots: Square roots taken by ``iterative``.
        sqrt_iters: Newton-Schulz iterations per root (``iterative``).
        series_terms: Mercator terms (``iterative``).

    Returns:
        ``(..., d, d)`` log(A); float32 (float64 for float64 input), autocast disabled.
    """
    check_square(A, "logm")
    with autocast_disabled(A.device.type):
        A = symmetrize(to_compute(A))
        if method == "eigh":
            return _SpectralFunction.apply(A, float(eps), None)
        return _logm_iterative(A, eps, num_roots, sqrt_iters, series_terms)
