"""Matrix square root of batched symmetric PSD matrices, with a choice of forward and backward.

Forward methods:
    * ``newton_schulz``: the coupled Newton-Schulz iteration (batched matmuls only).
    * ``eigh``: exact, through ``torch.linalg.eigh`` with eigenvalues clamped at 0.
    * ``svd``: exact, through ``torch.linalg.svd`` (A = U S U^T for PSD A).

Backward methods (the gradient G_A of Z = A^(1/2) solves Z G_A + G_A Z = G_Z):
    * ``lyapunov_iterative``: the Newton-Schulz-like iteration of the talk on (Z, G_Z); matrix
      products only and nothing but Z saved for backward.
    * ``lyapunov_eig``: the exact solution in the eigenbasis, dividing by sqrt(l_i) + sqrt(l_j):
      stable with repeated eigenvalues.
    * ``autograd``: autograd through the unrolled Newton-Schulz iterations (stores every iterate).
    * ``svd``: the classical formula of Ionescu et al. with 1/(l_i - l_j), kept for comparison.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import torch
from annotated_types import Interval
from torch import Tensor

from bcnn.limits import problem
from bcnn.ops._utils import (
    add_to_diagonal_,
    autocast_disabled,
    check_square,
    frobenius_norm,
    from_spectrum,
    machine_eps,
    sandwich,
    sandwich_t,
    symmetrize,
    to_compute,
)

Method = Literal["auto", "newton_schulz", "eigh", "svd"]
Backward = Literal["auto", "lyapunov_iterative", "lyapunov_eig", "autograd", "svd", "identity"]
Scale = Literal["fro", "trace"]

# Newton-Schulz iterations: 0 only scales A (a published setting, BMVC 2017 Table 3).
Iters = Annotated[int, Interval(ge=0, le=1000)]

METHODS: tuple[str, ...] = get_args(Method)
BACKWARDS: tuple[str, ...] = get_args(Backward)
SCALES: tuple[str, ...] = get_args(Scale)


def check_args(func: str, **args: tuple[object, object]) -> None:
    """Raises ``ValueError`` naming ``func`` and the first argument that breaks its
    declaration; ``args`` maps a name to ``(value, annotation)``."""
    for name, (value, ann) in args.items():
        found = problem(value, ann)
        if found:
            raise ValueError(f"{func}: {name} {found}")


# What ``method="auto"`` / ``backward="auto"`` resolve to, per device type: a list of
# (largest d, method, backward), the first row with d <= largest d wins (the last row covers
# larger d). Chosen as the fastest forward+backward at iters=5 over batch 1/8/32.
#
# "cpu": measured on 2026-11-25 (UTC, `date -u`) with
#   `python scripts/bench_matrix_functions.py --device cpu --threads 1 --clock cpu
#   --repeats 3 --budget-s 0.3` on a 2-core AMD EPYC VM, torch 2.14.1 (results:
#   benchmarks/results/matrix_functions_cpu.{csv,md}). One thread and process CPU time
#   because the VM was shared with other jobs (load average 3 to 8), which made two-thread
#   wall times unusable. eigh + lyapunov_eig was the fastest route at every shape measured
#   (d = 64 to 1024, float32 and float64): a LAPACK eigh costs about 7 batched matmuls at
#   d = 512, five Newton-Schulz iterations plus the iterative backward 41 (d=512, batch 32,
#   float32: 1.29 s vs 4.95 s). d = 2048 was not measured: extrapolated. A two-thread spot
#   check on the idle VM (eigh ~ 7.6 matmuls at d = 512, batch 32) agrees.
# "cuda": expected, not yet measured on a GPU (no GPU was available when this table was
#   written). Batched GEMMs are what GPUs do best, while cuSOLVER eigh/SVD are slow for
#   batches of large matrices and check their error codes on the host (the paper: 4 ms for
#   five iterations vs 22 ms for an SVD at d=512 on a Titan X).
#   Other accelerators (mps, xpu, ...) use the "cuda" rows: Newton-Schulz needs only matmuls.
SQRTM_AUTO_TABLE: dict[str, list[tuple[int, str, str]]] = {
    "cpu": [(2048, "eigh", "lyapunov_eig")],
    "cuda": [(2048, "newton_schulz", "lyapunov_iterative")],
}

_DEFAULT_BACKWARD = {
    "newton_schulz": "lyapunov_iterative",
    "eigh": "lyapunov_eig",
    "svd": "lyapunov_eig",
}


def resolve_sqrtm(
    method: str = "auto", backward: str = "auto", device_type: str = "cpu", d: int = 512
) -> tuple[str, str]:
    """Resolve ``"auto"`` in the (method, backward) pair of :func:`sqrtm`.

    ``method="auto"`` looks up :data:`SQRTM_AUTO_TABLE` for the device type and matrix size
    (``backward="autograd"`` forces Newton-Schulz, the only method it can differentiate);
    ``backward="auto"`` is the table's backward when the method came from the table, else
    the stable default of the method (``lyapunov_iterative`` for Newton-Schulz,
    ``lyapunov_eig`` for eigh and svd).

    Args:
        method: One of :data:`METHODS`.
        backward: One of :data:`BACKWARDS`.
        device_type: ``tensor.device.type``.
        d: Matrix size.

    Returns:
        The concrete ``(method, backward)``.
    """
    check_args("sqrtm", method=(method, Method), backward=(backward, Backward))
    if method == "auto":
        if backward == "autograd":
            method = "newton_schulz"
        else:
            rows = SQRTM_AUTO_TABLE.get(device_type, SQRTM_AUTO_TABLE["cuda"])
            row = next((r for r in rows if d <= r[0]), rows[-1])
            method = row[1]
            if backward == "auto":
                backward = row[2]
    if backward == "auto":
        backward = _DEFAULT_BACKWARD[method]
    if backward == "autograd" and method != "newton_schulz":
        raise ValueError(
            "sqrtm: backward='autograd' differentiates the unrolled Newton-Schulz iterations; "
            f"with method={method!r} use backward='lyapunov_eig' (stable) or 'svd'"
        )
    return method, backward


def newton_schulz_matmuls(iters: int, return_inverse: bool = False) -> int:
    """Number of batched matmuls :func:`sqrtm` uses for ``iters`` Newton-Schulz iterations."""
    if iters == 0:
        return 0
    # The first iteration has Z0 = I (Z Y and T Z are free); the last skips T Z unless
    # the inverse root is wanted.
    return 1 + 3 * (iters - 1) - (0 if return_inverse or iters == 1 else 1)


def lyapunov_iterative_matmuls(iters: int) -> int:
    """Number of batched matmuls of the iterative Lyapunov backward with ``iters`` steps."""
    return max(6 * iters - 1, 0)


def _scale_of(A: Tensor, scale: str) -> Tensor:
    """Per-matrix normalisation c with ||I - A/c|| < 1 for PSD A, shape (..., 1, 1).

    Floored at machine epsilon: a larger c only shrinks the spectrum of A/c inside (0, 1], so
    the iteration still converges to A^(1/2) (more slowly), and the zero matrix gives
    finite values and gradients instead of 0/0.
    """
    if scale == "fro":
        return frobenius_norm(A)
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)
    return trace.clamp_min(machine_eps(A.dtype))[..., None, None]


def _newton_schulz(
    A: Tensor, iters: int, scale: str, want_inverse: bool
) -> tuple[Tensor, Tensor | None]:
    """Coupled Newton-Schulz: returns (A^(1/2), A^(-1/2) or None); differentiable."""
    c = _scale_of(A, scale)
    Y = A / c
    Z: Tensor | None = None  # None stands for the identity (Z0 = I)
    for k in range(iters):
        ZY = Y if Z is None else Z @ Y
        T = add_to_diagonal_(ZY * -0.5, 1.5)  # (3I - Z Y) / 2
        Y = Y @ T
        if want_inverse or k < iters - 1:
            Z = T if Z is None else T @ Z
    root_c = c.sqrt()
    Y = Y * root_c
    if not want_inverse:
        return Y, None
    if Z is None:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return Y, eye / root_c
    return Y, Z / root_c


def _lyapunov_newton_schulz(Z: Tensor, G: Tensor, iters: int) -> Tensor:
    """Solve Z X + X Z = G for symmetric PSD Z by the iteration of the talk (matmuls only).

    B0 = Z / s, C0 = G / s (s = ||Z||_F, so the spectrum of B0 lies in [0, 1]):
    C <- (C (3I - B^2) - B^T (B^T C - C B)) / 2,  B <- B (3I - B^2) / 2, and X = C / 2.
    B tends to sign(Z) = I and C to 2 X. No iterate is kept beyond the current one.
    """
    s = frobenius_norm(Z)
    B = Z / s
    C = G / s
    for k in range(iters):
        T = add_to_diagonal_((B @ B).mul_(-1.0), 3.0)  # 3I - B^2
        Bt = B.mT
        C = (C @ T - Bt @ (Bt @ C - C @ B)) * 0.5
        if k < iters - 1:
            B = (B @ T) * 0.5
    return C * 0.5


def _sqrt_spectrum(A: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Eigenvectors V and s = sqrt(max(l, 0)) of symmetric PSD A, A = V diag(s^2) V^T."""
    if method == "eigh":
        L, V = torch.linalg.eigh(A)
    else:
        # For PSD A the SVD is an eigendecomposition (U = V up to null-space signs).
        V, L, _ = torch.linalg.svd(A)
    return V, L.clamp_min(0).sqrt()


