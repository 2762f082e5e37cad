"""sqrtm: forward methods against scipy, every backward against the exact Lyapunov solution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from bcnn.ops import SQRTM_AUTO_TABLE, resolve_sqrtm, sqrtm
from bcnn.ops.sqrtm import lyapunov_iterative_matmuls, newton_schulz_matmuls

F64 = torch.float64


def random_spd(d: int, cond: float, batch: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    """Random SPD matrices with eigenvalues log-spaced in [1/cond, 1]."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=F64))
    eig = torch.logspace(0.0, -math.log10(cond), d, dtype=F64)
    return (Q * eig) @ Q.mT


def scipy_sqrtm(A: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.real(scipy.linalg.sqrtm(A.numpy())))


def lyapunov_gradient(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Exact gradient of <G, A^(1/2)> for symmetric A: Z X + X Z = sym(G)."""
    Z = scipy_sqrtm(A).numpy()
    G_sym = 0.5 * (G + G.mT).numpy()
    return torch.from_numpy(scipy.linalg.solve_continuous_lyapunov(Z, G_sym))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


TALK_A = [[2.0, 1.0], [1.0, 1.0]]
TALK_SQRT = [[1.3416, 0.4472], [0.4472, 0.8944]]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", ["newton_schulz", "eigh", "svd", "auto"])
def test_talk_example(method: str, dtype: torch.dtype) -> None:
    A = torch.tensor(TALK_A, dtype=dtype)
    Y = sqrtm(A, method=method, iters=10)
    assert Y.dtype == dtype
    torch.testing.assert_close(Y, torch.tensor(TALK_SQRT, dtype=dtype), atol=1e-4, rtol=0)
    torch.testing.assert_close(Y @ Y, A, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "scale"),
    [("newton_schulz", "fro"), ("newton_schulz", "trace"), ("eigh", "fro"), ("svd", "fro")],
)
def test_forward_matches_scipy(method: str, scale: str) -> None:
    A = random_spd(24, 1e3, batch=(3,))
    Y = sqrtm(A, method=method, iters=30, scale=scale)
    for b in range(3):
        assert rel_err(Y[b], scipy_sqrtm(A[b])) <= 1e-5


def test_newton_schulz_error_decreases_with_iterations() -> None:
    A = random_spd(24, 1e3)
    ref = scipy_sqrtm(A)
    errors = [rel_err(sqrtm(A, method="newton_schulz", iters=k), ref) for k in (1, 5, 10, 20)]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("method", ["newton_schulz", "eigh", "svd"])
def test_inverse_root(method: str) -> None:
    A = random_spd(16, 1e2, batch=(2,))
    Y, W = sqrtm(A, method=method, iters=30, return_inverse=True)
    eye = torch.eye(16, dtype=F64).expand(2, 16, 16)
    torch.testing.assert_close(Y @ W, eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(W @ A @ W, eye, atol=1e-8, rtol=0)


# (method, backward, tolerance). lyapunov_iterative's own tolerance: with 25 backward steps on
# a condition-1e3 matrix the iteration has converged to ~1e-13 (1e-9 leaves margin).
BACKWARD_CASES = [
    ("newton_schulz", "lyapunov_iterative", 1e-9),
    ("newton_schulz", "lyapunov_eig", 1e-4),
    ("newton_schulz", "autograd", 1e-4),
    ("newton_schulz", "svd", 1e-4),
    ("eigh", "lyapunov_iterative", 1e-9),
    ("eigh", "lyapunov_eig", 1e-4),
    ("eigh", "svd", 1e-4),
    ("svd", "lyapunov_eig", 1e-4),
    ("svd", "svd", 1e-4),
]


@pytest.mark.parametrize(("method", "backward", "tol"), BACKWARD_CASES)
def test_backward_matches_exact_lyapunov(method: str, backward: str, tol: float) -> None:
    A = random_spd(20, 1e3, seed=1)
    G = torch.randn(20, 20, generator=torch.Generator().manual_seed(2), dtype=F64)
    A_req = A.clone().requires_grad_()
    Y = sqrtm(A_req, method=method, iters=30, backward=backward, backward_iters=25)
    (Y * G).sum().backward()
    assert rel_err(A_req.grad, lyapunov_gradient(A, G)) <= tol


def test_backward_batched_and_nonsymmetric_input_gradient_is_symmetric() -> None:
    A = random_spd(8, 1e2, batch=(2, 3), seed=3).requires_grad_()
    G = torch.randn(2, 3, 8, 8, dtype=F64)
    (sqrtm(A, method="eigh") * G).sum().backward()
    torch.testing.assert_close(A.grad, A.grad.mT)
    for i in range(2):
        for j in range(3):
            expected = lyapunov_gradient(A[i, j].detach(), G[i, j])
            assert rel_err(A.grad[i, j], expected) < 1e-10


def test_iterative_backward_with_few_steps_is_approximate_but_finite() -> None:
    A = random_spd(16, 1e3)
    G = torch.randn(16, 16, dtype=F64)
    A_req = A.clone().requires_grad_()
    Y = sqrtm(A_req, method="newton_schulz", iters=5, backward="lyapunov_iterative")
    (Y * G).sum().backward()
    assert torch.isfinite(A_req.grad).all()
    assert rel_err(A_req.grad, lyapunov_gradient(A, G)) > 1e-3


def test_gradcheck_eigh_lyapunov_eig() -> None:
    A = random_spd(5, 10.0, seed=4).requires_grad_()
    assert gradcheck(lambda a: sqrtm(a, method="eigh", backward="lyapunov_eig"), (A,))
    assert gradcheck(
        lambda a: sqrtm(a, method="eigh", backward="lyapunov_eig", return_inverse=True), (A,)
    )


def test_gradcheck_repeated_eigenvalues() -> None:
    # At the identity every eigenvalue is repeated: 1/(s_i + s_j) stays finite and exact.
    eye = torch.eye(4, dtype=F64).requires_grad_()
    assert gradcheck(lambda a: sqrtm(a, method="eigh", backward="lyapunov_eig"), (eye,))


def test_gradcheck_newton_schulz_inverse_with_iterative_backward() -> None:
    A = random_spd(4, 10.0, seed=5).requires_grad_()
    assert gradcheck(
        lambda a: sqrtm(a, method="newton_schulz", iters=30, return_inverse=True), (A,)
    )


def test_svd_backward_is_finite_but_wrong_on_repeated_eigenvalues() -> None:
    eye = torch.eye(6, dtype=F64, requires_grad=True)
    G = torch.randn(6, 6, dtype=F64)
    (sqrtm(eye, method="svd", backward="svd") * G).sum().backward()
    assert torch.isfinite(eye.grad).all()
    exact = 0.25 * (G + G.mT)  # sqrt(I) = I: Lyapunov gives sym(G) / 2
    assert rel_err(eye.grad, exact) > 0.1


@pytest.mark.parametrize("iters", [0, 1, 2, 5])
def test_newton_schulz_autograd_matches_unrolled_reference(iters: int) -> None:
    """backward='autograd' must differentiate exactly the approximation computed."""
    A = random_spd(6, 1e2, seed=6).requires_grad_()
    assert gradcheck(
        lambda a: sqrtm(a, method="newton_schulz", iters=iters, backward="autograd"), (A,)
    )


def test_batch_dims_and_shapes() -> None:
    A = random_spd(6, 1e2, batch=(2, 3), seed=7)
    Y = sqrtm(A, method="newton_schulz", iters=25)
    assert Y.shape == (2, 3, 6, 6)
    torch.testing.assert_close(Y[1, 2], sqrtm(A[1, 2], method="eigh"))
    with pytest.raises(ValueError):
        sqrtm(torch.zeros(3, 4))


class _MatmulCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("iters", [0, 1, 2, 5, 10])
@pytest.mark.parametrize("return_inverse", [False, True])
def test_matmul_counts(iters: int, return_inverse: bool) -> None:
    """The benchmark's matmul floor uses these counts: check them against the real op count."""
    A = random_spd(8, 10.0, batch=(2,)).requires_grad_()
    with _MatmulCounter() as fwd:
        out = sqrtm(
            A,
            method="newton_schulz",
            iters=iters,
            backward="lyapunov_iterative",
            return_inverse=return_inverse,
        )
    assert fwd.count == newton_schulz_matmuls(iters, return_inverse)
    Y = out[0] if return_inverse else out
    with _MatmulCounter() as bwd:
        Y.sum().backward()
    assert bwd.count == lyapunov_iterative_matmuls(iters)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_iterative_backward_saves_only_the_output() -> None:
    d = 16
    A = random_spd(d, 10.0, batch=(2,)).requires_grad_()
    matrix_bytes = 2 * d * d * 8
    iterative = _saved_bytes(lambda: sqrtm(A, method="newton_schulz", iters=10))
    unrolled = _saved_bytes(lambda: sqrtm(A, method="newton_schulz", iters=10, backward="autograd"))
    assert iterative == matrix_bytes
    assert unrolled > 10 * matrix_bytes


def test_auto_resolution() -> None:
    cpu_rows = SQRTM_AUTO_TABLE["cpu"]
    for d in (2, 64, 512, 2048):
        method, backward = resolve_sqrtm("auto", "auto", "cpu", d)
        row = next((r for r in cpu_rows if d <= r[0]), cpu_rows[-1])
        assert (method, backward) == (row[1], row[2])
    assert resolve_sqrtm("auto", "auto", "cuda", 512) == ("newton_schulz", "lyapunov_iterative")
    assert resolve_sqrtm("auto", "auto", "mps", 512)[0] == "newton_schulz"
    assert resolve_sqrtm("auto", "autograd", "cpu", 512) == ("newton_schulz", "autograd")
    assert resolve_sqrtm("eigh", "auto", "cuda", 512) == ("eigh", "lyapunov_eig")
    assert resolve_sqrtm("newton_schulz", "auto", "cpu", 512) == (
        "newton_schulz",
        "lyapunov_iterative",
    )
    with pytest.raises(ValueError):
        resolve_sqrtm("eigh", "autograd", "cpu", 512)
    with pytest.raises(ValueError):
        resolve_sqrtm("cholesky", "auto", "cpu", 512)
    with pytest.raises(ValueError):
        sqrtm(torch.eye(3), scale="max")


def test_identity_backward_passes_the_gradient_through() -> None:
    # BMVC 2017 Table 3's baseline: the square root is ignored in the backward pass.
    torch.manual_seed(0)
    x = torch.randn(3, 20, 6, dtype=torch.float64)
    A = (x.transpose(1, 2) @ x / 20).requires_grad_()
    upstream = torch.randn(3, 6, 6, dtype=torch.float64)
    upstream = upstream + upstream.transpose(1, 2)
    out = sqrtm(A, method="newton_schulz", iters=20, backward="identity")
    out.backward(upstream)
    assert torch.allclose(A.grad, upstream)
    exact = sqrtm(A.detach(), method="eigh")
    assert torch.allclose(out.detach(), exact, atol=1e-6)
