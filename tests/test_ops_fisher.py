"""Diagonal GMM by EM and the improved Fisher vector: formulas, EM behaviour, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bcnn.ops import GMM, fisher_vector, fit_gmm

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_gmm(K: int, d: int, seed: int, dtype: torch.dtype = F64) -> GMM:
    gen = torch.Generator().manual_seed(seed)
    gmm = GMM(K, d, dtype=dtype)
    w = torch.rand(K, generator=gen, dtype=F64) + 0.2
    gmm.weights.copy_(w / w.sum())
    gmm.means.copy_(torch.randn(K, d, generator=gen, dtype=F64))
    gmm.variances.copy_(torch.rand(K, d, generator=gen, dtype=F64) * 1.5 + 0.3)
    return gmm


def numpy_fisher(X: np.ndarray, w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """The formulas of Perronnin et al. (2010) for one image, one component at a time."""
    n, d = X.shape
    K = len(w)
    logp = np.empty((n, K))
    for k in range(K):
        for i in range(n):
            z = (X[i] - mu[k]) ** 2 / var[k]
            logp[i, k] = math.log(w[k]) - 0.5 * (
                d * math.log(2 * math.pi) + np.log(var[k]).sum() + z.sum()
            )
    gamma = np.exp(logp - logp.max(1, keepdims=True))
    gamma /= gamma.sum(1, keepdims=True)
    u = np.zeros((K, d))
    v = np.zeros((K, d))
    for k in range(K):
        sigma = np.sqrt(var[k])
        for i in range(n):
            diff = (X[i] - mu[k]) / sigma
            u[k] += gamma[i, k] * diff
            v[k] += gamma[i, k] * (diff**2 - 1)
        u[k] /= n * math.sqrt(w[k])
        v[k] /= n * math.sqrt(2 * w[k])
    return np.concatenate([u.ravel(), v.ravel()])


def test_fisher_vector_matches_the_formulas() -> None:
    gmm = random_gmm(K=3, d=5, seed=0)
    X = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(1), dtype=F64) * 1.3
    fv = fisher_vector(X, gmm)
    assert fv.shape == (2, 2 * 3 * 5) and fv.dtype == F64
    w, mu, var = (t.numpy() for t in (gmm.weights, gmm.means, gmm.variances))
    for b in range(2):
        ref = numpy_fisher(X[b].numpy(), w, mu, var)
        np.testing.assert_allclose(fv[b].numpy(), ref, rtol=0, atol=1e-9)


def test_fisher_vector_far_from_the_origin() -> None:
    """The expanded quadratic forms must not cancel for data far from the origin."""
    gmm = random_gmm(K=3, d=5, seed=2)
    gmm.means.add_(1000.0)
    X = gmm.means[1] + torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = numpy_fisher(X[0].numpy(), *(t.numpy() for t in (gmm.weights, gmm.means, gmm.variances)))
    np.testing.assert_allclose(fisher_vector(X, gmm)[0].numpy(), ref, rtol=0, atol=1e-9)
    # float32: relative error of the whole vector stays small.
    fv32 = fisher_vector(X.float(), gmm.float()).double()
    assert float((fv32[0] - torch.from_numpy(ref)).norm() / np.linalg.norm(ref)) < 1e-4


def test_improved_is_signed_sqrt_then_l2() -> None:
    gmm = random_gmm(K=3, d=5, seed=4)
    X = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    raw = fisher_vector(X, gmm)
    imp = fisher_vector(X, gmm, improved=True)
    exact = raw.sign() * raw.abs().sqrt()
    exact = exact / exact.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(imp.norm(dim=-1), torch.ones(3, dtype=F64))
    # signed_sqrt's gradient guard moves values by at most sqrt(1e-8) before the L2.
    torch.testing.assert_close(imp, exact, atol=5e-4, rtol=0)


def test_shapes_leading_dims_and_module_call() -> None:
    gmm = random_gmm(K=4, d=6, seed=6, dtype=torch.float32)
    X = torch.rand(2, 3, 10, 6)
    out = gmm(X)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 2], fisher_vector(X[1, 2], gmm))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, 6\)"):
        fisher_vector(torch.rand(2, 10, 5), gmm)
    with pytest.raises(ValueError, match="n = 0"):
        fisher_vector(torch.rand(2, 0, 6), gmm)


def test_min_posterior() -> None:
    gmm = random_gmm(K=3, d=5, seed=7)
    X = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(8), dtype=F64)
    # Every posterior is below 2: the threshold keeps all terms; above 1 it drops all.
    torch.testing.assert_close(fisher_vector(X, gmm, min_posterior=1e-300), fisher_vector(X, gmm))
    dropped = fisher_vector(X, gmm, min_posterior=1.5)
    torch.testing.assert_close(dropped, torch.zeros_like(dropped))


def test_gradients_are_exact_and_finite() -> None:
    gmm = random_gmm(K=2, d=3, seed=9)
    X = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fisher_vector(x, gmm), (X,))
    assert torch.autograd.gradcheck(lambda x: fisher_vector(x, gmm, improved=True), (X,))
    # float32, realistic-ish sizes, ReLU features with exact zeros.
    gmm32 = random_gmm(K=8, d=16, seed=11, dtype=torch.float32)
    Z = torch.relu(torch.randn(3, 50, 16)).requires_grad_(True)
    fisher_vector(Z, gmm32, improved=True).sum().backward()
    assert Z.grad is not None and bool(torch.isfinite(Z.grad).all())
    assert float(Z.grad.abs().sum()) > 0


def test_autocast_computes_in_float32() -> None:
    gmm = random_gmm(K=3, d=8, seed=12, dtype=torch.float32)
    X = torch.randn(2, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fisher_vector(X.bfloat16(), gmm)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fisher_vector(X.bfloat16().float(), gmm))


def mixture_samples(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [8.0, 8.0, 0.0, 0.0], [0.0, 8.0, 8.0, -8.0]], dtype=F64
    )
    stds = torch.tensor(
        [[1.0, 0.5, 1.0, 0.7], [0.6, 1.0, 0.8, 1.0], [1.0, 1.0, 0.5, 0.9]], dtype=F64
    )
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    z = torch.multinomial(weights, 3000, replacement=True, generator=gen)
    x = means[z] + stds[z] * torch.randn(3000, 4, generator=gen, dtype=F64)
    return x, weights, means, stds**2


def test_em_recovers_separated_clusters() -> None:
    # k-means++ seeding (the default) lands one seed per cluster; random seeds need not.
    x, weights, means, variances = mixture_samples()
    gmm, info = fit_gmm(x, 3, seed=0)
    assert info["converged"] and info["reseeded"] == 0
    order = [int(torch.cdist(m[None], gmm.means).argmin()) for m in means]
    assert sorted(order) == [0, 1, 2]
    torch.testing.assert_close(gmm.means[order], means, atol=0.1, rtol=0)
    torch.testing.assert_close(gmm.weights[order], weights, atol=0.03, rtol=0)
    torch.testing.assert_close(gmm.variances[order], variances, atol=0, rtol=0.15)


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_em_log_likelihood_never_decreases(init: str) -> None:
    # Overlapping components: EM needs many iterations, each must not lose likelihood.
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(400, 3, generator=gen, dtype=F64) * s + s for s in (1.0, 1.5, 2.0)])
    gmm, info = fit_gmm(x, 5, init=init, seed=3, max_iters=60, tol=0)
    ll = info["log_likelihood"]
    assert len(ll) == info["iterations"] + 1 == 61
    diffs = np.diff(ll)
    assert diffs.min() >= -1e-10 and ll[-1] > ll[0]
    # The reported value is the returned model's mean log-likelihood.
    D = torch.distributions
    components = D.Independent(D.Normal(gmm.means, gmm.variances.sqrt()), 1)
    mixture = D.MixtureSameFamily(D.Categorical(probs=gmm.weights), components)
    assert math.isclose(float(mixture.log_prob(x).mean()), ll[-1], rel_tol=1e-10)


def test_em_runs_in_float32_and_chunks() -> None:
    x, *_ = mixture_samples(seed=2)
    full, _ = fit_gmm(x, 3, seed=0)
    gmm32, info = fit_gmm(x.float(), 3, seed=0, chunk_size=256)
    assert gmm32.means.dtype == torch.float32 and info["converged"]
    torch.testing.assert_close(gmm32.means.double(), full.means, atol=1e-3, rtol=0)


def test_variance_floor_handles_constant_dimensions() -> None:
    x, *_ = mixture_samples(seed=4)
    x = torch.cat([x, torch.full((x.shape[0], 1), 3.0, dtype=F64)], 1)  # a dead channel
    gmm, _ = fit_gmm(x, 3, var_floor=1e-4)
    floor = 1e-4 * float(x.var(0, unbiased=False).max())
    assert float(gmm.variances.min()) >= floor * (1 - 1e-12)
    fv = fisher_vector(x[None, :50], gmm)
    assert bool(torch.isfinite(fv).all())


def test_empty_component_is_reseeded() -> None:
    x, *_ = mixture_samples(seed=5)
    start = GMM(3, 4, dtype=F64)
    start.means.copy_(torch.tensor([[0.0, 0, 0, 0], [8, 8, 0, 0], [1e4, 1e4, 1e4, 1e4]]))
    start.variances.fill_(1.0)
    gmm, info = fit_gmm(x, 3, init=start)
    assert info["reseeded"] >= 1
    assert float(gmm.weights.min()) > 0.1  # the far component now explains real data
    assert float(gmm.means.abs().max()) < 20


def test_fit_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="num_components=8"):
        fit_gmm(torch.randn(5, 2), 8)
    with pytest.raises(ValueError, match="NaN"):
        fit_gmm(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="init"):
        fit_gmm(torch.randn(20, 2), 2, init="pca")
    with pytest.raises(ValueError, match="init GMM"):
        fit_gmm(torch.randn(20, 2), 2, init=GMM(3, 2))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        fit_gmm(torch.randn(2, 20, 2), 2)


def test_state_dict_round_trip() -> None:
    x, *_ = mixture_samples(seed=6)
    gmm, _ = fit_gmm(x.float(), 3, max_iters=5)
    assert set(gmm.state_dict()) == {"weights", "means", "variances"}
    fresh = GMM(3, 4)
    fresh.load_state_dict(gmm.state_dict())
    X = x[None, :30].float()
    torch.testing.assert_close(fresh(X), gmm(X), rtol=0, atol=0)