def _guard(s: Tensor) -> Tensor:
    """Smallest meaningful sqrt-eigenvalue, shape (..., 1, 1).

    Eigenvalues are accurate to ~eps * l_max, so their square roots below
    sqrt(eps) * s_max are rounding noise: dividing by them only amplifies noise. The
    machine-epsilon floor keeps the zero matrix finite.
    """
    eps = machine_eps(s.dtype)
    return (s.amax(-1) * eps**0.5).clamp_min(eps)[..., None, None]


def _pair_sum(s: Tensor) -> Tensor:
    """(s_i + s_j)_{ij}."""
    return s[..., :, None] + s[..., None, :]


class _SqrtmFunction(torch.autograd.Function):
    """Square root with a custom backward (every mode except ``autograd``)."""

    @staticmethod
    def forward(
        ctx,
        A: Tensor,
        method: str,
        backward: str,
        iters: int,
        backward_iters: int,
        scale: str,
        want_inverse: bool,
    ):
        V = s = None
        if method == "newton_schulz":
            Y, W = _newton_schulz(A, iters, scale, want_inverse)
        else:
            V, s = _sqrt_spectrum(A, method)
            Y = from_spectrum(V, s)
            W = (
                from_spectrum(V, 1.0 / torch.maximum(s, _guard(s)[..., 0]))
                if want_inverse
                else None
            )
        # Unused outputs (typically the inverse root) then arrive as None, not as zeros that
        # would cost matmuls in backward.
        ctx.set_materialize_grads(False)
        ctx.backward_mode = backward
        ctx.backward_iters = backward_iters
        ctx.want_inverse = want_inverse
        if backward == "lyapunov_iterative":
            ctx.save_for_backward(Y, W)
        elif backward == "identity":
            pass  # the gradient passes through unchanged: nothing to keep
        elif V is not None:
            ctx.decomposed = True
            ctx.save_for_backward(V, s)
        else:
            # Newton-Schulz forward with a spectral backward: decompose A in backward so
            # the forward stays matmul-only.
            ctx.decomposed = False
            ctx.save_for_backward(A)
        return (Y, W) if want_inverse else Y

    @staticmethod
    def backward(ctx, *grads: Tensor):
        gY = grads[0]
        gW = grads[1] if ctx.want_inverse else None
        if gY is None and gW is None:
            return (None,) * 7
        if gY is None:
            gY = torch.zeros_like(gW)
        with autocast_disabled(gY.device.type):
            if ctx.backward_mode == "identity":
                # BMVC 2017 Table 3's "ignore the square root in the backward" baseline.
                gA = symmetrize(gY if gW is None else gY + gW)
            elif ctx.backward_mode == "lyapunov_iterative":
                Y, W = ctx.saved_tensors
                G = gY
                if gW is not None:
                    # W = Z^-1, dW = -W dZ W: fold the inverse's gradient into Z's.
                    G = G - W @ gW @ W
                gA = _lyapunov_newton_schulz(Y, G, ctx.backward_iters)
            else:
                if ctx.decomposed:
                    V, s = ctx.saved_tensors
                else:
                    (A,) = ctx.saved_tensors
                    V, s = _sqrt_spectrum(
                        A, "eigh" if ctx.backward_mode == "lyapunov_eig" else "svd"
                    )
                gA = _spectral_backward(V, s, gY, gW, ctx.backward_mode)
        return gA, None, None, None, None, None, None


