"""Matrix logarithm and matrix power of batched SPD matrices with stable gradients.

Both go through the eigendecomposition A = V diag(l) V^T, f(A) = V diag(f(l)) V^T, and the
Daleckii-Krein gradient G_A = V (D o (V^T sym(G) V)) V^T with the divided differences
D_ij = (f(l_i) - f(l_j)) / (l_i - l_j), D_ii = f'(l_i). The differences are formed from
ratios of eigenvalues (log1p / expm1), never from f(l_i) - f(l_j), so close and repeated
eigenvalues give the limit f'(l) instead of 0/0 or cancellation noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bcnn.ops._utils import (
    add_to_diagonal_,
    autocast_disabled,
    check_square,
    frobenius_norm,
    from_spectrum,
    sandwich,
    sandwich_t,
    symmetrize,
    to_compute,
)
from bcnn.ops.sqrtm import sqrtm

LogMethod = Literal["eigh", "iterative"]


def divided_difference(a: Tensor, b: Tensor, eps: float, p: float | None) -> Tensor:
    """f[a, b] = (f(a) - f(b)) / (a - b) elementwise (broadcasting), f'(a) where a == b.

    f is x -> log(max(x, eps)) (p is None) or x -> max(x, eps)^p. This is the exact divided
    difference of the clamped function: a pair of clamped values gets 0 and a
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
    gap = hi - lo
    x = gap / hi  # in [0, 1)
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
    both = torch.lt(a, eps) & torch.lt(b, eps)
    same = raw_gap == 0
    ratio = (lc_a - lc_b) / torch.where(same, torch.ones_like(raw_gap), raw_gap)
    ratio = torch.where(same, torch.ones_like(ratio), ratio)
    ratio = torch.where(both, torch.zeros_like(ratio), ratio)
    return dd * ratio


def _divided_differences(L: Tensor, eps: float, p: float | None) -> Tensor:
    """D_ij = f[l_i, l_j] for f = log (p is None) or f = l^p, at eigenvalues clamped at eps.

    This is the exact derivative of A -> V f(max(L, eps)) V^T: pairs of clamped eigenvalues
    get 0 and a clamped/unclamped pair is scaled by (lc_i - lc_j) / (l_i - l_j).

    Args:
        L: ``(..., d)`` eigenvalues (unclamped).
        eps: Clamp.
        p: Power, or None for the logarithm.

    Returns:
        ``(..., d, d)`` divided differences.
    """
    return divided_difference(L[..., :, None], L[..., None, :], eps, p)


class _SpectralFunction(torch.autograd.Function):
    """f(A) = V f(max(L, eps)) V^T with the Daleckii-Krein backward."""

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
            D = _divided_differences(L, ctx.eps, ctx.p)
            gA = sandwich(V, D * sandwich_t(V, symmetrize(grad)))
        return gA, None, None


def powm(A: Tensor, p: float, eps: float = 1e-8) -> Tensor:
    """Matrix power A^p, 0 < p <= 1, of batched symmetric PSD matrices.

    Domain: symmetric positive semi-definite A (the input is symmetrised); eigenvalues are
    clamped at ``eps``, so rank-deficient and zero matrices give finite values and
    gradients (the gradient is the exact one of the clamped function; its largest entries
    are about p * eps^(p - 1)). ``powm(A, 0.5)`` matches ``sqrtm(A, method="eigh")`` up to
    the clamp. Computed in float32 (float64 for float64 input), autocast disabled.

    Args:
        A: ``(..., d, d)`` symmetric PSD matrices.
        p: Exponent in (0, 1].
        eps: Eigenvalue floor (absolute, in the units of A).

    Returns:
        ``(..., d, d)`` A^p; float32, or float64 for float64 input.
    """
    check_square(A, "powm")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"powm: p must be in (0, 1], got {p}")
    if eps <= 0:
        raise ValueError(f"powm: eps must be > 0, got {eps}")
    with autocast_disabled(A.device.type):
        return _SpectralFunction.apply(symmetrize(to_compute(A)), float(eps), float(p))


def _log_series(X: Tensor, terms: int) -> Tensor:
    """log(I + X) by the Mercator series X - X^2/2 + X^3/3 - ... (Horner form), ||X|| < 1."""
    acc = torch.zeros_like(X)
    add_to_diagonal_(acc, 1.0 / terms)
    for j in range(terms - 1, 0, -1):
        acc = add_to_diagonal_(-(X @ acc), 1.0 / j)
    return X @ acc


def _logm_iterative(
    A: Tensor, eps: float, num_roots: int, sqrt_iters: int, series_terms: int
) -> Tensor:
    A = add_to_diagonal_(A.clone(), eps)
    # log(A) = log(c) I + 2^k log((A / c)^(1 / 2^k)); the scaling keeps the spectrum in
    # (0, 1] so that the repeated roots move every eigenvalue towards 1.
    c = frobenius_norm(A)
    R = A / c
    for _ in range(num_roots):
        R = sqrtm(R, method="newton_schulz", iters=sqrt_iters, backward="lyapunov_iterative")
    X = add_to_diagonal_(R.clone(), -1.0)
    out = _log_series(X, series_terms) * float(2**num_roots)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return out + torch.log(c) * eye


def logm(
    A: Tensor,
    method: LogMethod = "eigh",
    eps: float = 1e-6,
    *,
    num_roots: int = 6,
    sqrt_iters: int = 20,
    series_terms: int = 8,
) -> Tensor:
    """Matrix logarithm of batched symmetric positive definite matrices.

    Domain: A must be SPD; it is symmetrised, and eigenvalues below ``eps`` are clamped to
    ``eps`` (``"eigh"``) or ``eps * I`` is added (``"iterative"``), so singular Gram
    matrices give finite values (log(eps) on their null space) and finite gradients.

    Methods:
        * ``"eigh"``: eigendecomposition with the Daleckii-Krein gradient (divided
          differences with the limit 1/l for equal eigenvalues): exact and trainable.
        * ``"iterative"``: the talk's route log(A) = 2^k log(A^(1/2^k)) with ``num_roots``
          Newton-Schulz square roots (``sqrt_iters`` iterations each, iterative Lyapunov
          backward) and ``series_terms`` terms of the Mercator series; matmuls only.
          Accurate when ``sqrt_iters`` exceeds about log(cond(A)) / log(2.25) + 5.

    Computed in float32 (float64 for float64 input) with autocast disabled.

    Args:
        A: ``(..., d, d)`` symmetric positive definite matrices.
        method: ``"eigh"`` or ``"iterative"``.
        eps: Eigenvalue floor (absolute, in the units of A).
        num_roots: Square roots taken by ``"iterative"``.
        sqrt_iters: Newton-Schulz iterations per root (``"iterative"``).
        series_terms: Mercator terms (``"iterative"``).

    Returns:
        ``(..., d, d)`` log(A); float32, or float64 for float64 input.
    """
    check_square(A, "logm")
    if eps <= 0:
        raise ValueError(f"logm: eps must be > 0, got {eps}")
    with autocast_disabled(A.device.type):
        A = symmetrize(to_compute(A))
        if method == "eigh":
            return _SpectralFunction.apply(A, float(eps), None)
        if method == "iterative":
            if num_roots < 1 or series_terms < 1:
                raise ValueError("logm: num_roots and series_terms must be >= 1")
            return _logm_iterative(A, eps, num_roots, sqrt_iters, series_terms)
    raise ValueError(f"logm: method must be 'eigh' or 'iterative', got {method!r}")
