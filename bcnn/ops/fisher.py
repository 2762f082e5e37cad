"""Diagonal-covariance GMM (EM) and the improved Fisher vector (Perronnin et al., ECCV 2010).

The encoding of FV-CNN (Cimpoi et al.; a baseline of Lin et al., ICCV 2015), laid out as
VLFeat's ``vl_fisher``; formulas and EM details in docs/ops.md. Everything is written with
matrix products (sum_i gamma_ik x_i = Gamma^T X), so no ``(B, n, K, d)`` tensor is formed.
The expanded quadratic forms cancel when the data sit far from the origin relative to their
spread, so EM and the encoder work in coordinates centred on the mixture's mean (exact).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bcnn.limits import Positive, PositiveInt, checked
from bcnn.ops._utils import autocast_disabled, check_args, compute_dtype, to_compute
from bcnn.ops.elementwise import signed_sqrt

_LOG_2PI = math.log(2.0 * math.pi)


def _log_joint(X: Tensor, log_w: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log w_k + log N(x_i | mu_k, diag var_k) for every (i, k): ``(..., n, d) -> (..., n, K)``.

    The Mahalanobis term sum_j (x_j - mu_kj)^2 / var_kj is expanded into matrix products;
    rounding can make it slightly negative, hence the clamp.
    """
    prec = var.reciprocal()
    maha = (X * X) @ prec.T - 2.0 * (X @ (mu * prec).T) + (mu * mu * prec).sum(-1)
    const = log_w - 0.5 * (X.shape[-1] * _LOG_2PI + var.log().sum(-1))
    return const - 0.5 * maha.clamp_min(0.0)


