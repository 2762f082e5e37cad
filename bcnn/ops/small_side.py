"""Matrix functions of pooled second-order matrices computed on the small (n x n) side.

For features X ``(..., n, d)`` (rows = locations) the pooled matrix A = X^T X / n has rank at
most n. When n < d (VGG-D at 224 px: n = 196, d = 512) every spectral function of
M = A + r I (r >= 0: the ridge) follows from the n x n Gram matrix G = X X^T / n = U diag(l) U^T:
the nonzero eigenvalues of A are l, the eigenvectors X^T u_k / sqrt(n l_k), and

    f(M) = f(r) I + X^T U diag(g) U^T X / n,    g_k = f[l_k + r, r] = (f(l_k + r) - f(r)) / l_k,

a divided difference (limit f'(r) for l_k = 0): the null space of A contributes f(r).

The gradient with respect to X (Daleckii-Krein in the d x d eigenbasis, rewritten on the
n x n side) is, with S = sym(dL/dF), H = U^T X S X^T U / n and x = l + r:

    dL/dX = (2 / n) U [(K o H) U^T X + diag(g) U^T X S],   K_ij = f[x_i, x_j, r],

second divided differences (bounded for equal or zero l: no 1/(l_i - l_j) anywhere), plus,
when the ridge depends on X (``eps_mode="trace"``), the ridge's share through
dL/dr = tr(dL/dM) = f'(r) tr(S) + sum_k (f[x_k, x_k, r] + f[x_k, r, r]) H_kk.

The coupled Newton-Schulz iteration on M / c needs no eigendecomposition: its iterates are
alpha I + X^T P X / n with P n x n, since
(a I + X^T P X / n)(b I + X^T Q X / n) = ab I + X^T (a Q + b P + P G Q) X / n, and the
scale c (Frobenius norm or trace of M) follows from G: ||M||_F^2 = ||G||_F^2 + 2 r tr(G) + d r^2,
tr(M) = tr(G) + d r. Its gradient is autograd through these n x n iterations.

Which side is cheaper is a flop count (:func:`small_side_cheaper`). See ``docs/ops.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bcnn.limits import NonNegative
from bcnn.ops._utils import autocast_disabled, machine_eps, symmetrize, to_compute
from bcnn.ops.spectral import divided_difference
from bcnn.ops.sqrtm import (
    Iters,
    Scale,
    check_args,
    lyapunov_iterative_matmuls,
    newton_schulz_matmuls,
    resolve_sqrtm,
)

Fn = Literal["sqrt", "power", "log"]
SqrtMethod = Literal["eigh", "newton_schulz", "auto"]
EpsMode = Literal["abs", "trace"]
# Eigenvalue floors of the d x d routes (``powm`` and ``logm`` defaults).
DEFAULT_FLOOR = {"power": 1e-8, "log": 1e-6}

# Cost model of :func:`small_side_cheaper`, in flops: a batched (m x k) @ (k x q) matmul is
# 2 m k q; a LAPACK eigh with eigenvectors of an m x m matrix is EIGH_FLOPS * m^3 (about 7
# matmuls of the same size at m = 512 on the project's CPU, see SQRTM_AUTO_TABLE).
EIGH_FLOPS = 14.0
# The small side is chosen only when its modelled cost times this margin is still below the
# d x d route's: the n x n eigh and the many small matmuls run further from peak than their
# d x d counterparts, and elementwise passes over the d x d output (same on both routes) are
# not counted. Checked against scripts/bench_small_side.py (docs/ops.md).
COST_MARGIN = 2.0
# Below this many channels per-call overheads (Newton-Schulz: a dozen small n x n products)
# weigh more than the flop count says and the absolute gain is small: not calibrated, so
# keep d x d there.
MIN_CHANNELS = 128


def _check_features(X: Tensor, name: str) -> tuple[int, int]:
    if X.dim() < 2:
        raise ValueError(f"{name}: expected features X of shape (..., n, d), got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features X, got {X.dtype}")
    n, d = X.shape[-2], X.shape[-1]
    if n < 1 or d < 1:
        raise ValueError(f"{name}: X needs n >= 1 locations and d >= 1 channels, got {(n, d)}")
    return n, d


def _check_ridge(eps: float, eps_mode: str, name: str) -> None:
    check_args(name, eps=(eps, NonNegative), eps_mode=(eps_mode, EpsMode))


def ridge_from_features(X: Tensor, eps: float, eps_mode: str) -> Tensor:
    """The ridge r of M = A + r I, A = X^T X / n, as the d x d route's ``add_ridge`` adds it.

    Args:
        X: ``(..., n, d)`` features.
        eps: Ridge; 0 gives r = 0.
        eps_mode: ``"abs"`` (r = eps) or ``"trace"`` (r = eps tr(A) / d = eps ||X||_F^2 / (n d),
            differentiable in X).

    Returns:
        ``(...)`` r, in X's dtype.
    """
    _check_ridge(eps, eps_mode, "ridge_from_features")
    batch = X.shape[:-2]
    if eps == 0:
        return X.new_zeros(batch)
    if eps_mode == "abs":
        return X.new_full(batch, float(eps))
    n, d = X.shape[-2], X.shape[-1]
    return (X * X).sum((-2, -1)) * (eps / (n * d))


# ----------------------------------------------------------------------------------------
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
    When both l are tiny against r the difference cancels (relative error ~eps_mach r / l
    in K), but K enters the gradient only as K_ij H_ij (U^T X)_j, and H_ij (U^T X)_j is
    O(l): the absolute error stays ~eps_mach f'(r) |S|. Where both l are 0 the rows of
    U^T X and H vanish and K is irrelevant: 0.
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
    ``(..., n)``. The square root mirrors ``sqrtm``'s ``lyapunov_eig`` backward: its first
    divided differences 1 / (s_i + s_j) (s = sqrt(x)) have the denominators floored at
    max(sqrt(eps_mach) s_max, eps_mach), and the second ones are the closed form
    -1 / ((s_i + s_j)(s_i + s_r)(s_j + s_r)) with the same floors.
    """
    rr = r[..., None]
    x = l + rr
    out: dict[str, Tensor] = {"f_r": _f(r, kind, p, floor)}
    if kind == "sqrt":
        s = x.sqrt()
        s_r = r.sqrt()
        eps = machine_eps(l.dtype)
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


