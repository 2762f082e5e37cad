"""Small-side (n x n) matrix functions of pooled features against the d x d routes."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from bcnn.models.normalization import add_ridge
from bcnn.ops import (
    logm,
    logm_from_features,
    matrix_function_from_features,
    powm,
    powm_from_features,
    small_side_cheaper,
    sqrtm,
    sqrtm_from_features,
)
from bcnn.ops.small_side import dxd_flops, small_side_flops
from tests.conftest import load_script

F64 = torch.float64

# name -> (small-side call, d x d call on the ridged pooled matrix M), both given the ridge.
ROUTES: dict[str, tuple[Callable, Callable]] = {
    "sqrt_eigh": (
        lambda X, e, m: sqrtm_from_features(X, "eigh", eps=e, eps_mode=m),
        lambda M: sqrtm(M, method="eigh", backward="lyapunov_eig"),
    ),
    "sqrt_ns5_fro": (
        lambda X, e, m: sqrtm_from_features(X, "newton_schulz", iters=5, eps=e, eps_mode=m),
        lambda M: sqrtm(M, method="newton_schulz", iters=5, backward="autograd"),
    ),
    "sqrt_ns3_trace": (
        lambda X, e, m: sqrtm_from_features(
            X, "newton_schulz", iters=3, scale="trace", eps=e, eps_mode=m
        ),
        lambda M: sqrtm(M, method="newton_schulz", iters=3, backward="autograd", scale="trace"),
    ),
    "power_0.3": (
        lambda X, e, m: powm_from_features(X, 0.3, eps=e, eps_mode=m),
        lambda M: powm(M, 0.3),
    ),
    "power_0.75_floor": (
        lambda X, e, m: powm_from_features(X, 0.75, eps=e, eps_mode=m, floor=1e-10),
        lambda M: powm(M, 0.75, eps=1e-10),
    ),
    "log": (
        lambda X, e, m: logm_from_features(X, eps=e, eps_mode=m),
        lambda M: logm(M, method="eigh"),
    ),
}


def features(kind: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(2, n, d) float64 features of a given structure."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "relu":
        return torch.randn(2, n, d, generator=gen, dtype=F64).relu()
    if kind == "rank2":  # rank 2 < n: G has n - 2 zero eigenvalues
        return torch.randn(2, n, 2, generator=gen, dtype=F64) @ torch.randn(
            2, 2, d, generator=gen, dtype=F64
        )
    if kind == "repeated_rows":  # one location repeated n times
        return torch.randn(2, 1, d, generator=gen, dtype=F64).relu().repeat(1, n, 1) + 0.1
    if kind == "orthonormal_rows":  # G = (9 / n) I: all n eigenvalues equal
        Q, _ = torch.linalg.qr(torch.randn(2, d, n, generator=gen, dtype=F64))
        return 3.0 * Q.mT.contiguous()
    if kind == "zero":
        return torch.zeros(2, n, d, dtype=F64)
    raise ValueError(kind)


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, W: torch.Tensor):
    x = X.clone().requires_grad_()
    out = fn(x)
    (out * W).sum().backward()
    return out.detach(), x.grad


def dxd_route(name: str, eps: float, eps_mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(X: torch.Tensor) -> torch.Tensor:
        A = X.mT @ X / X.shape[-2]
        return ROUTES[name][1](add_ridge(A, eps, eps_mode))

    return run


def small_route(name: str, eps: float, eps_mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda X: ROUTES[name][0](X, eps, eps_mode)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    ("kind", "n", "d"),
    [
        ("relu", 3, 10),
        ("relu", 7, 16),
        ("rank2", 7, 16),
        ("repeated_rows", 7, 10),
        ("orthonormal_rows", 7, 16),
        ("relu", 16, 10),  # n > d: still correct, only not cheaper
    ],
)
@pytest.mark.parametrize(("eps", "eps_mode"), [(0.0, "abs"), (1e-3, "abs"), (1e-2, "trace")])
def test_matches_dxd_route_in_value_and_gradient(
    route: str, kind: str, n: int, d: int, eps: float, eps_mode: str
) -> None:
    X = features(kind, n, d)
    W = torch.randn(2, d, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref_val, ref_grad = value_and_grad(dxd_route(route, eps, eps_mode), X, W)
    val, grad = value_and_grad(small_route(route, eps, eps_mode), X, W)
    assert val.dtype == F64 and val.shape == (2, d, d)
    assert rel_err(val, ref_val) <= 1e-5
    assert torch.isfinite(grad).all()
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("route", ["power_0.3", "log"])
def test_ridge_below_the_floor_mirrors_the_clamp(route: str) -> None:
    # r = 1e-9 is below powm's floor 1e-8 and logm's 1e-6: the null space and the smallest
    # eigenvalues are clamped in the d x d route, and so here.
    X = features("rank2", 7, 16) * 1e-3
    W = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref_val, ref_grad = value_and_grad(dxd_route(route, 1e-9, "abs"), X, W)
    val, grad = value_and_grad(small_route(route, 1e-9, "abs"), X, W)
    assert rel_err(val, ref_val) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(("eps", "eps_mode"), [(1e-3, "abs"), (1e-2, "trace"), (0.0, "abs")])
def test_zero_features_give_f_of_the_ridge(route: str, eps: float, eps_mode: str) -> None:
    X = features("zero", 7, 10)
    W = torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref_val, ref_grad = value_and_grad(dxd_route(route, eps, eps_mode), X, W)
    val, grad = value_and_grad(small_route(route, eps, eps_mode), X, W)
    # trace mode: tr(A) = 0, so the ridge is 0 too and only the floors remain.
    r = eps if eps_mode == "abs" else 0.0
    expected = {
        "sqrt_eigh": math.sqrt(r),
        "power_0.3": max(r, 1e-8) ** 0.3,
        "power_0.75_floor": max(r, 1e-10) ** 0.75,
        "log": math.log(max(r, 1e-6)),
    }
    if route in expected:
        eye = torch.eye(10, dtype=F64).expand(2, 10, 10)
        torch.testing.assert_close(val, expected[route] * eye, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_tiny_features_under_a_large_ridge_are_accurate() -> None:
    # l / r ~ 1e-10: the second divided differences cancel (harmlessly, see _second_dd); the d x d
    # route loses the digits of log(1 + l) there, so compare with the series log(I + A).
    X = features("relu", 7, 16) * 1e-5
    A = X.mT @ X / 7
    series = A - A @ A / 2 + A @ A @ A / 3
    assert rel_err(logm_from_features(X, eps=1.0), series) <= 1e-10
    W = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(4), dtype=F64)
    for route in ("sqrt_eigh", "power_0.3", "log"):
        ref_grad = value_and_grad(dxd_route(route, 1.0, "abs"), X, W)[1]
        grad = value_and_grad(small_route(route, 1.0, "abs"), X, W)[1]
        assert rel_err(grad, ref_grad) <= 1e-6


@pytest.mark.parametrize("route", ["sqrt_eigh", "sqrt_ns3_trace", "power_0.3", "log"])
@pytest.mark.parametrize(("eps", "eps_mode"), [(0.1, "abs"), (0.1, "trace")])
def test_gradcheck(route: str, eps: float, eps_mode: str) -> None:
    X = features("relu", 3, 5, seed=5) + 0.05
    assert gradcheck(small_route(route, eps, eps_mode), (X.requires_grad_(),))


def test_gradcheck_without_ridge_at_full_row_rank() -> None:
    # (X^T X)^(1/2) = X^T (X X^T)^(-1/2) X is smooth in X where X X^T is invertible.
    X = features("relu", 3, 6, seed=6) + 0.1
    assert gradcheck(lambda x: sqrtm_from_features(x, "eigh"), (X.requires_grad_(),))


def test_exactly_repeated_gram_eigenvalues_give_finite_matching_gradients() -> None:
    # Singular values (2, 2, 2, 1, 1, 0, 0): repeated and zero eigenvalues of G.
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(2, 7, 7, generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(2, 16, 7, generator=gen, dtype=F64))
    sv = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    X = (U * sv) @ V.mT
    W = torch.randn(2, 16, 16, generator=gen, dtype=F64)
    for route in ("sqrt_eigh", "power_0.3", "log"):
        ref = value_and_grad(dxd_route(route, 1e-4, "trace"), X, W)
        val, grad = value_and_grad(small_route(route, 1e-4, "trace"), X, W)
        assert torch.isfinite(grad).all()
        assert rel_err(val, ref[0]) <= 1e-5 and rel_err(grad, ref[1]) <= 1e-5


def test_newton_schulz_gradient_vs_the_dxd_backwards() -> None:
    X = features("relu", 7, 16, seed=8)
    W = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(9), dtype=F64)

    def small(iters: int):
        return lambda x: sqrtm_from_features(
            x, "newton_schulz", iters=iters, eps=0.1, eps_mode="trace"
        )

    def dxd(iters: int, backward: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            M = add_ridge(x.mT @ x / 7, 0.1, "trace")
            return sqrtm(M, method="newton_schulz", iters=iters, backward=backward)

        return run

    # Same approximation, same (exact) gradient of it as autograd through the d x d iterations.
    small5 = value_and_grad(small(5), X, W)
    auto5 = value_and_grad(dxd(5, "autograd"), X, W)
    assert rel_err(small5[1], auto5[1]) <= 1e-10
    # lyapunov_iterative approximates the gradient of the exact root instead: only once the
    # iterations have converged do all three agree with the exact (eigh) gradient.
    exact = value_and_grad(small_route("sqrt_eigh", 0.1, "trace"), X, W)[1]
    small20 = value_and_grad(small(20), X, W)[1]
    lyap20 = value_and_grad(dxd(20, "lyapunov_iterative"), X, W)[1]
    assert rel_err(small20, exact) <= 1e-10 and rel_err(lyap20, exact) <= 1e-10


def test_float32_under_bfloat16_autocast_computes_in_float32() -> None:
    X = features("relu", 7, 16).float()
    expected = sqrtm_from_features(X, "eigh", eps=1e-3)
    for fn in (
        lambda x: sqrtm_from_features(x, "eigh", eps=1e-3),
        lambda x: sqrtm_from_features(x, "newton_schulz", eps=1e-3),
        lambda x: powm_from_features(x, 0.5, eps=1e-3),
        lambda x: logm_from_features(x, eps=1e-3),
    ):
        x = X.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
            out.square().sum().backward()
        assert out.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sqrtm_from_features(X, "eigh", eps=1e-3)
    torch.testing.assert_close(out, expected)
    # Half-precision features are upcast too.
    assert sqrtm_from_features(X.bfloat16(), "eigh", eps=1e-3).dtype == torch.float32


def test_leading_batch_dims_and_dispatcher() -> None:
    X = features("relu", 5, 8).reshape(2, 1, 5, 8).expand(2, 3, 5, 8)
    out = matrix_function_from_features(X, "power", p=0.3, eps=1e-3)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[:, 0], powm_from_features(X[:, 0], 0.3, eps=1e-3))
    torch.testing.assert_close(
        matrix_function_from_features(X, "log", eps=1e-3, floor=1e-6),
        logm_from_features(X, eps=1e-3),
    )
    torch.testing.assert_close(
        matrix_function_from_features(X, "sqrt", method="newton_schulz", iters=4),
        sqrtm_from_features(X, "newton_schulz", iters=4),
    )
    # "auto" resolves like sqrtm's table (eigh on CPU): exact.
    torch.testing.assert_close(
        sqrtm_from_features(X, "auto", eps=1e-3), sqrtm_from_features(X, "eigh", eps=1e-3)
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda X: sqrtm_from_features(X[0, 0]), "n, d"),
        (lambda X: sqrtm_from_features(X.long()), "floating-point"),
        (lambda X: sqrtm_from_features(X, "svd"), "method"),
        (lambda X: sqrtm_from_features(X, "newton_schulz", iters=-1), "iters"),
        (lambda X: sqrtm_from_features(X, scale="spectral"), "scale"),
        (lambda X: sqrtm_from_features(X, eps=-1.0), "eps must be >= 0"),
        (lambda X: logm_from_features(X, eps_mode="relative"), "eps_mode"),
        (lambda X: powm_from_features(X, 1.5), "p must be in"),
        (lambda X: logm_from_features(X, floor=0.0), "floor"),
        (lambda X: matrix_function_from_features(X, "exp"), "fn must be one of"),
    ],
)
def test_bad_arguments_are_named(call: Callable, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call(features("relu", 3, 5))


def test_cost_rule() -> None:
    for method in ("eigh", "newton_schulz"):
        # The measured shapes: few locations, many channels pick the small side.
        assert small_side_cheaper(196, 512, method)
        assert small_side_cheaper(196, 1920, method)
        assert small_side_cheaper(49, 2048, method, iters=5)
        # Never when n >= d, not when n is just below d (margin).
        # Nor below 128 channels (per-call overheads, not modelled).
        for n, d in [(784, 512), (512, 512), (3, 2), (500, 512), (6, 64)]:
            assert not small_side_cheaper(n, d, method)
        # The modelled advantage grows with d at fixed n.
        ratios = [dxd_flops(196, d, method) / small_side_flops(196, d, method) for d in (512, 1920)]
        assert 1.0 < ratios[0] < ratios[1]
    with pytest.raises(ValueError, match="method"):
        small_side_cheaper(10, 20, "svd")
    with pytest.raises(ValueError, match="n must be >= 1"):
        small_side_cheaper(0, 20)


def test_bench_script_quick_writes_csv_and_markdown(tmp_path: Path) -> None:
    module = load_script("bench_small_side")
    out = tmp_path / "small_side_cpu"
    rows = module.main(["--quick", "--out", str(out)])
    with open(out.with_suffix(".csv")) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) > 0
    routes = {r["route"] for r in records}
    assert {"dxd_eigh", "small_eigh", "dxd_ns5", "small_ns5"} <= routes
    assert all(float(r["time_ms"]) > 0 for r in records)
    # Every route but dxd_ns5 (lyapunov_iterative: another gradient) matches the float64
    # computation of its function; the small and d x d routes compute the same one.
    for r in records:
        assert float(r["rel_err_out"]) < 1e-4
        if r["route"] != "dxd_ns5":
            assert float(r["rel_err_grad"]) < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "speed-up" in md and "--quick" in md and torch.__version__ in md
