"""An exportable copy of a trained model: the same function, in operations graphs can hold.

TorchScript (tracing) cannot save the Python autograd Functions of ``bcnn.ops`` (the
guarded signed power, the custom-backward square root), the ONNX exporter rejects the
in-place diagonal updates of the Newton-Schulz iteration, and ONNX has no
eigendecomposition. Inference needs none of these: the gradients are not used, and the
matrix functions can all be written with matrix products. ``exportable(model)`` returns a
deep copy of the model whose normalization steps are replaced by such versions:

==========================================  ==================================================
eager step                                  exported as
==========================================  ==================================================
``SignedPower`` / ``SignedSqrt``            the same formula, plain tensor operations
``MatrixSqrt(method=newton_schulz)``        the same coupled Newton-Schulz, same iterations
``MatrixSqrt(method=eigh|svd|auto)``        Newton-Schulz with ``exact_iterations`` (a note)
``MatrixPower(p=0.5)``                      as ``MatrixSqrt``, by its ``method``
``MatrixPower(p != 0.5)`` (eigh)            exp(p log A): Newton-Schulz log, scaled Taylor exp
``MatrixLog`` (eigh or iterative)           log A = 2^k log(A^(1/2^k)): k Newton-Schulz roots
                                            and a Gregory (atanh) series
==========================================  ==================================================

Everything else (backbones, poolings, vectorize, L2, classifiers) exports as it is. Every
replacement computes in float32 (float64 for float64 input), like the eager steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bcnn.models import BilinearModel
from bcnn.models.normalization import (
    MatrixLog,
    MatrixPower,
    MatrixSqrt,
    MatrixStep,
    SignedPower,
    Step,
    Vectorize,
    add_ridge,
)
from bcnn.ops import TensorSketch, resolve_sqrtm
from bcnn.ops._utils import compute_dtype

# Newton-Schulz multiplies the distance of an eigenvalue l << 1 of A / ||A||_F from
# convergence by about 2.25 per iteration, then converges quadratically: an eigenvalue
# ratio r needs about log(1 / r) / log(2.25) iterations plus a few. float32 resolves
# eigenvalues only down to ~eps * l_max (an exact eigh is no more accurate below), so
# ratios beyond 1 / eps need no more iterations.
_GROWTH = math.log(2.25)
_QUADRATIC_STEPS = 6
# The logarithm is log(A) = 2^k log(A^(1/2^k)), with the Gregory series
# log(R) = 2 atanh(Z) = 2 (Z + Z^3/3 + Z^5/5 + ...), Z = (R - I)(R + I)^-1. After k = 3
# roots an eigenvalue ratio of 1e-7 (the float32 floor) is 0.13, |z| = 0.77, where 18 odd
# terms leave 4e-8 (times 2^k). Few roots matter more than few terms: every root's
# rounding error is multiplied by 2^k (6 roots with a Mercator series were 4x less
# accurate in float32, measured on 64 x 64 Gram matrices).
LOG_ROOTS = 3
LOG_TERMS = 18
# Newton's iteration for (R + I)^-1 from I / 2: R + I has eigenvalues in (1, 2], so the
# residual starts below 1/2 and squares each step.
INVERSE_ITERS = 6
# exp(p log A) by Taylor on M / 2^s, then s squarings: the eigenvalues of p log(A / c)
# that float32 resolves lie within [-16, 0], and 2^5 brings them into [-0.5, 0], where 10
# terms are exact to float32.
EXP_SQUARINGS = 5
EXP_TERMS = 10


def exact_iterations(d: int, eps: float, eps_mode: str, dtype: torch.dtype = torch.float32) -> int:
    """Newton-Schulz iterations that stand in for an exact root of a ridged (d, d) matrix.

    With ``eps_mode="trace"`` the smallest eigenvalue of A + eps tr(A)/d I is at least
    eps / d times its Frobenius norm; otherwise (or eps = 0) nothing bounds it, and the
    precision of ``dtype`` sets the ratio that matters.

    Args:
        d: Matrix size.
        eps: The step's ridge.
        eps_mode: ``"trace"`` or ``"abs"``.
        dtype: Compute dtype.

    Returns:
        ceil(log(1 / r) / log(2.25)) + 6 for the smallest relevant eigenvalue ratio r.
    """
    floor = torch.finfo(dtype).eps
    ratio = max(eps / d, floor) if eps_mode == "trace" and eps > 0 else floor
    return math.ceil(math.log(1.0 / ratio) / _GROWTH) + _QUADRATIC_STEPS


def _t(a: Tensor) -> Tensor:
    return a.transpose(-2, -1)  # not .mT: the TorchScript-based ONNX exporter lacks aten::mT


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def newton_schulz_sqrt(a: Tensor, iters: int, scale: str = "fro") -> Tensor:
    """A^(1/2) by the coupled Newton-Schulz iteration, without in-place updates.

    The iteration of ``bcnn.ops.sqrtm(method="newton_schulz")`` (same scaling, same
    iterates), written for tracing and export.

    Args:
        a: (B, d, d) symmetric PSD, float32 or float64.
        iters: Iterations.
        scale: ``"fro"`` or ``"trace"`` normalization.

    Returns:
        (B, d, d).
    """
    a = (a + _t(a)) * 0.5
    tiny = torch.finfo(a.dtype).eps
    if scale == "fro":
        c = (a * a).sum((-2, -1), keepdim=True).clamp_min(tiny * tiny).sqrt()
    else:
        c = a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)[..., None, None]
    eye = _eye_like(a)
    y = a / c
    z: Tensor | None = None
    for k in range(iters):
        zy = y if z is None else z @ y
        t = eye * 1.5 - zy * 0.5
        y = y @ t
        if k < iters - 1:
            z = t if z is None else t @ z
    return y * c.sqrt()


def newton_schulz_log(
    a: Tensor, iters: int, roots: int = LOG_ROOTS, terms: int = LOG_TERMS
) -> Tensor:
    """log(A) = log(c) I + 2^k log((A / c)^(1/2^k)): Newton-Schulz roots, a Gregory series.

    Args:
        a: (B, d, d) symmetric positive definite.
        iters: Newton-Schulz iterations per root.
        roots: k.
        terms: Odd terms of the series 2 atanh(Z).

    Returns:
        (B, d, d).
    """
    a = (a + _t(a)) * 0.5
    tiny = torch.finfo(a.dtype).eps
    c = (a * a).sum((-2, -1), keepdim=True).clamp_min(tiny * tiny).sqrt()
    r = a / c
    for _ in range(roots):
        r = newton_schulz_sqrt(r, iters)
    eye = _eye_like(a)
    shifted = r + eye
    inverse = eye * 0.5
    for _ in range(INVERSE_ITERS):
        inverse = inverse @ (eye * 2.0 - shifted @ inverse)
    z = (r - eye) @ inverse
    z2 = z @ z
    acc = eye / (2 * terms - 1)
    for j in range(terms - 1, 0, -1):
        acc = eye / (2 * j - 1) + z2 @ acc
    return (z @ acc) * float(2 ** (roots + 1)) + torch.log(c) * eye


def newton_schulz_power(a: Tensor, p: float, iters: int) -> Tensor:
    """A^p = c^p exp(p log(A / c)) with a Newton-Schulz log and a scaled Taylor exp.

    Args:
        a: (B, d, d) symmetric positive definite.
        p: Exponent.
        iters: Newton-Schulz iterations per root of the logarithm.

    Returns:
        (B, d, d).
    """
    tiny = torch.finfo(a.dtype).eps
    c = (a * a).sum((-2, -1), keepdim=True).clamp_min(tiny * tiny).sqrt()
    m = newton_schulz_log(a / c, iters) * (p / 2**EXP_SQUARINGS)
    eye = _eye_like(a)
    e = eye + m / EXP_TERMS
    for j in range(EXP_TERMS - 1, 0, -1):
        e = eye + (m @ e) / j
    for _ in range(EXP_SQUARINGS):
        e = e @ e
    return e * c**p


class ExportTensorSketch(nn.Module):
    """``TensorSketch`` without the FFT: the same sketch as a scatter of the pooled matrix.

    The Tensor Sketch of M = (1/n) sum_i x_i y_i^T is sum_{a,b} s1(a) s2(b) M_ab
    e_{(h1(a) + h2(b)) mod D} (the circular convolution of the two count sketches that the
    eager module computes through ``torch.fft``). Exported FFTs run as plain DFTs in
    onnxruntime, about 1e-3 off in float32; this form is exact up to summation order.

    Args:
        sketch: The trained module (its hashes and signs are copied).
    """

    index: Tensor
    sign: Tensor

    def __init__(self, sketch: TensorSketch) -> None:
        super().__init__()
        self.in_dim, self.in_dim2, self.out_dim = sketch.in_dim, sketch.in_dim2, sketch.out_dim
        index = (sketch.h1[:, None] + sketch.h2[None, :]) % sketch.out_dim
        self.register_buffer("index", index.flatten())
        self.register_buffer("sign", (sketch.s1[:, None] * sketch.s2[None, :]).flatten())

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, n, C) (and (B, n, C2)) -> (B, D), float32 (float64 for float64 input)."""
        y = x if y is None else y
        dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
        x, y = x.to(dtype), y.to(dtype)
        pooled = (_t(x) @ y / x.shape[-2]).flatten(-2) * self.sign.to(dtype)
        out = pooled.new_zeros(pooled.shape[0], self.out_dim)
        # scatter_add, not index_add: the ONNX exporter maps it to ScatterElements(add).
        return out.scatter_add(1, self.index.expand(pooled.shape[0], -1), pooled)