class GMM(nn.Module):
    """Diagonal-covariance Gaussian mixture; parameters are buffers (state dict, no grads).

    Build it empty with the right sizes to load a checkpoint, or get a fitted one from
    :func:`fit_gmm`. Calling the module encodes local descriptors with :func:`fisher_vector`.

    Args:
        num_components: K.
        dim: d, the descriptor dimension.
        dtype: Dtype of the buffers.

    Attributes:
        weights: ``(K,)`` mixing weights, positive, summing to one.
        means: ``(K, d)``.
        variances: ``(K, d)`` diagonal covariances, positive.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor

    @checked
    def __init__(
        self, num_components: PositiveInt, dim: PositiveInt, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        K = num_components
        self.register_buffer("weights", torch.full((K,), 1.0 / K, dtype=dtype))
        self.register_buffer("means", torch.zeros(K, dim, dtype=dtype))
        self.register_buffer("variances", torch.ones(K, dim, dtype=dtype))

    @property
    def num_components(self) -> int:
        """K."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """d."""
        return self.means.shape[1]

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, dim={self.dim}"

    def forward(self, X: Tensor, improved: bool = False) -> Tensor:
        """Fisher vectors of ``X``: ``(..., n, d) -> (..., 2 K d)``; see :func:`fisher_vector`."""
        return fisher_vector(X, self, improved=improved)


def fisher_vector(
    X: Tensor,
    gmm: GMM,
    improved: bool = False,
    min_posterior: float = 0.0,
    eps: float = 1e-12,
) -> Tensor:
    """Fisher vector of each set of local descriptors under a diagonal GMM.

    Layout ``[u_1, ..., u_K, v_1, ..., v_K]``, each block of d numbers (as ``vl_fisher``):
    u_k = 1/(n sqrt(w_k)) sum_i gamma_ik (x_i - mu_k)/sigma_k and
    v_k = 1/(n sqrt(2 w_k)) sum_i gamma_ik [((x_i - mu_k)/sigma_k)^2 - 1], with the
    posteriors gamma_ik computed in log space. Differentiable w.r.t. ``X`` (through the
    posteriors as well); the GMM is fixed.

    Args:
        X: ``(..., n, d)`` local descriptors (n locations, channels last).
        gmm: The mixture.
        improved: Also apply ``signed_sqrt`` (whose gradient guard moves values by at most
            1e-4) and L2 normalization. Off by default: bcnn's normalization chain has both
            as steps (``signsqrt``, ``l2``).
        min_posterior: Posteriors below this are set to zero. VLFeat skips terms with
            gamma_ik < 1e-6 (an efficiency shortcut); 0 keeps every term.
        eps: Floor on the L2 norm when ``improved`` (VLFeat: 1e-12).

    Returns:
        ``(..., 2 K d)``; float32 (float64 for float64 input), autocast disabled.
    """
    if X.dim() < 2 or X.shape[-1] != gmm.dim:
        raise ValueError(
            f"fisher_vector: expected descriptors of shape (..., n, {gmm.dim}) (channels last; "
            f"a (B, C, H, W) map is x.flatten(2).transpose(1, 2)), got {tuple(X.shape)}"
        )
    if not X.is_floating_point():
        raise TypeError(f"fisher_vector: expected a floating-point tensor, got {X.dtype}")
    n = X.shape[-2]
    if n == 0:
        raise ValueError("fisher_vector: X has no descriptors (n = 0)")
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        w, mu, var = (t.to(X) for t in (gmm.weights, gmm.means, gmm.variances))
        c = w @ mu
        Xc, muc = X - c, mu - c
        gamma = torch.softmax(_log_joint(Xc, w.log(), muc, var), dim=-1)  # (..., n, K)
        if min_posterior > 0:
            gamma = gamma * (gamma >= min_posterior).to(gamma.dtype)
        gT = gamma.mT  # (..., K, n)
        S0 = gamma.sum(-2)[..., None]  # (..., K, 1)
        S1 = gT @ Xc  # (..., K, d)
        S2 = gT @ (Xc * Xc)
        sigma = var.sqrt()
        u = (S1 - S0 * muc) / sigma / (n * w.sqrt())[:, None]
        v = ((S2 - 2.0 * muc * S1 + S0 * muc * muc) / var - S0) / (n * (2.0 * w).sqrt())[:, None]
        fv = torch.cat([u.flatten(-2), v.flatten(-2)], dim=-1)
        if improved:
            fv = signed_sqrt(fv)
            fv = fv / fv.norm(dim=-1, keepdim=True).clamp_min(eps)
        return fv


def _kmeanspp(X: Tensor, K: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling); the draws come from the CPU generator ``gen``."""
    N = X.shape[0]
    first = int(torch.randint(N, (1,), generator=gen))
    centers = [X[first]]
    sq = X.pow(2).sum(-1)
    d2 = (sq - 2.0 * X @ X[first] + sq[first]).clamp_min(0.0)
    for _ in range(1, K):
        p = d2.double().cpu()
        # All remaining points coincide with a centre: any choice is as good.
        idx = int(torch.multinomial(p if p.sum() > 0 else torch.ones_like(p), 1, generator=gen))
        centers.append(X[idx])
        d2 = torch.minimum(d2, (sq - 2.0 * X @ X[idx] + sq[idx]).clamp_min(0.0))
    return torch.stack(centers)


def _assign(X: Tensor, centers: Tensor, chunk: int) -> Tensor:
    """The nearest centre of each row of X, computed in row chunks."""
    cc = centers.pow(2).sum(-1)
    return torch.cat([(cc - 2.0 * x @ centers.T).argmin(-1) for x in X.split(chunk)])


