"""gamma-democratic aggregation (Lin, Maji, Koniusz, ECCV 2018; Murray et al., 2016).

Weights alpha_i > 0 make every location's contribution to the pooled descriptor equal to
(K 1)_i^gamma up to a constant. The second-order kernel K_ij = (x_i^T x_j)^2 of the outer
products x_i x_i^T is the elementwise square of the n x n Gram matrix, so the d^2-dimensional
outer products are never formed; ``order=1`` weights the features (K_ij = x_i^T x_j), which
needs a non-negative kernel, as post-ReLU features give. See docs/ops.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import Tensor

from bcnn.ops._utils import autocast_disabled, check_args, to_compute

Order = Literal[1, 2]
Route = Literal["auto", "gram", "factored"]
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
    n, d = X.shape[-2:]
    if route == "auto":
        route = "factored" if factored_is_cheaper(n, d, order) else "gram"
    if route == "factored" and order == 1:
        return lambda v: (X @ (Xt @ v[..., None]))[..., 0]
    if route == "factored":
        return lambda v: ((X @ ((Xt * v[..., None, :]) @ X)) * X).sum(-1)
    G = X @ Xt
    K = G * G if order == 2 else G  # (..., n, n)
    return lambda v: (K @ v[..., None])[..., 0]


@check_args
def democratic_weights(
    X: Tensor,
    gamma: float = 0.5,
    tau: float = 0.5,
    iters: Annotated[int, Ge(0)] = 10,
    eps: float = 1e-6,
    detach: bool = False,
    order: Order = 2,
    route: Route = "auto",
) -> Tensor:
    """Weights of gamma-democratic aggregation by the dampened Sinkhorn iteration.

    alpha = 1, then ``iters`` times sigma = alpha o (K alpha) / (K 1)^gamma,
    alpha = alpha / sigma^tau; tau = 0.5 converges to alpha_i (K alpha)_i = (K 1)_i^gamma.

    Args:
        X: ``(..., n, d)`` features: n locations (e.g. H*W) of d channels, channels last.
        gamma: 1 = sum pooling (alpha constant), 0 = every location contributes equally.
        tau: Damping exponent in (0, 1].
        iters: Sinkhorn iterations (the paper uses 10).
        eps: Relative floor on (K 1)_i: locations below eps * max_j (K 1)_j keep alpha_i = 1.
        detach: Compute alpha without gradient (as the authors' code does).
        order: 2: weights for the outer products x x^T; 1: for the features x.
        route: How K v is computed, the same value either way: ``gram`` (the n x n kernel),
            ``factored`` (without it) or ``auto`` (:func:`factored_is_cheaper`).

    Returns:
        ``(..., n)`` alpha > 0; float32, or float64 for float64 input.
    """
    if X.dim() < 2:
        raise ValueError(
            f"democratic_weights: expected features (..., n, d), got shape {tuple(X.shape)}"
        )
    grad = torch.is_grad_enabled() and not detach
    with autocast_disabled(X.device.type), torch.set_grad_enabled(grad):
        X = to_compute(X)
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


def democratic_pool(
    X: Tensor,
    gamma: float = 0.5,
    tau: float = 0.5,
    iters: int = 10,
    detach: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    order: Order = 2,
) -> Tensor:
    """gamma-democratic pooling: sum_i alpha_i x_i x_i^T, or sum_i alpha_i x_i (``order=1``).

    Args:
        X: ``(..., n, d)`` features, n locations, d channels (channels last).
        gamma, tau, iters, eps, order: As :func:`democratic_weights`.
        detach: Stop the gradient through alpha (authors' code); it then flows only through
            the outer products.
        normalize: Divide by sum_i alpha_i (gamma = 1 then equals the B-CNN average
            (1/n) sum_i x_i x_i^T); False returns the plain weighted sum.

    Returns:
        ``(..., d, d)`` symmetric pooled matrix (``order=1``: ``(..., d)``); float32, or
        float64 for float64 input.
    """
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
