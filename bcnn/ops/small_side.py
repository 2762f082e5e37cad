"""Matrix functions of pooled second-order matrices computed on the small (n x n) side.

For features X ``(..., n, d)`` with n < d, f(X^T X / n + r I) follows from the eigenpairs of
the n x n Gram matrix X X^T / n, and its gradient from second divided differences on that
side (nothing divides by l_i - l_j); Newton-Schulz runs on n x n coefficients. The formulas,
the cost rule (:func:`small_side_cheaper`) and the measurements are in ``docs/ops.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bcnn.limits import NonNegative, Positive, PositiveInt
from bcnn.ops._utils import autocast_disabled, check_args, symmetrize, to_compute
from bcnn.ops.spectral import Power, divided_difference
from bcnn.ops.sqrtm import (
    Iters,
    Scale,
    lyapunov_iterative_matmuls,
    newton_schulz_matmuls,
    resolve_sqrtm,
)

Fn = Literal["sqrt", "power", "log"]
SqrtMethod = Literal["eigh", "newton_schulz", "auto"]
EpsMode = Literal["abs", "trace"]
CostMethod = Literal["eigh", "newton_schulz"]
# Eigenvalue floors of the d x d routes (``powm`` and ``logm`` defaults).
DEFAULT_FLOOR = {"power": 1e-8, "log": 1e-6}

# Cost model of :func:`small_side_cheaper`, in flops: a batched (m x k) @ (k x q) matmul is
# 2 m k q; a LAPACK eigh with eigenvectors of an m x m matrix is EIGH_FLOPS * m^3 (about 7
# matmuls of the same size at m = 512 on the project's CPU, see SQRTM_AUTO_TABLE).
EIGH_FLOPS = 14.0
# The small side must be modelled this many times cheaper: its n x n eigh and small matmuls
# run further from peak, and the elementwise passes over the d x d output (the same on both
# routes) are not counted. Checked with scripts/bench_small_side.py (docs/ops.md).
COST_MARGIN = 2.0
# Below this many channels per-call overheads (a dozen small n x n products) outweigh the
# flop count and the gain is small: not calibrated, so keep d x d there.
MIN_CHANNELS = 128


def _features(X: Tensor, name: str, eps: float, eps_mode: EpsMode) -> tuple[Tensor, Tensor]:
    """Checked ``(..., n, d)`` features in the compute dtype, and their ridge r ``(...)``."""
    if X.dim() < 2:
        raise ValueError(f"{name}: expected features X of shape (..., n, d), got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features X, got {X.dtype}")
    n, d = X.shape[-2], X.shape[-1]
    if n < 1 or d < 1:
        raise ValueError(f"{name}: X needs n >= 1 locations and d >= 1 channels, got {(n, d)}")
    X = to_compute(X)
    return X, ridge_from_features(X, eps, eps_mode)


@check_args
def ridge_from_features(X: Tensor, eps: NonNegative, eps_mode: EpsMode) -> Tensor:
    """The ridge r of M = A + r I, A = X^T X / n, as the d x d route's ``add_ridge`` adds it.

    Args:
        X: ``(..., n, d)`` features.
        eps: Ridge; 0 gives r = 0.
        eps_mode: ``"abs"`` (r = eps) or ``"trace"`` (r = eps tr(A) / d = eps ||X||_F^2 / (n d),
            differentiable in X).

    Returns:
        ``(...)`` r, in X's dtype.
    """
    batch = X.shape[:-2]
    if eps == 0:
        return X.new_zeros(batch)
    if eps_mode == "abs":
        return X.new_full(batch, float(eps))
    n, d = X.shape[-2], X.shape[-1]
    return (X * X).sum((-2, -1)) * (eps / (n * d))


# Exact route: eigh of G and divided differences.


def _f(x: Tensor, kind: str, p: float, floor: float) -> Tensor:
    if kind == "sqrt":
        return x.clamp_min(0).sqrt()
    xc = x.clamp_min(floor)
    return torch.log(xc) if kind == "log" else xc**p


def _second_dd(li: Tensor, lj: Tensor, d_ij: Tensor, g_i: Tensor, g_j: Tensor) -> Tensor:
    """f[r + l_i, r + l_j, r] from first divided differences (l >= 0, broadcasting).

    With d_ij = f[x_i, x_j], g_i = f[x_i, r], g_j = f[x_j, r]: (d_ij - g_k) / max(l_i, l_j),
    k the index of the smaller l, so that the denominator is the largest of the three gaps.
    When both l are tiny against r the difference cancels, but K enters the gradient only as
    K_ij H_ij (U^T X)_j, which is O(l): the absolute error stays ~eps_mach f'(r) |S|. Where
    both l are 0 the rows of U^T X and H vanish and K is irrelevant: 0.
    """
    lmax = torch.maximum(li, lj)
    g_small = torch.where(li <= lj, g_i, g_j)
    positive = lmax > 0
    diff = (d_ij - g_small) / torch.where(positive, lmax, torch.ones_like(lmax))
    return torch.where(positive, diff, torch.zeros_like(diff))


def _coefficients(
    l: Tensor, r: Tensor, kind: str, p: float, floor: float, grad: bool
) -> dict[str, Tensor]:
    """Divided differences of f at the spectrum x = l + r (n eigenvalues) and r (null space).

    Returns ``f_r`` = f(r) ``(...)`` and ``g`` = f[x_k, r] ``(..., n)``; with ``grad`` also
    ``fp_r`` = f'(r), ``K`` = f[x_i, x_j, r] ``(..., n, n)`` and ``Kp`` = f[x_k, r, r]
    ``(..., n)``. The square root mirrors ``sqrtm``'s ``lyapunov_eig``: denominators
    s_i + s_j (s = sqrt(x)) floored at max(sqrt(eps_mach) s_max, eps_mach), and the closed
    form -1 / ((s_i + s_j)(s_i + s_r)(s_j + s_r)) for the second differences.
    """
    rr = r[..., None]
    x = l + rr
    out: dict[str, Tensor] = {"f_r": _f(r, kind, p, floor)}
    if kind == "sqrt":
        s = x.sqrt()
        s_r = r.sqrt()
        eps = torch.finfo(l.dtype).eps
        guard = (s.amax(-1) * eps**0.5).clamp_min(eps)  # (...)
        g = 1.0 / torch.maximum(s + s_r[..., None], guard[..., None])
        out["g"] = g
        if grad:
            fp_r = 1.0 / torch.maximum(2.0 * s_r, guard)
            D = 1.0 / torch.maximum(s[..., :, None] + s[..., None, :], guard[..., None, None])
            out["fp_r"] = fp_r
            out["K"] = -D * g[..., :, None] * g[..., None, :]
            out["Kp"] = -g * g * fp_r[..., None]
        return out
    pp = None if kind == "log" else p
    g = divided_difference(x, rr, floor, pp)
    out["g"] = g
    if grad:
        fp_r = divided_difference(r, r, floor, pp)
        D = divided_difference(x[..., :, None], x[..., None, :], floor, pp)
        out["fp_r"] = fp_r
        out["K"] = _second_dd(l[..., :, None], l[..., None, :], D, g[..., :, None], g[..., None, :])
        out["Kp"] = _second_dd(l, torch.zeros_like(l), g, g, fp_r[..., None].expand_as(g))
    return out


class _SmallSideSpectral(torch.autograd.Function):
    """f(X^T X / n + r I) from the eigendecomposition of X X^T / n; custom backward."""

    @staticmethod
    def forward(ctx, X: Tensor, r: Tensor, kind: str, p: float, floor: float) -> Tensor:
        n = X.shape[-2]
        G = symmetrize(X @ X.mT) / n
        l, U = torch.linalg.eigh(G)
        # The eigenvalues of a Gram matrix are >= 0; negative ones are rounding noise.
        l = l.clamp_min(0)
        Xu = U.mT @ X  # rows: X^T u_k, of squared norm n l_k
        c = _coefficients(l, r, kind, p, floor, grad=False)
        F = (Xu.mT * (c["g"] / n)[..., None, :]) @ Xu
        F.diagonal(dim1=-2, dim2=-1).add_(c["f_r"][..., None])
        ctx.kind, ctx.p, ctx.floor = kind, p, floor
        ctx.save_for_backward(U, Xu, l, r)
        return F

    @staticmethod
    def backward(ctx, grad: Tensor):
        U, Xu, l, r = ctx.saved_tensors
        n = Xu.shape[-2]
        with autocast_disabled(grad.device.type):
            # S = sym(grad); its factor 1/2 is applied on the n x d side (one d x d pass less).
            S2 = grad + grad.mT
            c = _coefficients(l, r, ctx.kind, ctx.p, ctx.floor, grad=True)
            XuS = (Xu @ S2).mul_(0.5)
            H = (XuS @ Xu.mT) / n
            gX = gr = None
            if ctx.needs_input_grad[0]:
                W = (c["K"] * H) @ Xu + c["g"][..., :, None] * XuS
                gX = U @ W * (2.0 / n)
            if ctx.needs_input_grad[1]:
                Hd = H.diagonal(dim1=-2, dim2=-1)
                Kd = c["K"].diagonal(dim1=-2, dim2=-1)
                trS = S2.diagonal(dim1=-2, dim2=-1).sum(-1) * 0.5
                gr = c["fp_r"] * trS + ((Kd + c["Kp"]) * Hd).sum(-1)
        return gX, gr, None, None, None


# Newton-Schulz on the small side: iterates a I + X^T P X / n as pairs (a, P).


def _ns_product(a: Tensor, P: Tensor, b: Tensor, Q: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """(a I + X^T P X / n)(b I + X^T Q X / n) as (a b, a Q + b P + P G Q)."""
    return a * b, a[..., None, None] * Q + b[..., None, None] * P + P @ G @ Q


def _newton_schulz_small(X: Tensor, r: Tensor, iters: int, scale: str) -> Tensor:
    """``sqrtm``'s coupled Newton-Schulz on M = X^T X / n + r I, run on n x n coefficients."""
    n, d = X.shape[-2], X.shape[-1]
    G = symmetrize(X @ X.mT) / n
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    eps = torch.finfo(X.dtype).eps
    # ``sqrtm``'s normalisation of M, from G (same floors).
    if scale == "fro":
        sq = (G * G).sum((-2, -1)) + 2.0 * r * trace + d * r * r
        c = sq.clamp_min(eps * eps).sqrt()
    else:
        c = (trace + d * r).clamp_min(eps)
    # Y0 = M / c = (r / c) I + X^T (I / c) X / n; Z0 = I (za None: its products are free).
    ya, yP = r / c, torch.eye(n, dtype=X.dtype, device=X.device) / c[..., None, None]
    za: Tensor | None = None
    zP = yP  # unused while za is None
    for k in range(iters):
        pa, pP = (ya, yP) if za is None else _ns_product(za, zP, ya, yP, G)
        ta, tP = 1.5 - 0.5 * pa, -0.5 * pP  # T = (3 I - Z Y) / 2
        ya, yP = _ns_product(ya, yP, ta, tP, G)
        if k < iters - 1:
            za, zP = (ta, tP) if za is None else _ns_product(ta, tP, za, zP, G)
    # Y = (ya I + X^T yP X / n) sqrt(c).
    root_c = c.sqrt()
    F = X.mT @ ((yP * (root_c / n)[..., None, None]) @ X)
    F.diagonal(dim1=-2, dim2=-1).add_((ya * root_c)[..., None])
    return F


