"""An exportable copy of a trained model: the same function, in operations graphs can hold.

Tracing cannot save ``bcnn.ops``' autograd Functions, the ONNX exporter rejects in-place
diagonal updates, and ONNX has no eigendecomposition: ``exportable(model)`` writes each
step with plain tensor operations and matrix products, in the eager steps' compute dtype
(the table of replacements is in docs/deploy.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from bcnn.models import BilinearModel
from bcnn.models.normalization import (
    L2Normalize,
    MatrixLog,
    MatrixPower,
    MatrixSqrt,
    MatrixStep,
    SignedPower,
    Step,
    Vectorize,
)
from bcnn.models.shapes import FeatureShape
from bcnn.ops import TensorSketch, resolve_sqrtm
from bcnn.ops._utils import frobenius_norm

# Newton-Schulz brings an eigenvalue l << 1 of A / ||A||_F closer by a factor ~2.25 per
# iteration, then converges quadratically. float32 resolves eigenvalues only down to
# ~eps * l_max (an exact eigh no better), so ratios beyond 1 / eps need no more iterations.
_GROWTH = math.log(2.25)
_QUADRATIC_STEPS = 6
# log(A) = 2^k log(A^(1/2^k)) and log(R) = 2 atanh(Z) = 2 (Z + Z^3/3 + ...), Z = (R - I)
# (R + I)^-1: after k = 3 roots the float32 floor ratio 1e-7 is 0.13, |z| = 0.77, where 18
# odd terms leave 4e-8 (times 2^k). Each root's rounding error is multiplied by 2^k: 6
# roots with a Mercator series were 4x less accurate (float32, 64 x 64 Gram matrices).
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
    """Newton-Schulz iterations that stand in for an exact root of a ridged (d, d) matrix:
    ceil(log(1 / r) / log(2.25)) + 6 for the smallest eigenvalue ratio r that matters.

    With ``eps_mode="trace"`` (and eps > 0) the ridge eps tr(A)/d I bounds r below by
    eps / d; otherwise only the precision of the compute ``dtype`` does.
    """
    floor = torch.finfo(dtype).eps
    ratio = max(eps / d, floor) if eps_mode == "trace" and eps > 0 else floor
    return math.ceil(math.log(1.0 / ratio) / _GROWTH) + _QUADRATIC_STEPS


def _t(a: Tensor) -> Tensor:
    return a.transpose(-2, -1)  # not .mT: the TorchScript-based ONNX exporter lacks aten::mT


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def newton_schulz_sqrt(a: Tensor, iters: int, scale: str = "fro") -> Tensor:
    """A^(1/2): the iterates of ``bcnn.ops.sqrtm(method="newton_schulz")``, not in place.

    Args:
        a: (B, d, d) symmetric PSD, float32 or float64.
        iters: Iterations.
        scale: ``"fro"`` or ``"trace"`` normalization.

    Returns:
        (B, d, d).
    """
    a = (a + _t(a)) * 0.5
    if scale == "fro":
        c = frobenius_norm(a)
    else:
        trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)
        c = trace.clamp_min(torch.finfo(a.dtype).eps)[..., None, None]
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


def newton_schulz_log(a: Tensor, iters: int) -> Tensor:
    """log(A) = log(c) I + 2^k log((A / c)^(1/2^k)): Newton-Schulz roots, a Gregory series.

    Args:
        a: (B, d, d) symmetric positive definite.
        iters: Newton-Schulz iterations per root.

    Returns:
        (B, d, d).
    """
    a = (a + _t(a)) * 0.5
    c = frobenius_norm(a)
    r = a / c
    for _ in range(LOG_ROOTS):
        r = newton_schulz_sqrt(r, iters)
    eye = _eye_like(a)
    shifted = r + eye
    inverse = eye * 0.5
    for _ in range(INVERSE_ITERS):
        inverse = inverse @ (eye * 2.0 - shifted @ inverse)
    z = (r - eye) @ inverse
    z2 = z @ z
    acc = eye / (2 * LOG_TERMS - 1)
    for j in range(LOG_TERMS - 1, 0, -1):
        acc = eye / (2 * j - 1) + z2 @ acc
    return (z @ acc) * float(2 ** (LOG_ROOTS + 1)) + torch.log(c) * eye


def newton_schulz_power(a: Tensor, p: float, iters: int) -> Tensor:
    """A^p = c^p exp(p log(A / c)) with a Newton-Schulz log and a scaled Taylor exp.

    Args:
        a: (B, d, d) symmetric positive definite.
        p: Exponent.
        iters: Newton-Schulz iterations per root of the logarithm.

    Returns:
        (B, d, d).
    """
    c = frobenius_norm(a)
    m = newton_schulz_log(a / c, iters) * (p / 2**EXP_SQUARINGS)
    eye = _eye_like(a)
    e = eye + m / EXP_TERMS
    for j in range(EXP_TERMS - 1, 0, -1):
        e = eye + (m @ e) / j
    for _ in range(EXP_SQUARINGS):
        e = e @ e
    return e * c**p


class ExportVectorize(Step):
    """``Vectorize(triu=True)`` of (d, d) matrices with buffers, no ``triu_indices`` (which
    the ONNX exporter lacks)."""

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


class ExportStep(Step):
    """A step of plain tensor operations, e.g. ``partial(signed_power, p=0.5, eps=1e-8)``."""

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = function

    def forward(self, z: Tensor) -> Tensor:
        """(B, ...) -> (B, ...)."""
        return self.fn(z)

    def extra_repr(self) -> str:
        return repr(self.fn)


def signed_power(z: Tensor, p: float, eps: float) -> Tensor:
    """sign(z) ((|z| + eps)^p - eps^p): ``SignedPower`` without its autograd Function (which
    TorchScript cannot save)."""
    return torch.sign(z) * ((z.abs() + eps).pow(p) - eps**p)


def l2_normalize(z: Tensor, eps: float, blocks: int, pad: int) -> Tensor:
    """``L2Normalize`` of (B, ...) whose sum of squares adds ``blocks`` sums of the padded
    (B, D): onnxruntime sums float32 values one after another, 4e-5 off over a 512-channel
    descriptor (docs/deploy.md); sums of about sqrt(D) values are as accurate as torch's."""
    flat = z.flatten(1)
    squares = F.pad(flat * flat, (0, pad)).unflatten(1, (blocks, -1))
    norm = squares.sum(-1).sum(-1, keepdim=True).sqrt().clamp_min(eps)
    return (flat / norm).view_as(z)