# ----------------------------------------------------------------------------------------
# Newton-Schulz on the small side.


def _ns_product(
    a: Tensor, P: Tensor | None, b: Tensor, Q: Tensor | None, G: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(a I + X^T P X / n)(b I + X^T Q X / n) as (a b, a Q + b P + P G Q); None is P = 0."""
    ab = a * b
    if P is None and Q is None:
        return ab, None
    if P is None:
        return ab, a[..., None, None] * Q
    if Q is None:
        return ab, b[..., None, None] * P
    return ab, a[..., None, None] * Q + b[..., None, None] * P + P @ G @ Q


def _newton_schulz_small(X: Tensor, r: Tensor, iters: int, scale: str) -> Tensor:
    """``sqrtm``'s coupled Newton-Schulz on M = X^T X / n + r I, run on n x n coefficients."""
    n, d = X.shape[-2], X.shape[-1]
    G = symmetrize(X @ X.mT) / n
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    eps = machine_eps(X.dtype)
    # The normalisation of ``sqrtm._scale_of`` applied to M, from G: same floors.
    if scale == "fro":
        sq = (G * G).sum((-2, -1)) + 2.0 * r * trace + d * r * r
        c = sq.clamp_min(eps * eps).sqrt()
    else:
        c = (trace + d * r).clamp_min(eps)
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    # Y0 = M / c, Z0 = I (coefficient pairs (alpha, P); P None stands for 0).
    ya, yP = r / c, eye / c[..., None, None]
    za: Tensor | None = None
    zP: Tensor | None = None
    for k in range(iters):
        if za is None:
            pa, pP = ya, yP
        else:
            pa, pP = _ns_product(za, zP, ya, yP, G)
        ta = 1.5 - 0.5 * pa  # T = (3 I - Z Y) / 2
        tP = None if pP is None else -0.5 * pP
        ya, yP = _ns_product(ya, yP, ta, tP, G)
        if k < iters - 1:
            za, zP = (ta, tP) if za is None else _ns_product(ta, tP, za, zP, G)
    # Y = (ya I + X^T yP X / n) sqrt(c); yP is never 0 (Y0 has P = I / c).
    assert yP is not None
    root_c = c.sqrt()
    F = X.mT @ ((yP * (root_c / n)[..., None, None]) @ X)
    F.diagonal(dim1=-2, dim2=-1).add_((ya * root_c)[..., None])
    return F


# ----------------------------------------------------------------------------------------
# Public API.


def sqrtm_from_features(
    X: Tensor,
    method: SqrtMethod = "eigh",
    iters: int = 5,
    scale: str = "fro",
    eps: float = 0.0,
    eps_mode: EpsMode = "abs",
) -> Tensor:
    """(X^T X / n + r I)^(1/2) from the n x n Gram matrix X X^T / n.

    Equals ``sqrtm(add_ridge(X^T X / n, eps, eps_mode), method, iters, scale=scale)`` in
    value and gradient (float64: relative error ~1e-12): ``"eigh"`` with the exact gradient
    (that of ``backward="lyapunov_eig"``, same eigenvalue guard), ``"newton_schulz"`` with
    the gradient of ``backward="autograd"`` (autograd through the ``iters`` iterations, run
    on n x n coefficient matrices: the exact gradient of the approximation; the d x d
    default ``lyapunov_iterative`` is another approximation of the exact gradient, the two
    agree only as the iterations converge). Works for any n; cheaper than the d x d route
    when n is well below d (see :func:`small_side_cheaper`). Computed in float32 (float64
    for float64 input) with autocast disabled.

    Args:
        X: ``(..., n, d)`` features, rows = locations.
        method: ``"eigh"`` (exact), ``"newton_schulz"`` (``iters`` coupled iterations) or
            ``"auto"`` (``sqrtm``'s device table; its ``svd`` would give ``eigh``).
        iters: Newton-Schulz iterations.
        scale: Newton-Schulz normalisation of M, ``"fro"`` or ``"trace"`` (as in ``sqrtm``).
        eps: Ridge (0: none).
        eps_mode: ``"abs"`` (r = eps) or ``"trace"`` (r = eps tr(A) / d).

    Returns:
        ``(..., d, d)`` square root; float32, or float64 for float64 input.
    """
    _, d = _check_features(X, "sqrtm_from_features")
    _check_ridge(eps, eps_mode, "sqrtm_from_features")
    check_args(
        "sqrtm_from_features",
        method=(method, SqrtMethod),
        scale=(scale, Scale),
        iters=(iters, Iters),
    )
    if method == "auto":
        resolved = resolve_sqrtm("auto", "auto", X.device.type, d)[0]
        method = "newton_schulz" if resolved == "newton_schulz" else "eigh"
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        r = ridge_from_features(X, eps, eps_mode)
        if method == "newton_schulz":
            return _newton_schulz_small(X, r, iters, scale)
        return _SmallSideSpectral.apply(X, r, "sqrt", 0.5, 0.0)


def powm_from_features(
    X: Tensor, p: float, eps: float = 0.0, eps_mode: EpsMode = "abs", floor: float = 1e-8
) -> Tensor:
    """(X^T X / n + r I)^p, 0 < p <= 1, from the n x n Gram matrix X X^T / n.

    Equals ``powm(add_ridge(X^T X / n, eps, eps_mode), p, eps=floor)`` in value and gradient
    (eigenvalues clamped at ``floor`` as there; exact Daleckii-Krein gradient). Float32
    (float64 for float64 input), autocast disabled.

    Args:
        X: ``(..., n, d)`` features.
        p: Exponent in (0, 1].
        eps: Ridge (0: none).
        eps_mode: ``"abs"`` or ``"trace"``.
        floor: Eigenvalue floor (absolute), > 0.

    Returns:
        ``(..., d, d)`` M^p.
    """
    _check_features(X, "powm_from_features")
    _check_ridge(eps, eps_mode, "powm_from_features")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"powm_from_features: p must be in (0, 1], got {p}")
    if floor <= 0:
        raise ValueError(f"powm_from_features: floor must be > 0, got {floor}")
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        r = ridge_from_features(X, eps, eps_mode)
        return _SmallSideSpectral.apply(X, r, "power", float(p), float(floor))