def _spectral_backward(V: Tensor, s: Tensor, gY: Tensor, gW: Tensor | None, mode: str) -> Tensor:
    """Gradient of A^(1/2) (and A^(-1/2)) in the eigenbasis V of A; s = sqrt(eigenvalues)."""
    guard = _guard(s)
    P = sandwich_t(V, symmetrize(gY))
    if gW is not None:
        s_safe = torch.maximum(s, guard[..., 0])
        P = P - sandwich_t(V, symmetrize(gW)) / (s_safe[..., :, None] * s_safe[..., None, :])
    if mode == "lyapunov_eig":
        return sandwich(V, P / _pair_sum(s).clamp_min(guard))
    # Ionescu et al.: dL/dA = V (K~ o (V^T dL/dV) + diag(dL/dl)) V^T with K~_ij = 1/(l_j - l_i)
    # and, for Z = V S V^T, V^T dL/dV = 2 P S and dL/dl_i = P_ii / (2 s_i). The differences
    # l_j - l_i lose all precision for close eigenvalues; exactly (or nearly) equal ones are
    # dropped (K~ = 0) so the result is finite but wrong on repeated eigenvalues.
    l = s * s
    diff = l[..., None, :] - l[..., :, None]
    tol = (l.amax(-1) * machine_eps(l.dtype))[..., None, None]
    valid = diff.abs() > tol
    K = torch.where(valid, 1.0 / torch.where(valid, diff, torch.ones_like(diff)), 0.0)
    M = K * (2.0 * P * s[..., None, :])
    M = symmetrize(M)
    diag = P.diagonal(dim1=-2, dim2=-1) / (2.0 * torch.maximum(s, guard[..., 0]))
    M = M + torch.diag_embed(diag)
    return sandwich(V, M)