class ExportVectorize(Step):
    """``Vectorize(triu=True)`` with its indices and scale as buffers (no ``triu_indices``).

    Args:
        d: Matrix size.
    """

    phase = "vectorize"
    index: Tensor
    scale: Tensor

    def __init__(self, d: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(d, d)
        self.register_buffer("index", rows * d + cols)
        self.register_buffer("scale", torch.where(rows == cols, 1.0, math.sqrt(2.0)))

    def forward(self, a: Tensor) -> Tensor:
        """(B, d, d) -> (B, d(d+1)/2)."""
        return a.flatten(1).index_select(1, self.index) * self.scale.to(a.dtype)


class ExportSignedPower(Step):
    """``SignedPower`` without its custom backward: sign(z) ((|z| + eps)^p - eps^p)."""

    def __init__(self, p: float, eps: float) -> None:
        super().__init__()
        self.p, self.eps = float(p), float(eps)

    def forward(self, z: Tensor) -> Tensor:
        """Any shape -> same shape."""
        return torch.sign(z) * ((z.abs() + self.eps).pow(self.p) - self.eps**self.p)


class ExportMatrixFunction(MatrixStep):
    """A matrix step as products only: ``sqrt``, ``log`` or ``power`` of A + ridge.

    Args:
        kind: ``"sqrt"``, ``"log"`` or ``"power"``.
        iters: Newton-Schulz iterations (per root for log and power).
        eps: The eager step's ridge.
        eps_mode: Its ridge mode.
        p: Exponent (``power``).
        scale: Newton-Schulz scaling (``sqrt``).
        floor: Added to the diagonal before a logarithm (the eager eigenvalue floor).
    """

    def __init__(
        self,
        kind: str,
        iters: int,
        eps: float,
        eps_mode: str,
        p: float = 0.5,
        scale: str = "fro",
        floor: float = 0.0,
    ) -> None:
        super().__init__(eps, eps_mode)
        self.kind, self.iters, self.p, self.scale, self.floor = kind, int(iters), p, scale, floor

    def forward(self, a: Tensor) -> Tensor:
        """(B, d, d) -> (B, d, d), float32 (float64 for float64 input)."""
        a = a if a.dtype == torch.float64 else a.float()
        a = add_ridge(a, self.eps, self.eps_mode)
        if self.kind == "sqrt":
            return newton_schulz_sqrt(a, self.iters, self.scale)
        if self.floor > 0:
            a = a + self.floor * _eye_like(a)
        if self.kind == "log":
            return newton_schulz_log(a, self.iters)
        return newton_schulz_power(a, self.p, self.iters)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, iters={self.iters}, p={self.p}, " + super().extra_repr()


@dataclass
class ExportPlan:
    """What ``exportable`` replaced: one line per changed step, for the log and model card."""

    notes: list[str] = field(default_factory=list)


def _replacement(name: str, step: Step, d: int, device_type: str) -> tuple[Step, str | None]:
    """The exportable version of one normalization step and a note when it approximates."""
    if isinstance(step, SignedPower):
        return ExportSignedPower(step.p, step.eps), None
    if isinstance(step, Vectorize) and step.triu:
        return ExportVectorize(d), None
    if not isinstance(step, MatrixStep):
        return step, None
    exact = exact_iterations(d, step.eps, step.eps_mode)
    where = f"normalization.{name}"
    if isinstance(step, (MatrixSqrt, MatrixPower)) and (
        isinstance(step, MatrixSqrt) or step.p == 0.5
    ):
        method, _ = resolve_sqrtm(step.method, "auto", device_type, d)
        scale = getattr(step, "scale", "fro")
        if method == "newton_schulz":
            return ExportMatrixFunction(
                "sqrt", step.iters, step.eps, step.eps_mode, scale=scale
            ), None
        note = (
            f"{where}: the exact matrix square root ({method}) is exported as {exact} "
            "Newton-Schulz iterations (matrix products only)"
        )
        return ExportMatrixFunction("sqrt", exact, step.eps, step.eps_mode, scale=scale), note
    if isinstance(step, MatrixPower):
        note = (
            f"{where}: the matrix power p={step.p} (eigendecomposition) is exported as "
            f"exp(p log A), the log by {LOG_ROOTS} Newton-Schulz roots of {exact} iterations"
        )
        return (
            ExportMatrixFunction(
                "power", exact, step.eps, step.eps_mode, p=step.p, floor=step.floor
            ),
            note,
        )
    if isinstance(step, MatrixLog):
        note = (
            f"{where}: the matrix logarithm ({step.method}) is exported as {LOG_ROOTS} "
            f"Newton-Schulz roots of {exact} iterations and a {LOG_TERMS}-term atanh series"
        )
        return (
            ExportMatrixFunction("log", exact, step.eps, step.eps_mode, floor=step.floor),
            note,
        )
    raise ValueError(
        f"{where}: {type(step).__name__} has no exportable form; export supports the steps "
        "MatrixSqrt, MatrixPower, MatrixLog, Vectorize, SignedPower/SignedSqrt and L2Normalize"
    )


def exportable(model: BilinearModel) -> tuple[BilinearModel, ExportPlan]:
    """A copy of ``model`` in eval mode whose every step traces and exports.

    Args:
        model: A trained model (left unchanged).

    Returns:
        The copy and the notes on steps computed differently (exact -> Newton-Schulz).

    Raises:
        ValueError: a normalization step with no exportable form, naming its key.
    """
    plan = ExportPlan()
    copied = copy.deepcopy(model).eval()
    shape = copied.pooling.output_shape
    device_type = next(copied.parameters()).device.type
    steps = copied.normalization.steps
    for name in list(steps.keys()):
        step = steps[name]
        d = shape.dims[-1]
        new, note = _replacement(name, step, d, device_type)
        steps[name] = new
        if note:
            plan.notes.append(note)
        shape = step.output_shape(shape)
    sketch = getattr(copied.pooling, "sketch", None)
    if isinstance(sketch, TensorSketch):
        copied.pooling.sketch = ExportTensorSketch(sketch)
    return copied, plan


__all__ = [
    "ExportMatrixFunction",
    "ExportPlan",
    "ExportSignedPower",
    "ExportTensorSketch",
    "ExportVectorize",
    "exact_iterations",
    "exportable",
    "newton_schulz_log",
    "newton_schulz_power",
    "newton_schulz_sqrt",
]