def logm_from_features(
    X: Tensor, eps: float = 0.0, eps_mode: EpsMode = "abs", floor: float = 1e-6
) -> Tensor:
    """log(X^T X / n + r I) from the n x n Gram matrix X X^T / n.

    Equals ``logm(add_ridge(X^T X / n, eps, eps_mode), method="eigh", eps=floor)`` in value
    and gradient: the null space of X^T X gives log(max(r, floor)). Float32 (float64 for
    float64 input), autocast disabled.

    Args:
        X: ``(..., n, d)`` features.
        eps: Ridge (0: none).
        eps_mode: ``"abs"`` or ``"trace"``.
        floor: Eigenvalue floor (absolute), > 0.

    Returns:
        ``(..., d, d)`` log(M).
    """
    _check_features(X, "logm_from_features")
    _check_ridge(eps, eps_mode, "logm_from_features")
    if floor <= 0:
        raise ValueError(f"logm_from_features: floor must be > 0, got {floor}")
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        r = ridge_from_features(X, eps, eps_mode)
        return _SmallSideSpectral.apply(X, r, "log", 1.0, float(floor))


def matrix_function_from_features(
    X: Tensor,
    fn: Fn,
    *,
    p: float = 0.5,
    method: SqrtMethod = "eigh",
    iters: int = 5,
    scale: str = "fro",
    eps: float = 0.0,
    eps_mode: EpsMode = "abs",
    floor: float | None = None,
) -> Tensor:
    """f(X^T X / n + r I) for f in {sqrt, power, log}, on the n x n side.

    Dispatches to :func:`sqrtm_from_features` (``fn="sqrt"``: ``method``, ``iters``,
    ``scale``), :func:`powm_from_features` (``fn="power"``: ``p``, ``floor``) or
    :func:`logm_from_features` (``fn="log"``: ``floor``). ``floor=None`` is the default of
    ``powm`` (1e-8) or ``logm`` (1e-6). ``fn="power"`` with p = 0.5 is ``powm``'s square root
    (eigenvalues clamped at ``floor``), not ``sqrtm``'s.

    Args:
        X: ``(..., n, d)`` features.
        fn: ``"sqrt"``, ``"power"`` or ``"log"``.
        p: Exponent of ``"power"``.
        method, iters, scale: Square-root options.
        eps, eps_mode: Ridge.
        floor: Eigenvalue floor of ``"power"`` and ``"log"``.

    Returns:
        ``(..., d, d)`` f(M); float32, or float64 for float64 input.
    """
    check_args("matrix_function_from_features", fn=(fn, Fn))
    if fn == "sqrt":
        return sqrtm_from_features(X, method, iters, scale, eps, eps_mode)
    fl = DEFAULT_FLOOR[fn] if floor is None else floor
    if fn == "power":
        return powm_from_features(X, p, eps, eps_mode, fl)
    return logm_from_features(X, eps, eps_mode, fl)