# Public API: each equals its d x d route on add_ridge(X^T X / n, eps, eps_mode) in value
# and gradient (docs/ops.md).


@check_args
def sqrtm_from_features(
    X: Tensor,
    method: SqrtMethod = "eigh",
    iters: Iters = 5,
    scale: Scale = "fro",
    eps: NonNegative = 0.0,
    eps_mode: EpsMode = "abs",
) -> Tensor:
    """(X^T X / n + r I)^(1/2) from the n x n Gram matrix X X^T / n.

    ``eigh`` equals ``sqrtm(M, "eigh", backward="lyapunov_eig")``; ``newton_schulz`` equals
    ``sqrtm(M, "newton_schulz", iters, scale=scale, backward="autograd")`` (not the default
    ``lyapunov_iterative`` gradient, another approximation).

    Args:
        X: ``(..., n, d)`` features, rows = locations.
        method: ``eigh`` (exact), ``newton_schulz`` or ``auto`` (``sqrtm``'s device table;
            its ``svd`` gives ``eigh``).
        iters: Newton-Schulz iterations.
        scale: Newton-Schulz normalisation of M, ``fro`` or ``trace``.
        eps: Ridge (0: none).
        eps_mode: ``abs`` (r = eps) or ``trace`` (r = eps tr(A) / d).

    Returns:
        ``(..., d, d)`` square root; float32 (float64 for float64 input), autocast disabled.
    """
    with autocast_disabled(X.device.type):
        X, r = _features(X, "sqrtm_from_features", eps, eps_mode)
        if method == "auto":
            resolved = resolve_sqrtm("auto", "auto", X.device.type, X.shape[-1])[0]
            method = "newton_schulz" if resolved == "newton_schulz" else "eigh"
        if method == "newton_schulz":
            return _newton_schulz_small(X, r, iters, scale)
        return _SmallSideSpectral.apply(X, r, "sqrt", 0.5, 0.0)


