"""Matrix square root of batched symmetric PSD matrices, with a choice of forward and backward.

Forwards: coupled Newton-Schulz (matmuls only), ``eigh`` or ``svd`` (exact). Backwards solve
Z G_A + G_A Z = G_Z for Z = A^(1/2): iteratively (``lyapunov_iterative``), in the eigenbasis
(``lyapunov_eig``), by autograd through the iterations, or by Ionescu et al.'s ``svd``
formula. The methods, backwards and the ``auto`` table are described in ``docs/ops.md``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from annotated_types import Interval
from torch import Tensor

from bcnn.ops._utils import (
    add_to_diagonal_,
    autocast_disabled,
    check_args,
    check_square,
    frobenius_norm,
    from_spectrum,
    symmetrize,
    to_compute,
)

Method = Literal["auto", "newton_schulz", "eigh", "svd"]
Backward = Literal["auto", "lyapunov_iterative", "lyapunov_eig", "autograd", "svd", "identity"]
Scale = Literal["fro", "trace"]

# Newton-Schulz iterations: 0 only scales A (a published setting, BMVC 2017 Table 3).
Iters = Annotated[int, Interval(ge=0, le=1000)]

# What ``method="auto"`` / ``backward="auto"`` resolve to per device type: rows
# (largest d, method, backward); the first row with d <= largest d wins, the last covers
# larger d. The fastest forward+backward at iters=5 over batch 1/8/32.
# "cpu": measured 2026-11-25 (UTC) with `python scripts/bench_matrix_functions.py --device
#   cpu --threads 1 --clock cpu --repeats 3 --budget-s 0.3` on the project's 2-core AMD EPYC
#   VM, torch 2.14.1 (benchmarks/results/matrix_functions_cpu.{csv,md}); one-thread process
#   CPU time, as the shared VM made wall times unusable. eigh + lyapunov_eig won at every
#   shape (d = 64 to 1024, float32 and float64): a LAPACK eigh costs ~7 batched matmuls at
#   d = 512, five Newton-Schulz iterations plus the iterative backward 41 (d = 512, batch 32,
#   float32: 1.29 s vs 4.95 s). d = 2048 is extrapolated.
# "cuda": expected, not measured (no GPU yet): GPUs excel at batched GEMMs, cuSOLVER eigh/SVD
#   are slow on batches of large matrices (the paper: 4 ms for five iterations vs 22 ms for
#   an SVD at d=512 on a Titan X). Other accelerators (mps, xpu, ...) use the "cuda" rows.
SQRTM_AUTO_TABLE: dict[str, list[tuple[int, Method, Backward]]] = {
    "cpu": [(2048, "eigh", "lyapunov_eig")],
    "cuda": [(2048, "newton_schulz", "lyapunov_iterative")],
}


@check_args
def resolve_sqrtm(
    method: Method = "auto", backward: Backward = "auto", device_type: str = "cpu", d: int = 512
) -> tuple[Method, Backward]:
    """Resolve ``"auto"`` in the (method, backward) pair of :func:`sqrtm` (see docs/ops.md).

    Args:
        method: A :data:`Method`; ``auto`` reads :data:`SQRTM_AUTO_TABLE` (Newton-Schulz
            when ``backward="autograd"``).
        backward: A :data:`Backward`; ``auto`` is the table's when the method came from
            it, else the method's stable default.
        device_type: ``tensor.device.type``.
        d: Matrix size.

    Returns:
        The concrete ``(method, backward)``.
    """
    if method == "auto":
        if backward == "autograd":
            method = "newton_schulz"
        else:
            rows = SQRTM_AUTO_TABLE.get(device_type, SQRTM_AUTO_TABLE["cuda"])
            row = next((r for r in rows if d <= r[0]), rows[-1])
            method = row[1]
            if backward == "auto":
                backward = row[2]
    if backward == "auto":  # the stable default of the method
        backward = "lyapunov_iterative" if method == "newton_schulz" else "lyapunov_eig"
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


def _newton_schulz(
    A: Tensor, iters: int, scale: str, want_inverse: bool
) -> tuple[Tensor, Tensor | None]:
    """Coupled Newton-Schulz: returns (A^(1/2), A^(-1/2) or None); differentiable."""
    # c with ||I - A/c|| < 1, floored at machine eps: a larger c only shrinks the spectrum
    # inside (0, 1] (same limit, slower), and the zero matrix stays finite instead of 0/0.
    if scale == "fro":
        c = frobenius_norm(A)
    else:
        trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)
        c = trace.clamp_min(torch.finfo(A.dtype).eps)[..., None, None]
    Y = A / c
    Z: Tensor | None = None  # None stands for the identity (Z0 = I)
    for k in range(iters):
        ZY = Y if Z is None else Z @ Y
        T = add_to_diagonal_(ZY * -0.5, 1.5)  # (3I - Z Y) / 2
        Y = Y @ T
        if want_inverse or k < iters - 1:
            Z = T if Z is None else T @ Z
    if want_inverse and Z is None:  # iters = 0
        Z = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    root_c = c.sqrt()
    return Y * root_c, Z / root_c if want_inverse and Z is not None else None


def _lyapunov_newton_schulz(Z: Tensor, G: Tensor, iters: int) -> Tensor:
    """Solve Z X + X Z = G for symmetric PSD Z by the iteration of the talk (matmuls only).

    B0 = Z / ||Z||_F (spectrum in [0, 1]), C0 = G / ||Z||_F; B tends to sign(Z) = I and C to
    2 X. No iterate is kept beyond the current one.
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