def _lloyd(X: Tensor, centers: Tensor, iters: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Lloyd iterations; an empty cluster keeps its centre. Returns centres and assignment."""
    K = centers.shape[0]
    assign = _assign(X, centers, chunk)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=K).to(torch.float64)
        sums = torch.zeros(K, X.shape[1], dtype=torch.float64, device=X.device)
        sums.index_add_(0, assign, X.to(torch.float64))
        filled = counts > 0
        new = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers.double())
        centers = new.to(X.dtype)
        new_assign = _assign(X, centers, chunk)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centers, assign


@check_args
def fit_gmm(
    samples: Tensor,
    num_components: PositiveInt = 64,
    max_iters: int = 100,
    tol: float = 1e-6,
    init: Literal["kmeans", "random"] | GMM = "kmeans",
    kmeans_iters: int = 10,
    var_floor: Positive = 1e-4,
    min_weight: float = 1e-6,
    seed: int = 0,
    chunk_size: int = 65536,
) -> tuple[GMM, dict[str, Any]]:
    """Fits a diagonal-covariance GMM to ``samples`` by EM (as VLFeat's ``vl_gmm``).

    The initialization and EM steps (variance floor, re-seeding, stopping rule) are
    described in docs/ops.md.

    Args:
        samples: ``(N, d)`` descriptors, N >= num_components. float64 samples fit in
            float64; anything else in float32. Any device (EM runs where the samples are).
        num_components: K.
        max_iters: Maximum number of EM iterations.
        tol: EM stops when the mean log-likelihood gains less than ``tol * |LL|``.
        init: ``kmeans`` (k-means++ and Lloyd), ``random`` (K distinct samples) or a
            :class:`GMM` to continue from; seeded by ``seed`` through a local generator.
        kmeans_iters: Lloyd iterations after k-means++ seeding (``init="kmeans"``).
        var_floor: Variance floor relative to the largest per-dimension data variance.
        min_weight: Components lighter than this are re-seeded.
        seed: Seed of the initialization.
        chunk_size: Rows per E-step block (bounds the ``(chunk, K)`` and ``(chunk, d)``
            temporaries).

    Returns:
        The fitted :class:`GMM` (buffers in the compute dtype, on the samples' device) and
        ``info``: ``iterations`` (EM iterations run), ``converged``, ``log_likelihood``
        (mean log-likelihood per sample of the parameters before each iteration, plus that
        of the returned parameters last; non-decreasing unless a re-seed happened),
        ``reseeded`` (number of re-seeded components).
    """
    N, d = _check_samples(samples, num_components, init)
    K = num_components
    dtype = compute_dtype(samples.dtype)
    with torch.no_grad(), autocast_disabled(samples.device.type):
        X64 = samples.to(torch.float64)
        center = X64.mean(0)
        data_var = X64.var(0, unbiased=False)
        del X64
        top = float(data_var.max())
        floor = var_floor * top if top > 0 else var_floor
        data_var = data_var.clamp_min(floor)
        X = (samples.to(dtype) - center.to(dtype)).contiguous()  # EM in centred coordinates
        gen = torch.Generator().manual_seed(int(seed))
        w, mu, var = _initial_params(
            X, init, K, gen, center, data_var, floor, kmeans_iters, chunk_size
        )

        history: list[float] = []
        reseeded = 0
        converged = just_reseeded = False
        for it in range(max_iters):
            ll, S0, S1, S2, worst = _e_step(X, w, mu, var, chunk_size)
            history.append(ll)
            gain = history[-1] - history[-2] if it > 0 else math.inf
            if not just_reseeded and gain <= tol * abs(history[-1]):
                converged = True
                break
            w, mu, var, n_reseeded = _m_step(S0, S1, S2, N, X[worst], data_var, floor, min_weight)
            just_reseeded = n_reseeded > 0
            reseeded += n_reseeded
        if not converged:
            history.append(_e_step(X, w, mu, var, chunk_size)[0])

        gmm = GMM(K, d, dtype=dtype).to(samples.device)
        gmm.weights.copy_(w.to(dtype))
        gmm.means.copy_((mu + center).to(dtype))
        gmm.variances.copy_(var.to(dtype))
    info = {
        "iterations": len(history) - 1,  # one E-step per iteration, plus the final one
        "converged": converged,
        "log_likelihood": history,
        "reseeded": reseeded,
    }
    return gmm, info


def _check_samples(samples: Tensor, K: int, init: str | GMM) -> tuple[int, int]:
    """Checks ``fit_gmm``'s samples against K and an initial GMM; returns (N, d)."""
    if samples.dim() != 2:
        raise ValueError(f"fit_gmm: samples must be (N, d), got shape {tuple(samples.shape)}")
    N, d = samples.shape
    if N < K:
        raise ValueError(
            f"fit_gmm: {N} samples cannot fit num_components={K}; sample more descriptors "
            "or lower num_components"
        )
    if isinstance(init, GMM) and (init.num_components, init.dim) != (K, d):
        raise ValueError(
            f"fit_gmm: init GMM has {init.num_components} components of dimension "
            f"{init.dim}; expected num_components={K} and the samples' d={d}"
        )
    if not samples.is_floating_point():
        raise TypeError(f"fit_gmm: samples must be floating point, got {samples.dtype}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("fit_gmm: samples contain NaN or Inf")
    return N, d


def _initial_params(
    X: Tensor,
    init: str | GMM,
    K: int,
    gen: torch.Generator,
    center: Tensor,
    data_var: Tensor,
    floor: float,
    kmeans_iters: int,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Initial float64 (weights (K,), centred means (K, d), variances (K, d))."""
    f64, dev = torch.float64, X.device
    N, d = X.shape
    if isinstance(init, GMM):
        w = init.weights.to(dev, f64) / init.weights.to(f64).sum()
        return w, init.means.to(dev, f64) - center, init.variances.to(dev, f64).clamp_min(floor)
    if init == "random":
        idx = torch.randperm(N, generator=gen)[:K].to(dev)
        w = torch.full((K,), 1.0 / K, dtype=f64, device=dev)
        return w, X[idx].to(f64), data_var.expand(K, d).clone()
    centers, assign = _lloyd(X, _kmeanspp(X, K, gen), kmeans_iters, chunk)
    counts = torch.bincount(assign, minlength=K).to(f64)
    Xd = X.to(f64)
    sq = torch.zeros(K, d, dtype=f64, device=dev).index_add_(0, assign, Xd * Xd)
    mu = centers.to(f64)
    var = sq / counts.clamp_min(1)[:, None] - mu * mu
    var = torch.where((counts >= 2)[:, None], var, data_var).clamp_min(floor)
    return counts.clamp_min(1) / counts.clamp_min(1).sum(), mu, var


def _e_step(
    X: Tensor, w: Tensor, mu: Tensor, var: Tensor, chunk: int
) -> tuple[float, Tensor, Tensor, Tensor, int]:
    """Posteriors in row chunks: the mean log-likelihood, the float64 sufficient statistics
    S0 (K,), S1 (K, d), S2 (K, d), and the index of the worst-explained sample."""
    f64, dev = torch.float64, X.device
    N, d = X.shape
    K = w.shape[0]
    log_w, mu_c, var_c = w.log().to(X.dtype), mu.to(X.dtype), var.to(X.dtype)
    S0 = torch.zeros(K, dtype=f64, device=dev)
    S1 = torch.zeros(K, d, dtype=f64, device=dev)
    S2 = torch.zeros(K, d, dtype=f64, device=dev)
    ll = torch.zeros((), dtype=f64, device=dev)
    worst_val, worst_idx = math.inf, 0
    for s in range(0, N, chunk):
        x = X[s : s + chunk]
        lj = _log_joint(x, log_w, mu_c, var_c)
        lse = torch.logsumexp(lj, -1)
        gamma = torch.exp(lj - lse[:, None])
        ll += lse.to(f64).sum()
        S0 += gamma.to(f64).sum(0)
        S1 += (gamma.T @ x).to(f64)
        S2 += (gamma.T @ (x * x)).to(f64)
        m, i = lse.min(0)
        if float(m) < worst_val:
            worst_val, worst_idx = float(m), s + int(i)
    return float(ll) / N, S0, S1, S2, worst_idx


def _m_step(
    S0: Tensor,
    S1: Tensor,
    S2: Tensor,
    N: int,
    worst: Tensor,
    data_var: Tensor,
    floor: float,
    min_weight: float,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The floored maximizer; components lighter than ``min_weight`` re-seeded at ``worst``
    (the worst-explained sample: deterministic, and it then covers what the others fit
    worst). Returns weights, means, variances and the number re-seeded."""
    denom = S0.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    mu = S1 / denom
    var = (S2 / denom - mu * mu).clamp_min(floor)
    w = S0 / N
    empty = w < min_weight
    if empty.any():
        mu = torch.where(empty[:, None], worst.to(torch.float64), mu)
        var = torch.where(empty[:, None], data_var, var)
        w = torch.where(empty, torch.full_like(w, 1.0 / N), w)
    return w / w.sum(), mu, var, int(empty.sum())