class ExportMatrixFunction(MatrixStep):
    """A matrix step as products only: ``function`` of A + ridge (``eps``, ``eps_mode``) +
    ``floor`` I (the eager eigenvalue floor of a logarithm or power).

    Args:
        function: (B, d, d) -> (B, d, d), e.g. ``partial(newton_schulz_sqrt, iters=23)``.
    """

    def __init__(
        self, function: Callable[[Tensor], Tensor], eps: float, eps_mode: str, floor: float = 0.0
    ) -> None:
        super().__init__(eps, eps_mode)
        self.fn, self.floor = function, floor

    def function(self, a: Tensor) -> Tensor:
        return self.fn(a + self.floor * _eye_like(a) if self.floor > 0 else a)

    def extra_repr(self) -> str:
        return f"{self.fn!r}, floor={self.floor}, " + super().extra_repr()


def _replacement(
    name: str, step: Step, shape: FeatureShape, device_type: str
) -> tuple[Step, str | None]:
    """The exportable version of one normalization step and a note when it approximates."""
    d = shape.dims[-1]
    if isinstance(step, L2Normalize):
        blocks = max(1, math.isqrt(shape.numel))
        return ExportStep(
            partial(l2_normalize, eps=step.eps, blocks=blocks, pad=-shape.numel % blocks)
        ), None
    if isinstance(step, SignedPower):
        return ExportStep(partial(signed_power, p=step.p, eps=step.eps)), None
    if isinstance(step, Vectorize) and step.triu:
        return ExportVectorize(d), None
    if not isinstance(step, MatrixStep):
        return step, None
    exact = exact_iterations(d, step.eps, step.eps_mode)
    ridge = (step.eps, step.eps_mode)
    roots = f"{LOG_ROOTS} Newton-Schulz roots of {exact} iterations"
    if isinstance(step, MatrixSqrt) or (isinstance(step, MatrixPower) and step.p == 0.5):
        method, _ = resolve_sqrtm(step.method, "auto", device_type, d)
        scale = getattr(step, "scale", "fro")
        iters = step.iters if method == "newton_schulz" else exact
        new = ExportMatrixFunction(partial(newton_schulz_sqrt, iters=iters, scale=scale), *ridge)
        if method == "newton_schulz":
            return new, None
        note = f"the exact matrix square root ({method}) is exported as {exact} Newton-Schulz"
    elif isinstance(step, MatrixPower):
        new = ExportMatrixFunction(
            partial(newton_schulz_power, p=step.p, iters=exact), *ridge, step.floor
        )
        note = f"the matrix power p={step.p} (eigh) is exported as exp(p log A), the log by {roots}"
    elif isinstance(step, MatrixLog):
        new = ExportMatrixFunction(partial(newton_schulz_log, iters=exact), *ridge, step.floor)
        note = f"the matrix logarithm ({step.method}) is exported as {roots} and an atanh series"
    else:
        raise ValueError(
            f"normalization.{name}: {type(step).__name__} has no exportable form; export "
            "supports MatrixSqrt, MatrixPower, MatrixLog and steps of plain tensor operations"
        )
    return new, f"normalization.{name}: {note}"


def exportable(model: BilinearModel) -> tuple[BilinearModel, list[str]]:
    """A copy of ``model`` in eval mode whose every step traces and exports.

    Args:
        model: A trained model (left unchanged).

    Returns:
        The copy and the notes on steps computed differently (exact -> Newton-Schulz).

    Raises:
        ValueError: a normalization step with no exportable form, naming its key.
    """
    notes: list[str] = []
    copied = copy.deepcopy(model).eval()
    shape = copied.pooling.output_shape
    device_type = next(copied.parameters()).device.type
    steps = copied.normalization.steps
    for name, step in list(steps.items()):
        assert isinstance(step, Step)  # a NormalizationChain holds steps only
        steps[name], note = _replacement(name, step, shape, device_type)
        notes += [note] if note else []
        shape = step.output_shape(shape)
    for module in copied.modules():
        if isinstance(module, TensorSketch):
            # A scatter: exported FFTs run as plain DFTs, about 1e-3 off in float32.
            module.route = "pooled"
    return copied, notes