def _sqrt_spectrum(A: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvectors V, s = sqrt(max(l, 0)) and the guard of s (..., 1, 1) of PSD A.

    The guard is the smallest meaningful s: eigenvalues are accurate to ~eps l_max, so s
    below sqrt(eps) s_max is rounding noise that division would amplify; the eps floor keeps
    the zero matrix finite.
    """
    if method == "eigh":
        L, V = torch.linalg.eigh(A)
    else:
        # For PSD A the SVD is an eigendecomposition (U = V up to null-space signs).
        V, L, _ = torch.linalg.svd(A)
    s = L.clamp_min(0).sqrt()
    eps = torch.finfo(s.dtype).eps
    return V, s, (s.amax(-1) * eps**0.5).clamp_min(eps)[..., None, None]


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
        saved: tuple[Tensor | None, ...]
        if method == "newton_schulz":
            Y, W = _newton_schulz(A, iters, scale, want_inverse)
            saved = (Y, W) if backward == "lyapunov_iterative" else (A,)
        else:
            V, s, guard = _sqrt_spectrum(A, method)
            Y = from_spectrum(V, s)
            W = from_spectrum(V, 1.0 / torch.maximum(s, guard[..., 0])) if want_inverse else None
            saved = (Y, W) if backward == "lyapunov_iterative" else (V, s, guard)
        # Unused outputs (typically the inverse root) then arrive as None, not as zeros that
        # would cost matmuls in backward.
        ctx.set_materialize_grads(False)
        ctx.backward_mode, ctx.backward_iters = backward, backward_iters
        ctx.want_inverse = want_inverse
        # Newton-Schulz with a spectral backward saves A and decomposes it in backward, so
        # the forward stays matmul-only; the identity backward needs nothing.
        if backward != "identity":
            ctx.save_for_backward(*saved)
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
                if gW is not None:
                    # W = Z^-1, dW = -W dZ W: fold the inverse's gradient into Z's.
                    gY = gY - W @ gW @ W
                gA = _lyapunov_newton_schulz(Y, gY, ctx.backward_iters)
            else:
                if len(ctx.saved_tensors) == 1:
                    mode = "eigh" if ctx.backward_mode == "lyapunov_eig" else "svd"
                    V, s, guard = _sqrt_spectrum(ctx.saved_tensors[0], mode)
                else:
                    V, s, guard = ctx.saved_tensors
                gA = _spectral_backward(V, s, guard, gY, gW, ctx.backward_mode)
        return gA, None, None, None, None, None, None


def _spectral_backward(
    V: Tensor, s: Tensor, guard: Tensor, gY: Tensor, gW: Tensor | None, mode: str
) -> Tensor:
    """Gradient of A^(1/2) (and A^(-1/2)) in the eigenbasis V of A; s = sqrt(eigenvalues)."""
    P = V.mT @ symmetrize(gY) @ V
    if gW is not None:
        s_safe = torch.maximum(s, guard[..., 0])
        P = P - V.mT @ symmetrize(gW) @ V / (s_safe[..., :, None] * s_safe[..., None, :])
    if mode == "lyapunov_eig":
        return V @ (P / (s[..., :, None] + s[..., None, :]).clamp_min(guard)) @ V.mT
    # Ionescu et al.: dL/dA = V (K~ o (V^T dL/dV) + diag(dL/dl)) V^T with K~_ij = 1/(l_j - l_i)
    # and, for Z = V S V^T, V^T dL/dV = 2 P S and dL/dl_i = P_ii / (2 s_i). The differences
    # l_j - l_i lose all precision for close eigenvalues; exactly (or nearly) equal ones are
    # dropped (K~ = 0) so the result is finite but wrong on repeated eigenvalues.
    l = s * s
    diff = l[..., None, :] - l[..., :, None]
    tol = (l.amax(-1) * torch.finfo(l.dtype).eps)[..., None, None]
    valid = diff.abs() > tol
    K = torch.where(valid, 1.0 / torch.where(valid, diff, torch.ones_like(diff)), 0.0)
    M = symmetrize(K * (2.0 * P * s[..., None, :]))
    diag = P.diagonal(dim1=-2, dim2=-1) / (2.0 * torch.maximum(s, guard[..., 0]))
    return V @ (M + torch.diag_embed(diag)) @ V.mT


@check_args
def sqrtm(
    A: Tensor,
    method: Method = "auto",
    iters: Iters = 5,
    backward: Backward = "auto",
    scale: Scale = "fro",
    return_inverse: bool = False,
    *,
    backward_iters: Iters | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Square root of batched symmetric PSD matrices (symmetrised first); see docs/ops.md.

    Args:
        A: ``(..., d, d)`` symmetric PSD matrices, d from 2 to 2048.
        method: ``newton_schulz`` (``iters`` coupled iterations: approximate on purpose),
            ``eigh``, ``svd`` or ``auto`` (:data:`SQRTM_AUTO_TABLE`: the value then depends
            on the device type).
        iters: Newton-Schulz iterations (ignored by eigh and svd).
        backward: ``lyapunov_iterative``, ``lyapunov_eig``, ``autograd`` (Newton-Schulz
            only), ``svd``, ``identity`` (the output gradient passed on unchanged) or
            ``auto`` (:func:`resolve_sqrtm`).
        scale: Newton-Schulz normalisation: ``fro`` (authors' code) or ``trace`` (iSQRT-COV).
        return_inverse: Also return A^(-1/2); large (but finite) for singular A.
        backward_iters: Steps of the ``lyapunov_iterative`` backward; defaults to ``iters``.

    Returns:
        ``(..., d, d)`` A^(1/2), or the tuple (A^(1/2), A^(-1/2)) when ``return_inverse``;
        float32 (float64 for float64 input), autocast disabled.
    """
    d = check_square(A, "sqrtm")
    backward_iters = iters if backward_iters is None else backward_iters
    method, backward = resolve_sqrtm(method, backward, A.device.type, d)
    with autocast_disabled(A.device.type):
        A = symmetrize(to_compute(A))
        if backward == "autograd":
            Y, W = _newton_schulz(A, iters, scale, return_inverse)
            return Y if W is None else (Y, W)
        return _SqrtmFunction.apply(
            A, method, backward, iters, backward_iters, scale, return_inverse
        )