# ----------------------------------------------------------------------------------------
# Cost rule.


def small_side_flops(n: int, d: int, method: str = "eigh", iters: int = 5) -> float:
    """Modelled flops of forward + backward (w.r.t. X) of the small-side route, per matrix.

    Args:
        n: Locations.
        d: Channels.
        method: ``"eigh"`` (square root, power, log) or ``"newton_schulz"``.
        iters: Newton-Schulz iterations.

    Returns:
        Flops.
    """
    nd2, n2d, n3 = 2.0 * n * d * d, 2.0 * n * n * d, 2.0 * n**3
    if method == "eigh":
        # Forward: G, U^T X, X_u^T diag(g) X_u. Backward: X_u S, H, (K o H) X_u, U W.
        return 2 * nd2 + 5 * n2d + EIGH_FLOPS / 2 * n3
    if method == "newton_schulz":
        # As many coefficient products as sqrtm's Newton-Schulz has matmuls, two n^3 matmuls
        # each; autograd's backward costs two matmuls per forward matmul.
        return 2 * nd2 + 6 * n2d + 3 * 2 * newton_schulz_matmuls(iters) * n3
    raise ValueError(f"small_side_flops: method must be 'eigh' or 'newton_schulz', got {method!r}")


def dxd_flops(n: int, d: int, method: str = "eigh", iters: int = 5) -> float:
    """Modelled flops of forward + backward (w.r.t. X) of the d x d route, per matrix.

    Pooling A = X^T X / n and its backward (two n d^2 matmuls) plus ``sqrtm``/``powm``/
    ``logm`` on A: ``"eigh"`` (eigh, V f V^T, the two-sided basis change twice in backward)
    or ``"newton_schulz"`` with ``sqrtm``'s default ``lyapunov_iterative`` backward.

    Args:
        n: Locations.
        d: Channels.
        method: ``"eigh"`` or ``"newton_schulz"``.
        iters: Newton-Schulz iterations (forward and backward).

    Returns:
        Flops.
    """
    nd2, d3 = 2.0 * n * d * d, 2.0 * d**3
    if method == "eigh":
        return 2 * nd2 + EIGH_FLOPS / 2 * d3 + 5 * d3
    if method == "newton_schulz":
        mm = newton_schulz_matmuls(iters) + lyapunov_iterative_matmuls(iters)
        return 2 * nd2 + mm * d3
    raise ValueError(f"dxd_flops: method must be 'eigh' or 'newton_schulz', got {method!r}")


