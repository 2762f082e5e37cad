"""Finite values and gradients on degenerate inputs: zero, rank-deficient, repeated, bf16."""

from __future__ import annotations

import pytest
import torch

from bcnn.ops import democratic_pool, logm, powm, signed_power, signed_sqrt, sqrtm

SQRTM_MODES = [
    ("newton_schulz", "lyapunov_iterative"),
    ("newton_schulz", "lyapunov_eig"),
    ("newton_schulz", "autograd"),
    ("newton_schulz", "svd"),
    ("eigh", "lyapunov_eig"),
    ("eigh", "lyapunov_iterative"),
    ("eigh", "svd"),
    ("svd", "lyapunov_eig"),
    ("svd", "svd"),
    ("auto", "auto"),
]

FUNCTIONS = {
    **{
        f"sqrtm-{m}-{b}": (lambda a, m=m, b=b: sqrtm(a, method=m, backward=b))
        for m, b in SQRTM_MODES
    },
    "sqrtm-inverse": lambda a: torch.cat(sqrtm(a, method="newton_schulz", return_inverse=True)),
    "sqrtm-eigh-inverse": lambda a: torch.cat(sqrtm(a, method="eigh", return_inverse=True)),
    "logm-eigh": lambda a: logm(a),
    # Fewer roots and iterations than the defaults: finiteness does not need convergence.
    "logm-iterative": lambda a: logm(a, method="iterative", num_roots=3, sqrt_iters=8),
    "powm": lambda a: powm(a, 0.3),
}


def relu_gram(batch: int, n: int, d: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(batch, n, d, generator=gen, dtype=dtype))
    return X.mT @ X / n


def assert_finite_value_and_grad(fn, A: torch.Tensor) -> torch.Tensor:
    A = A.detach().clone().requires_grad_()
    out = fn(A)
    assert torch.isfinite(out).all()
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * G).sum().backward()
    assert torch.isfinite(A.grad).all()
    return out


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("case", ["zero", "identity", "relu_gram", "scaled_identity_block"])
def test_degenerate_inputs(name: str, case: str) -> None:
    d = 24
    A = {
        "zero": torch.zeros(2, d, d),
        "identity": torch.eye(d).expand(2, d, d),
        "relu_gram": relu_gram(2, 8, d),  # rank 8 < d
        "scaled_identity_block": torch.block_diag(3 * torch.eye(12), torch.eye(12)).expand(2, d, d),
    }[case]
    assert_finite_value_and_grad(FUNCTIONS[name], A)


def test_sqrtm_of_zero_and_identity_values() -> None:
    for method in ("newton_schulz", "eigh", "svd"):
        torch.testing.assert_close(sqrtm(torch.zeros(3, 3), method=method), torch.zeros(3, 3))
        eye = torch.eye(5) * 4.0
        torch.testing.assert_close(sqrtm(eye, method=method, iters=8), torch.eye(5) * 2.0)


@pytest.mark.parametrize(
    ("method", "backward"),
    [("newton_schulz", "lyapunov_iterative"), ("eigh", "lyapunov_eig"), ("auto", "auto")],
)
def test_rank_deficient_vgg_sized_gram(method: str, backward: str) -> None:
    """d = 512 channels from n = 196 ReLU locations (rank 196), float32."""
    A = relu_gram(1, 196, 512, seed=2)
    out = assert_finite_value_and_grad(lambda a: sqrtm(a, method=method, backward=backward), A)
    assert out.dtype == torch.float32


def test_rank_deficient_logm_powm_512() -> None:
    A = relu_gram(1, 196, 512, seed=3)
    assert_finite_value_and_grad(lambda a: logm(a), A)
    assert_finite_value_and_grad(lambda a: powm(a, 0.5), A)


def test_densenet_sized_gram_1920() -> None:
    """d = 1920 from n = 196 (rank 196): one cheap Newton-Schulz pass, forward and backward."""
    A = relu_gram(1, 196, 1920, seed=4)
    out = assert_finite_value_and_grad(
        lambda a: sqrtm(a, method="newton_schulz", iters=2, backward="lyapunov_iterative"), A
    )
    assert out.shape == (1, 1920, 1920)


def test_largest_supported_size_2048() -> None:
    A = relu_gram(1, 64, 2048, seed=5)
    out = assert_finite_value_and_grad(lambda a: sqrtm(a, method="newton_schulz", iters=1), A)
    assert out.shape == (1, 2048, 2048)


@pytest.mark.parametrize(
    "name",
    [
        "sqrtm-newton_schulz-lyapunov_iterative",
        "sqrtm-auto-auto",
        "sqrtm-eigh-lyapunov_eig",
        "logm-eigh",
        "powm",
    ],
)
def test_bf16_under_autocast_computes_in_float32(name: str) -> None:
    A = (relu_gram(2, 40, 16, seed=6) + 0.1 * torch.eye(16)).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FUNCTIONS[name](A)
        # Inside autocast a following matmul would run in bf16; the op itself must not.
        assert out.dtype == torch.float32
    out.sum().backward()
    assert A.grad.dtype == torch.bfloat16 and torch.isfinite(A.grad.float()).all()
    reference = FUNCTIONS[name](A.detach().float())
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_autocast_does_not_downcast_float64() -> None:
    A = relu_gram(1, 40, 16, dtype=torch.float64) + torch.eye(16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sqrtm(A, method="newton_schulz").dtype == torch.float64
        assert democratic_pool(torch.randn(2, 10, 4, dtype=torch.float64)).dtype == torch.float64


def test_signed_sqrt_is_finite_at_zero() -> None:
    x = torch.zeros(5, requires_grad=True)
    signed_sqrt(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_signed_power_is_guarded_at_zero_and_exact_away_from_it() -> None:
    x = torch.tensor([-4.0, -1e-3, 0.0, 1e-3, 9.0], dtype=torch.float64, requires_grad=True)
    y = signed_power(x, 0.3, eps=1e-12)
    exact = torch.sign(x) * x.abs() ** 0.3
    assert torch.allclose(y, exact.detach(), atol=1e-3)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[2] == pytest.approx(0.3 * 1e-12 ** (0.3 - 1.0))
    with pytest.raises(ValueError, match="p must be in"):
        signed_power(x, 1.5)