@check_args
def powm_from_features(
    X: Tensor,
    p: Power,
    eps: NonNegative = 0.0,
    eps_mode: EpsMode = "abs",
    floor: Positive = 1e-8,
) -> Tensor:
    """(X^T X / n + r I)^p, 0 < p <= 1: ``powm(M, p, eps=floor)`` from the n x n side.

    Args:
        X: ``(..., n, d)`` features.
        p: Exponent in (0, 1].
        eps: Ridge (0: none).
        eps_mode: ``abs`` or ``trace``.
        floor: Eigenvalue floor (absolute).

    Returns:
        ``(..., d, d)`` M^p; float32 (float64 for float64 input), autocast disabled.
    """
    with autocast_disabled(X.device.type):
        X, r = _features(X, "powm_from_features", eps, eps_mode)
        return _SmallSideSpectral.apply(X, r, "power", float(p), float(floor))


@check_args
def logm_from_features(
    X: Tensor, eps: NonNegative = 0.0, eps_mode: EpsMode = "abs", floor: Positive = 1e-6
) -> Tensor:
    """log(X^T X / n + r I): ``logm(M, "eigh", eps=floor)`` from the n x n side.

    Args:
        X: ``(..., n, d)`` features.
        eps: Ridge (0: none).
        eps_mode: ``abs`` or ``trace``.
        floor: Eigenvalue floor (absolute); the null space of X^T X gives log(max(r, floor)).

    Returns:
        ``(..., d, d)`` log(M); float32 (float64 for float64 input), autocast disabled.
    """
    with autocast_disabled(X.device.type):
        X, r = _features(X, "logm_from_features", eps, eps_mode)
        return _SmallSideSpectral.apply(X, r, "log", 1.0, float(floor))


