"""Compact bilinear pooling: unbiased kernel estimates, two-input form, seeded buffers."""

from __future__ import annotations

import pytest
import torch

from bcnn.ops import RandomMaclaurin, TensorSketch

F64 = torch.float64
MODULES = [TensorSketch, RandomMaclaurin]


def _vectors(seed: int, dim: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=gen, dtype=F64)
    # Correlated with base so that (x^T y)^2 is far from 0 and relative errors are meaningful.
    return [base + 0.5 * torch.randn(dim, generator=gen, dtype=F64) for _ in range(count)]


@pytest.mark.parametrize("cls", MODULES)
def test_symmetric_inner_product_is_unbiased(cls) -> None:
    x, y = _vectors(0, 32, 2)
    true = float(x @ y) ** 2
    estimates = []
    for seed in range(200):
        m = cls(32, out_dim=256, seed=seed)
        estimates.append(float(m(x[None, None]) @ m(y[None, None]).mT))
    est = torch.tensor(estimates, dtype=F64)
    # The mean of 200 sketches is unbiased (5 standard errors of the mean) ...
    assert abs(est.mean().item() - true) < 5 * est.std().item() / 200**0.5
    assert abs(est.mean().item() / true - 1) < 0.05
    # ... while one sketch is random (the test would be vacuous otherwise).
    assert est.std().item() > 1e-3 * true


@pytest.mark.parametrize("cls", MODULES)
def test_two_input_inner_product_is_unbiased(cls) -> None:
    x, u = _vectors(1, 24, 2)
    y, v = _vectors(2, 16, 2)
    true = float(x @ u) * float(y @ v)
    estimates = []
    for seed in range(200):
        m = cls(24, out_dim=256, seed=seed, in_dim2=16)
        estimates.append(
            float(m(x[None, None], y[None, None]) @ m(u[None, None], v[None, None]).mT)
        )
    est = torch.tensor(estimates, dtype=F64)
    assert abs(est.mean().item() / true - 1) < 0.05


@pytest.mark.parametrize("cls", MODULES)
def test_averages_over_locations(cls) -> None:
    """The output sketches (1/n) sum_i x_i x_i^T: the mean of per-location sketches."""
    m = cls(8, out_dim=64, seed=3)
    X = torch.randn(2, 5, 8, dtype=F64)
    per_location = torch.stack([m(X[:, i : i + 1]) for i in range(5)], 1)
    torch.testing.assert_close(m(X), per_location.mean(1))
    assert m(X).shape == (2, 64)
    assert m(X).dtype == F64


@pytest.mark.parametrize("cls", MODULES)
def test_buffers_in_state_dict_and_deterministic(cls) -> None:
    rng_state = torch.random.get_rng_state()
    a, b, c = (
        cls(10, 32, seed=7, in_dim2=6),
        cls(10, 32, seed=7, in_dim2=6),
        cls(10, 32, seed=8, in_dim2=6),
    )
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert len(sd_a) >= 2 and not list(a.parameters())
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert any(not torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    c.load_state_dict(sd_a)
    x, y = torch.randn(3, 4, 10), torch.randn(3, 4, 6)
    torch.testing.assert_close(c(x, y), a(x, y))


@pytest.mark.parametrize("cls", MODULES)
def test_gradients_shapes_and_bf16_autocast(cls) -> None:
    m = cls(16, out_dim=128, seed=0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 128)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        m(torch.randn(2, 9, 15))
    with pytest.raises(ValueError):
        cls(16, 32, in_dim2=8)(torch.randn(2, 9, 16))  # two-input module needs y


def test_tensor_sketch_routes_agree_in_values_and_gradients() -> None:
    # The per-location FFTs and the scatter of the pooled matrix are one linear map.
    sketch = TensorSketch(16, 64, seed=3, in_dim2=8)
    x = torch.randn(2, 20, 16, dtype=F64, requires_grad=True)
    y = torch.randn(2, 20, 8, dtype=F64, requires_grad=True)
    results = {}
    for route in ("fft", "pooled"):
        sketch.route = route
        out = sketch(x, y)
        grads = torch.autograd.grad(out.sin().sum(), (x, y))
        results[route] = (out, *grads)
    for a, b in zip(results["fft"], results["pooled"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert results["fft"][0].abs().max() > 0.1


def test_tensor_sketch_takes_the_route_holding_fewer_values() -> None:
    vgg = TensorSketch(512, 8192)  # 512 x 512 matrix against 28 x 28 locations x 8192
    assert vgg.route_for(28 * 28) == "pooled" and vgg.route_for(16) == "fft"
    resnet = TensorSketch(2048, 8192)  # 4.2M matrix entries against 14 x 14 x 8192 = 1.6M
    assert resnet.route_for(14 * 14) == "fft"
    resnet.route = "pooled"  # what the exporter sets
    assert resnet.route_for(14 * 14) == "pooled"
