"""gamma-democratic aggregation (Lin, Maji, Koniusz, ECCV 2018; Murray et al., 2016).

Weights alpha_i > 0 make every location's contribution to the pooled descriptor equal to
(K 1)_i^gamma up to a constant: gamma = 1 is sum pooling, gamma = 0 fully democratic. For
second-order features (the default) K_ij = (x_i^T x_j)^2 is the kernel of the outer
products x_i x_i^T, the elementwise square of the n x n Gram matrix of the raw features,
so the d^2-dimensional outer products are never formed: O(n^2) per iteration of the
dampened Sinkhorn solver, or O(n d^2) without the n x n matrix where that is cheaper (many
locations of few channels). ``order=1`` weights the features themselves
(K_ij = x_i^T x_j, Murray et al.'s democratic aggregation; the ECCV 2018 first-order rows),
applied as X (X^T v) in O(n d); the Sinkhorn iteration then needs a non-negative kernel,
as post-ReLU features give.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bcnn.ops._utils import autocast_disabled, to_compute


def _check_features(X: Tensor, name: str) -> None:
    if X.dim() < 2:
        raise ValueError(f"{name}: expected features (..., n, d), got shape {tuple(X.shape)}")


ROUTES = ("auto", "gram", "factored")
# The factored route of the second-order kernel wins where d^2 <= FACTORED_RATIO * n:
# forward + backward at batch 32 on 2 CPU cores (benchmarks/results/democratic_cpu.md)
# 8.3x faster at (n, d) = (1024, 64), 2.8x at (1024, 128), 31x at (3136, 64), and 6x and
# 24x slower at (784, 512) and (196, 512), where the n x n kernel is small.
FACTORED_RATIO = 16


def factored_is_cheaper(n: int, d: int, order: int = 2) -> bool:
    """Whether ``route="auto"`` skips the n x n kernel for n locations of d channels.

    Always for order 1; for order 2 where d^2 <= ``FACTORED_RATIO`` n.
    """
    return order == 1 or d * d <= FACTORED_RATIO * n


def _kernel_product(X: Tensor, order: int, route: str) -> Callable[[Tensor], Tensor]:
    """v (..., n) -> K v (..., n) for the kernel of ``order`` over the locations of X.

    ``gram`` forms K from the n x n Gram matrix; ``factored`` never does: for order 2,
    (K v)_i = x_i^T (sum_j v_j x_j x_j^T) x_i, O(n d^2); for order 1, K v = X (X^T v).
    """
    Xt = X.transpose(-2, -1)  # not .mT: the ONNX exporter has no aten::mT
    if route == "auto":
        route = "factored" if factored_is_cheaper(*X.shape[-2:], order) else "gram"
    if route == "factored" and order == 1:
        return lambda v: (X @ (Xt @ v[..., None]))[..., 0]
    if route == "factored":
        return lambda v: ((X @ ((Xt * v[..., None, :]) @ X)) * X).sum(-1)
    G = X @ Xt
    K = G * G if order == 2 else G  # (..., n, n)
    return lambda v: (K @ v[..., None])[..., 0]


def _sinkhorn(
    X: Tensor, gamma: float, tau: float, iters: int, eps: float, order: int, route: str
) -> Tensor:
    kernel_times = _kernel_product(X, order, route)
    K1 = kernel_times(torch.ones_like(X[..., 0]))
    # Locations with (almost) no energy (dead ReLU columns, padding) have K1 ~ 0 and would
    # blow up or divide 0 by 0; they keep alpha = 1, which is harmless as their x x^T ~ 0.
    # The floor is relative so that it does not depend on the feature scale.
    tiny = torch.finfo(K1.dtype).tiny
    floor = (K1.amax(-1, keepdim=True) * eps).clamp_min(tiny).detach()
    active = torch.gt(K1, floor)
    denom = K1.clamp_min(floor) ** gamma
    alpha = torch.ones_like(K1)
    for _ in range(iters):
        sigma = alpha * kernel_times(alpha) / denom
        # Clamp before the power: pow's backward at 0 is infinite for tau < 1.
        sigma = torch.where(active, sigma.clamp_min(tiny), torch.ones_like(sigma))
        alpha = alpha / sigma**tau
    return alpha


def democratic_weights(
    X: Tensor,
    gamma: float = 0.5,
    tau: float = 0.5,
    iters: int = 10,
    eps: float = 1e-6,
    detach: bool = False,
    order: int = 2,
    route: str = "auto",
) -> Tensor:
    """Weights of gamma-democratic aggregation by the dampened Sinkhorn iteration.

    K = (X X^T) o (X X^T) (``order=2``) or X X^T (``order=1``); alpha = 1; repeat
    ``iters`` times:
    sigma = alpha o (K alpha) / (K 1)^gamma, alpha = alpha / sigma^tau. At convergence
    (tau = 0.5 converges to sigma = 1) alpha_i (K alpha)_i = (K 1)_i^gamma.

    Args:
        X: ``(..., n, d)`` features: n locations (e.g. H*W) of d channels, channels last.
        gamma: 1 = sum pooling (alpha constant), 0 = every location contributes equally.
        tau: Damping exponent in (0, 1].
        iters: Sinkhorn iterations (the paper uses 10).
        eps: Relative floor on (K 1)_i: locations with (K 1)_i <= eps * max_j (K 1)_j keep
            alpha_i = 1 (their features are ~0, so their weight does not matter).
        detach: Compute alpha without gradient (as the authors' code does).
        order: 2: weights for the outer products x x^T (second-order pooling); 1: for the
            features x (first-order pooling; non-negative features).
        route: How K v is computed, the same value either way: ``gram`` (from the n x n
            Gram matrix), ``factored`` (without it: O(n d^2) for order 2, O(n d) for
            order 1) or ``auto`` (factored for order 1, and for order 2 where
            d^2 <= ``FACTORED_RATIO`` n).

    Returns:
        ``(..., n)`` alpha > 0; float32, or float64 for float64 input.
    """
    _check_features(X, "democratic_weights")
    if iters < 0:
        raise ValueError(f"democratic_weights: iters must be >= 0, got {iters}")
    if order not in (1, 2):
        raise ValueError(f"democratic_weights: order must be 1 or 2, got {order}")
    if route not in ROUTES:
        raise ValueError(f"democratic_weights: route must be one of {ROUTES}, got {route!r}")
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        if detach:
            with torch.no_grad():
                return _sinkhorn(X.detach(), gamma, tau, iters, eps, order, route)
        return _sinkhorn(X, gamma, tau, iters, eps, order, route)


def democratic_pool(
    X: Tensor,
    gamma: float = 0.5,
    tau: float = 0.5,
    iters: int = 10,
    detach: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    order: int = 2,
) -> Tensor:
    """gamma-democratic pooling: sum_i alpha_i x_i x_i^T, or sum_i alpha_i x_i (``order=1``).

    Args:
        X: ``(..., n, d)`` features, n locations, d channels (channels last).
        gamma: Democracy exponent (see :func:`democratic_weights`).
        tau: Damping exponent.
        iters: Sinkhorn iterations.
        detach: Stop the gradient through alpha (authors' code); the gradient then flows
            only through the outer products.
        normalize: Divide by sum_i alpha_i (a weighted mean, invariant to the overall scale
            of alpha; gamma = 1 then equals the B-CNN average (1/n) sum_i x_i x_i^T).
            False returns the plain weighted sum.
        eps: Relative floor of :func:`democratic_weights`.
        order: 2: second-order pooling; 1: first-order pooling of the features (see
            :func:`democratic_weights`).

    Returns:
        ``(..., d, d)`` symmetric pooled matrix (``order=1``: ``(..., d)``); float32, or
        float64 for float64 input.
    """
    _check_features(X, "democratic_pool")
    alpha = democratic_weights(
        X, gamma=gamma, tau=tau, iters=iters, eps=eps, detach=detach, order=order
    )
    with autocast_disabled(X.device.type):
        X = to_compute(X)
        if normalize:
            alpha = alpha / alpha.sum(-1, keepdim=True)
        if order == 1:
            return (alpha[..., None, :] @ X)[..., 0, :]
        return (X * alpha[..., None]).transpose(-2, -1) @ X