def sqrtm(
    A: Tensor,
    method: Method = "auto",
    iters: Iters = 5,
    backward: Backward = "auto",
    scale: Scale = "fro",
    return_inverse: bool = False,
    *,
    backward_iters: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Square root of batched symmetric positive semi-definite matrices.

    The input is symmetrised, (A + A^T) / 2, so the result and its gradient are symmetric.
    Computed in float32 (float64 for float64 inputs) with autocast disabled; half and
    bfloat16 inputs are upcast to float32.

    Args:
        A: ``(..., d, d)`` symmetric PSD matrices, d from 2 to 2048.
        method: ``"newton_schulz"`` (coupled iteration, ``iters`` steps: approximate on
            purpose, 5 steps is the paper's choice; about 20 match an exact root on Gram
            matrices of CNN features), ``"eigh"`` (exact, eigenvalues clamped at 0),
            ``"svd"`` (exact) or ``"auto"`` (see :data:`SQRTM_AUTO_TABLE`; the choice, and
            therefore the value for Newton-Schulz vs exact, depends on the device type:
            pass an explicit method where results must not depend on the device).
        iters: Newton-Schulz iterations (ignored by eigh and svd).
        backward: ``"lyapunov_iterative"``, ``"lyapunov_eig"``, ``"autograd"`` (Newton-Schulz
            only), ``"svd"``, ``"identity"`` (passes the output gradient on unchanged, as if
            the square root were the identity: BMVC 2017's "ignore" baseline, not a
            gradient of the root) or ``"auto"`` (see :func:`resolve_sqrtm`).
        scale: Newton-Schulz normalisation c: ``"fro"`` (Frobenius norm, the authors' code)
            or ``"trace"`` (iSQRT-COV).
        return_inverse: Also return A^(-1/2) (Newton-Schulz: Z / sqrt(c); spectral methods:
            eigenvalues floored at (sqrt(eps) s_max)^2). Only meaningful for positive
            definite A: for singular A it is large (but finite).
        backward_iters: Steps of the ``lyapunov_iterative`` backward; defaults to ``iters``.

    Returns:
        ``(..., d, d)`` A^(1/2), or the tuple (A^(1/2), A^(-1/2)) when ``return_inverse``;
        float32, or float64 for float64 input.
    """
    d = check_square(A, "sqrtm")
    backward_iters = iters if backward_iters is None else backward_iters
    check_args(
        "sqrtm", scale=(scale, Scale), iters=(iters, Iters), backward_iters=(backward_iters, Iters)
    )
    method, backward = resolve_sqrtm(method, backward, A.device.type, d)
    with autocast_disabled(A.device.type):
        A = symmetrize(to_compute(A))
        if backward == "autograd":
            Y, W = _newton_schulz(A, iters, scale, return_inverse)
            return (Y, W) if return_inverse else Y
        return _SqrtmFunction.apply(
            A, method, backward, iters, backward_iters, scale, return_inverse
        )
