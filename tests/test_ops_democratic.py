"""gamma-democratic aggregation: fixed point, limits gamma = 1 and gamma = 0, gradients."""

from __future__ import annotations

import pytest
import torch

from bcnn.ops import democratic_pool, democratic_weights
from bcnn.ops.democratic import factored_is_cheaper

F64 = torch.float64


def relu_features(batch: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(batch, n, d, generator=gen, dtype=F64)) + 0.05


def kernel(X: torch.Tensor) -> torch.Tensor:
    return (X @ X.mT) ** 2


def contributions(X: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha_i (K alpha)_i = alpha_i phi(x_i)^T xi with xi = sum_j alpha_j phi(x_j)."""
    return alpha * (kernel(X) @ alpha[..., None])[..., 0]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_fixed_point_after_convergence(gamma: float) -> None:
    X = relu_features(2, 40, 8)
    alpha = democratic_weights(X, gamma=gamma, tau=0.5, iters=60)
    target = kernel(X).sum(-1) ** gamma
    ratio = contributions(X, alpha) / target
    # tau = 0.5 converges to sigma = 1: alpha_i (K alpha)_i = (K 1)_i^gamma exactly.
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-9, rtol=0)


def test_ten_iterations_are_close_to_the_fixed_point() -> None:
    X = relu_features(2, 40, 8, seed=1)
    alpha = democratic_weights(X, gamma=0.5, iters=10)
    ratio = contributions(X, alpha) / kernel(X).sum(-1) ** 0.5
    assert float((ratio - 1).abs().max()) < 0.05


def test_gamma_one_is_sum_pooling_up_to_scale() -> None:
    X = relu_features(3, 30, 6, seed=2)
    alpha = democratic_weights(X, gamma=1.0, iters=10)
    torch.testing.assert_close(alpha, alpha[..., :1].expand_as(alpha))
    pooled = democratic_pool(X, gamma=1.0, normalize=False)
    summed = X.mT @ X
    scale = (pooled * summed).sum((-2, -1)) / (summed * summed).sum((-2, -1))
    torch.testing.assert_close(pooled, scale[:, None, None] * summed)
    # normalize=True gives exactly the B-CNN average (1/n) sum_i x_i x_i^T.
    torch.testing.assert_close(democratic_pool(X, gamma=1.0), summed / X.shape[-2])


def test_gamma_zero_equalizes_contributions() -> None:
    X = relu_features(2, 30, 6, seed=3)
    alpha = democratic_weights(X, gamma=0.0, iters=60)
    c = contributions(X, alpha)
    torch.testing.assert_close(c, c[..., :1].expand_as(c), atol=1e-9, rtol=1e-9)
    # ...while sum pooling does not.
    c_sum = contributions(X, torch.ones_like(alpha))
    assert float(c_sum.max() / c_sum.min()) > 2.0


def test_matches_explicit_outer_product_formula() -> None:
    """K from the n x n Gram matrix equals the kernel of the vectorised outer products."""
    X = relu_features(1, 12, 4, seed=4)
    phi = (X[..., :, None] * X[..., None, :]).flatten(-2)  # (1, n, d^2)
    alpha = torch.ones(1, 12, dtype=F64)
    for _ in range(7):
        sigma = alpha * (phi @ (phi.mT @ alpha[..., None]))[..., 0]
        sigma = sigma / (phi @ phi.mT).sum(-1) ** 0.5
        alpha = alpha / sigma**0.5
    torch.testing.assert_close(democratic_weights(X, gamma=0.5, iters=7), alpha)
    pooled = (phi * alpha[..., None]).sum(-2).reshape(1, 4, 4)
    torch.testing.assert_close(democratic_pool(X, iters=7, normalize=False), pooled)


def test_detach_stops_gradient_through_alpha() -> None:
    X = relu_features(2, 20, 5, seed=5).requires_grad_()
    G = torch.randn(2, 5, 5, dtype=F64)
    (democratic_pool(X, detach=True, normalize=False) * G).sum().backward()
    alpha = democratic_weights(X, detach=True)
    assert not alpha.requires_grad
    Xc = X.detach().clone().requires_grad_()
    ((Xc * alpha[..., None]).mT @ Xc * G).sum().backward()
    torch.testing.assert_close(X.grad, Xc.grad)
    # Without detach the gradient also flows through alpha and differs.
    Xf = X.detach().clone().requires_grad_()
    (democratic_pool(Xf, normalize=False) * G).sum().backward()
    assert float((Xf.grad - X.grad).abs().max()) > 1e-6


def test_zero_locations_and_large_d_are_finite() -> None:
    X = relu_features(2, 16, 1024, seed=6)
    X[:, :5] = 0.0  # dead locations
    X[1] = 0.0  # an all-zero sample
    X.requires_grad_()
    for detach in (False, True):
        X.grad = None
        out = democratic_pool(X, gamma=0.3, detach=detach)
        assert out.shape == (2, 1024, 1024)
        out.square().sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(X.grad).all()
    alpha = democratic_weights(X.detach())
    torch.testing.assert_close(alpha[:, :5], torch.ones(2, 5, dtype=F64))


def test_first_order_fixed_point_and_limits() -> None:
    # order=1: the kernel is the linear x_i^T x_j, and at convergence each feature's
    # contribution alpha_i x_i^T xi (xi = sum_j alpha_j x_j) is (K 1)_i^gamma.
    X = relu_features(2, 30, 6, seed=7)
    K = X @ X.mT
    for gamma in (0.0, 0.4):
        alpha = democratic_weights(X, gamma=gamma, iters=80, order=1)
        xi = (alpha[..., None] * X).sum(-2)
        ratio = alpha * (X @ xi[..., None])[..., 0] / K.sum(-1) ** gamma
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-9, rtol=0)
    # The first-order weights are not the second-order ones.
    assert float((democratic_weights(X, order=1) - democratic_weights(X)).abs().max()) > 1e-3
    pooled = democratic_pool(X, gamma=0.4, iters=80, order=1)
    assert pooled.shape == (2, 6)
    alpha = democratic_weights(X, gamma=0.4, iters=80, order=1)
    torch.testing.assert_close(pooled, (alpha[..., None] * X).sum(-2) / alpha.sum(-1, True))
    # gamma = 1: the mean feature.
    torch.testing.assert_close(democratic_pool(X, gamma=1.0, order=1), X.mean(-2))
    with pytest.raises(ValueError, match="order must be one of 1, 2"):
        democratic_weights(X, order=3)


@pytest.mark.parametrize("order", [1, 2])
def test_factored_route_equals_the_gram_route_in_value_and_gradient(order: int) -> None:
    X = relu_features(2, 24, 5, seed=8)
    X[0, :3] = 0.0  # dead locations keep alpha = 1 on both routes
    X[1] = 0.0  # an all-zero sample
    W = torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(9))
    results = []
    for route in ("gram", "factored"):
        x = X.clone().requires_grad_()
        alpha = democratic_weights(x, gamma=0.3, iters=10, order=order, route=route)
        (alpha * W).sum().backward()
        results.append((alpha.detach(), x.grad))
    (a_gram, g_gram), (a_fact, g_fact) = results
    torch.testing.assert_close(a_fact, a_gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fact, g_gram, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(g_fact).all() and float(g_fact[0].abs().sum()) > 0


def test_auto_route_factors_many_locations_of_few_channels() -> None:
    # The built-in dataset's maps (1024 locations of 64 channels) skip the n x n kernel;
    # VGG-D's (196 or 784 locations of 512) keep it; the first order never forms it.
    assert factored_is_cheaper(1024, 64) and not factored_is_cheaper(784, 512)
    assert not factored_is_cheaper(196, 512) and factored_is_cheaper(196, 512, order=1)
    for X in (relu_features(1, 64, 8), relu_features(1, 8, 16)):  # one of each route
        torch.testing.assert_close(
            democratic_weights(X), democratic_weights(X, route="gram"), rtol=1e-12, atol=0
        )
    with pytest.raises(ValueError, match="route must be one of"):
        democratic_weights(X, route="fast")
