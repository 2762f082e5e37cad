"""logm and powm against scipy, and their Daleckii-Krein gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck

from bcnn.ops import logm, powm, sqrtm

F64 = torch.float64


def random_spd(d: int, cond: float, batch: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=F64))
    eig = torch.logspace(0.0, -math.log10(cond), d, dtype=F64)
    return (Q * eig) @ Q.mT


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(("method", "tol"), [("eigh", 1e-12), ("iterative", 1e-8)])
def test_logm_matches_scipy(method: str, tol: float) -> None:
    A = random_spd(16, 1e2, batch=(2,)) * 3.0
    L = logm(A, method=method, eps=1e-12)
    for b in range(2):
        ref = torch.from_numpy(np.real(scipy.linalg.logm(A[b].numpy())))
        assert rel_err(L[b], ref) <= tol


@pytest.mark.parametrize("p", [0.3, 0.5, 0.75, 1.0])
def test_powm_matches_scipy(p: float) -> None:
    A = random_spd(16, 1e3, batch=(2,), seed=1)
    P = powm(A, p)
    for b in range(2):
        ref = torch.from_numpy(np.real(scipy.linalg.fractional_matrix_power(A[b].numpy(), p)))
        assert rel_err(P[b], ref) <= 1e-10


def test_powm_half_matches_sqrtm_values_and_gradients() -> None:
    A = random_spd(12, 1e2, seed=2)
    G = torch.randn(12, 12, dtype=F64)
    grads = []
    for fn in (lambda a: powm(a, 0.5), lambda a: sqrtm(a, method="eigh")):
        a = A.clone().requires_grad_()
        out = fn(a)
        (out * G).sum().backward()
        grads.append((out.detach(), a.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize(
    "fn",
    [lambda a: logm(a), lambda a: powm(a, 0.3), lambda a: powm(a, 1.0)],
    ids=["logm", "powm0.3", "powm1"],
)
def test_gradcheck_spd_and_identity(fn) -> None:
    assert gradcheck(fn, (random_spd(5, 10.0, seed=3).requires_grad_(),))
    # Every eigenvalue repeated: the divided differences take the limit f'(l).
    assert gradcheck(fn, (torch.eye(4, dtype=F64).requires_grad_(),))


def test_gradcheck_with_clamped_eigenvalues() -> None:
    """Rank-deficient input: the gradient is the exact one of the clamped function."""
    gen = torch.Generator().manual_seed(4)
    X = torch.relu(torch.randn(3, 6, generator=gen, dtype=F64))
    A = (X.mT @ X).requires_grad_()  # rank 3, three eigenvalues ~0 < eps
    assert gradcheck(lambda a: logm(a, eps=1e-3), (A,))
    assert gradcheck(lambda a: powm(a, 0.5, eps=1e-3), (A,))


def test_divided_difference_without_cancellation() -> None:
    """For A = diag(1, 1 + delta), d log(A)_01 / dA_01 = log(1 + delta) / delta exactly."""
    for delta in (1e-3, 1e-9, 1e-14, 0.0):
        A = torch.diag(torch.tensor([1.0, 1.0 + delta], dtype=F64)).requires_grad_()
        G = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)
        (logm(A) * G).sum().backward()
        expected = math.log1p(delta) / delta if delta else 1.0
        # dA_01 perturbs both off-diagonal entries of the symmetrised input: half each.
        assert A.grad[0, 1].item() == pytest.approx(0.5 * expected, rel=1e-12)
        assert A.grad[1, 0].item() == pytest.approx(0.5 * expected, rel=1e-12)


def test_logm_iterative_gradient_matches_eigh() -> None:
    A = random_spd(10, 50.0, seed=5)
    G = torch.randn(10, 10, dtype=F64)
    grads = []
    for method in ("eigh", "iterative"):
        a = A.clone().requires_grad_()
        (logm(a, method=method, eps=1e-12) * G).sum().backward()
        grads.append(a.grad)
    assert rel_err(grads[1], grads[0]) <= 1e-6


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        powm(torch.eye(3), 1.5)
    with pytest.raises(ValueError):
        powm(torch.eye(3), 0.0)
    with pytest.raises(ValueError):
        logm(torch.eye(3), method="pade")
    with pytest.raises(ValueError):
        logm(torch.eye(3), eps=0.0)