@check_args
def matrix_function_from_features(
    X: Tensor,
    fn: Fn,
    *,
    p: Power = 0.5,
    method: SqrtMethod = "eigh",
    iters: Iters = 5,
    scale: Scale = "fro",
    eps: NonNegative = 0.0,
    eps_mode: EpsMode = "abs",
    floor: float | None = None,
) -> Tensor:
    """f(X^T X / n + r I) for f in {sqrt, power, log}, on the n x n side.

    Dispatches to :func:`sqrtm_from_features` (``method``, ``iters``, ``scale``),
    :func:`powm_from_features` (``p``, ``floor``) or :func:`logm_from_features` (``floor``);
    ``floor=None`` is ``powm``'s (1e-8) or ``logm``'s (1e-6) default. ``fn="power"`` with
    p = 0.5 is ``powm``'s square root, not ``sqrtm``'s.

    Args:
        X: ``(..., n, d)`` features.
        fn: ``sqrt``, ``power`` or ``log``.
        p, method, iters, scale, eps, eps_mode, floor: As the function dispatched to.

    Returns:
        ``(..., d, d)`` f(M); float32, or float64 for float64 input.
    """
    if fn == "sqrt":
        return sqrtm_from_features(X, method, iters, scale, eps, eps_mode)
    fl = DEFAULT_FLOOR[fn] if floor is None else floor
    if fn == "power":
        return powm_from_features(X, p, eps, eps_mode, fl)
    return logm_from_features(X, eps, eps_mode, fl)