def small_side_cheaper(n: int, d: int, method: str = "eigh", iters: int = 5) -> bool:
    """Whether the n x n route (``*_from_features``) beats pooling A and the d x d route.

    A flop count of forward + backward (:func:`small_side_flops` vs :func:`dxd_flops`) with
    a safety margin (:data:`COST_MARGIN`): the small side is chosen only when it is modelled
    to be ``COST_MARGIN`` times cheaper, never when n >= d, and never below
    :data:`MIN_CHANNELS` channels. Checked on CPU (batch 32, float32, forward + backward)
    at (n, d) = (196, 256), (196, 384), (196, 512), (196, 768), (196, 1920), (392, 512) and
    (784, 512): it picks the small side only where it was measured >= 2.6x faster
    (docs/ops.md, benchmarks/results/small_side_cpu.md).

    Args:
        n: Locations (H W).
        d: Channels.
        method: ``"eigh"`` (square root by eigh, power, log) or ``"newton_schulz"``.
        iters: Newton-Schulz iterations.

    Returns:
        True when the small side should be used.
    """
    if n < 1 or d < 1:
        raise ValueError(f"small_side_cheaper: n and d must be >= 1, got {(n, d)}")
    if method not in ("eigh", "newton_schulz"):
        raise ValueError(
            f"small_side_cheaper: method must be 'eigh' or 'newton_schulz', got {method!r}"
        )
    if n >= d or d < MIN_CHANNELS:
        return False
    return COST_MARGIN * small_side_flops(n, d, method, iters) <= dxd_flops(n, d, method, iters)