# Cost rule.


@check_args
def small_side_flops(n: int, d: int, method: CostMethod = "eigh", iters: int = 5) -> float:
    """Modelled flops of forward + backward (w.r.t. X) of the small-side route, per matrix.

    Args:
        n: Locations.
        d: Channels.
        method: ``eigh`` (square root, power, log) or ``newton_schulz``.
        iters: Newton-Schulz iterations.

    Returns:
        Flops.
    """
    nd2, n2d, n3 = 2.0 * n * d * d, 2.0 * n * n * d, 2.0 * n**3
    if method == "eigh":
        # Forward: G, U^T X, X_u^T diag(g) X_u. Backward: X_u S, H, (K o H) X_u, U W.
        return 2 * nd2 + 5 * n2d + EIGH_FLOPS / 2 * n3
    # As many coefficient products as sqrtm's Newton-Schulz has matmuls, two n^3 matmuls
    # each; autograd's backward costs two matmuls per forward matmul.
    return 2 * nd2 + 6 * n2d + 3 * 2 * newton_schulz_matmuls(iters) * n3


@check_args
def dxd_flops(n: int, d: int, method: CostMethod = "eigh", iters: int = 5) -> float:
    """Modelled flops of forward + backward (w.r.t. X) of pooling A = X^T X / n and the
    d x d route: ``eigh`` or ``newton_schulz`` with the ``lyapunov_iterative`` backward.

    Args:
        n: Locations.
        d: Channels.
        method: ``eigh`` or ``newton_schulz``.
        iters: Newton-Schulz iterations (forward and backward).

    Returns:
        Flops.
    """
    nd2, d3 = 2.0 * n * d * d, 2.0 * d**3
    if method == "eigh":
        return 2 * nd2 + EIGH_FLOPS / 2 * d3 + 5 * d3
    mm = newton_schulz_matmuls(iters) + lyapunov_iterative_matmuls(iters)
    return 2 * nd2 + mm * d3


@check_args
def small_side_cheaper(
    n: PositiveInt, d: PositiveInt, method: CostMethod = "eigh", iters: int = 5
) -> bool:
    """Whether the n x n route (``*_from_features``) beats pooling A and the d x d route.

    True when :func:`small_side_flops` times :data:`COST_MARGIN` is at most
    :func:`dxd_flops`, never when n >= d nor below :data:`MIN_CHANNELS` channels
    (calibration: docs/ops.md).

    Args:
        n: Locations (H W).
        d: Channels.
        method: ``eigh`` (square root by eigh, power, log) or ``newton_schulz``.
        iters: Newton-Schulz iterations.

    Returns:
        True when the small side should be used.
    """
    if n >= d or d < MIN_CHANNELS:
        return False
    return COST_MARGIN * small_side_flops(n, d, method, iters) <= dxd_flops(n, d, method, iters)
