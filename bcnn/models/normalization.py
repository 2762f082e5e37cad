"""Normalization chains: matrix functions, vectorization, then elementwise steps.

A chain is a set of named steps (the keys of the ``normalization`` node, so each is
addressable: ``normalization.sqrt.iters=20``, ``normalization.signsqrt=null``), run in three
phases (``PHASES``) and in config order within a phase (docs/models.md). Each step reports
the shape it produces, so an impossible chain fails when the model is built.

A matrix step may compute differently where no gradient flows (``eval_method``,
``eval_iters``: evaluation and frozen features, so both linear-stage paths see the same
descriptors): BMVC 2017 fine-tunes with an exact root but classifies features from five
Newton-Schulz iterations. Its ridge ``eps`` is absolute (``eps_mode="abs"``) or relative to
the mean eigenvalue (``"trace"``), which suits any backbone's scale (docs/models.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal, cast, get_args

import torch
import torch.nn.functional as F
from annotated_types import Gt, Le
from torch import nn

from bcnn.limits import NonNegative, Positive, checked
from bcnn.models.shapes import FeatureShape
from bcnn.ops import (
    logm,
    logm_from_features,
    powm,
    powm_from_features,
    resolve_sqrtm,
    signed_power,
    small_side_cheaper,
    sqrtm,
    sqrtm_from_features,
)
from bcnn.ops.small_side import EpsMode
from bcnn.ops.spectral import LogMethod
from bcnn.ops.sqrtm import Backward, Iters, Method, Scale

# A function of the locations X (B, n, d) giving f(X^T X / n + ridge) (B, d, d).
SmallSideRoute = Callable[[torch.Tensor], torch.Tensor]

# An exponent of a power normalization.
Exponent = Annotated[float, Gt(0), Le(1)]


def add_ridge(a: torch.Tensor, eps: float, eps_mode: str) -> torch.Tensor:
    """A + eps I (``"abs"``) or A + eps (tr(A) / d) I (``"trace"``), for (B, d, d) A."""
    if eps == 0:
        return a
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    if eps_mode == "abs":
        return a + eps * eye
    if eps_mode == "trace":
        mean_eig = a.diagonal(dim1=-2, dim2=-1).sum(-1) / d
        return a + (eps * mean_eig)[..., None, None] * eye
    raise ValueError(f"eps_mode must be one of {get_args(EpsMode)}, got {eps_mode!r}")


class Step(nn.Module):
    """A normalization step. ``phase`` orders steps: ``matrix``, ``vectorize``, ``elementwise``."""

    phase: ClassVar[str] = "elementwise"

    def output_shape(self, shape: FeatureShape) -> FeatureShape:
        """The per-sample output shape for a per-sample input ``shape``; elementwise: same."""
        return shape


class MatrixStep(Step):
    """A function of symmetric PSD (B, d, d) matrices, applied to A + ridge, in float32
    (float64 stays) with autocast off: the pooled matrices are ill-conditioned.

    Args:
        eps, eps_mode: The ridge (see the module docstring).
    """

    phase = "matrix"
    # The method while a gradient flows, and where none does (None: the same); see settings.
    method: str
    eval_method: str | None = None

    @checked
    def __init__(self, eps: NonNegative, eps_mode: EpsMode) -> None:
        super().__init__()
        self.eps = float(eps)
        self.eps_mode = eps_mode

    def output_shape(self, shape: FeatureShape) -> FeatureShape:
        if not shape.is_matrix:
            raise ValueError(
                f"{type(self).__name__} acts on matrices but receives {shape} (avg and "
                "compact pooling give vectors): pick a matrix pooling (sum, democratic) or "
                "drop the matrix step"
            )
        if not shape.symmetric:
            raise ValueError(
                f"{type(self).__name__} needs the symmetric x x^T of one stream; two-stream "
                f"bilinear pooling gives x_a x_b^T ({shape}). Use an elementwise chain "
                "(signsqrt_l2, l2, none) or a symmetric backbone"
            )
        return shape

    def function(self, a: torch.Tensor) -> torch.Tensor:
        """The matrix function of the ridged (B, d, d) ``a`` (float32 or float64)."""
        raise NotImplementedError

    def settings(self, gradient: bool) -> Any:
        """The method used when a gradient flows (``gradient``) or not."""
        return self.method if gradient else (self.eval_method or self.method)

    def gradient_flows(self, a: torch.Tensor | None = None) -> bool:
        """Whether a gradient flows through this step for input ``a``: training mode, autograd
        on and ``a`` requiring a gradient (``a=None``: an input that requires one)."""
        wants = True if a is None else a.requires_grad
        return self.training and torch.is_grad_enabled() and wants

    def fused_settings(self) -> Any:
        """The settings a fused route must reproduce, or None where the input decides them
        (training mode with separate evaluation settings)."""
        gradient = self.gradient_flows()
        if gradient and self.settings(True) != self.settings(False):
            return None
        return self.settings(gradient)

    def small_side(self, n: int, d: int, device_type: str) -> SmallSideRoute | None:
        """The n x n route for A = X^T X / n of n locations and d channels, or None.

        Returned only where it gives this step's result in value and gradient (see
        ``bcnn.ops.small_side``) and is cheaper (``bcnn.ops.small_side_cheaper``).
        """
        return None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d, d) -> (B, d, d), float32 (float64 for float64 input)."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            a = a if a.dtype == torch.float64 else a.float()
            return self.function(add_ridge(a, self.eps, self.eps_mode))

    def divergence_hints(self) -> list[str]:
        """The settings of this step that can make training diverge (``key=value``)."""
        return [f"{k}={getattr(self, k)}" for k in ("eps", "iters") if hasattr(self, k)]

    def extra_repr(self) -> str:
        evaluation = [(k, getattr(self, k, None)) for k in ("eval_method", "eval_iters")]
        shown = [f"{k}={v}" for k, v in evaluation if v is not None]
        return ", ".join([*shown, f"eps={self.eps}", f"eps_mode={self.eps_mode}"])


class MatrixPower(MatrixStep):
    """(A + ridge)^p, 0 < p <= 1 (ECCV 2018): p = 0.5 through ``bcnn.ops.sqrtm``, any other
    p through the eigendecomposition of ``bcnn.ops.powm``.

    Args:
        p: Exponent in (0, 1].
        method, iters, backward, eval_method, eval_iters: ``MatrixSqrt``'s, for p = 0.5.
        eps, eps_mode: The ridge (see the module docstring).
        floor: Absolute eigenvalue floor inside ``powm``.
    """

    method: Method
    eval_method: Method | None
    scale: Scale = "fro"  # Newton-Schulz pre-scaling

    @checked
    def __init__(
        self,
        p: Exponent = 0.5,
        method: Method = "newton_schulz",
        iters: Iters = 5,
        backward: Backward = "auto",
        eps: NonNegative = 1e-4,
        eps_mode: EpsMode = "trace",
        floor: Positive = 1e-10,
        eval_method: Method | None = None,
        eval_iters: Iters | None = None,
    ) -> None:
        super().__init__(eps, eps_mode)
        self.p, self.floor = float(p), floor
        self.method, self.eval_method = method, eval_method
        self.iters, self.backward, self.eval_iters = iters, backward, eval_iters

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The evaluation settings choose the square root's method: p = 0.5 only; the
        backward must differentiate the method (``resolve_sqrtm``)."""
        p = values.get("p", 0.5)
        if p != 0.5:
            if values["eval_method"] is not None or values["eval_iters"] is not None:
                return (
                    "eval_method",
                    f"eval_method/eval_iters choose the square root's method and apply to "
                    f"p = 0.5 only (p = {p} always uses the eigendecomposition); drop them",
                )
            return None
        try:
            resolve_sqrtm(values["method"], values["backward"])
        except ValueError as err:
            return "backward", str(err).removeprefix("sqrtm: ")
        return None

    def settings(self, gradient: bool) -> tuple[Method, int]:
        """(method, iters) of the p = 0.5 root when a gradient flows (``gradient``) or not."""
        if gradient:
            return self.method, self.iters
        iters = self.iters if self.eval_iters is None else self.eval_iters
        return self.eval_method or self.method, iters

    def function(self, a: torch.Tensor) -> torch.Tensor:
        if self.p != 0.5:
            return powm(a, self.p, eps=self.floor)
        method, iters = self.settings(self.gradient_flows(a))
        out = sqrtm(a, method=method, iters=iters, backward=self.backward, scale=self.scale)
        assert isinstance(out, torch.Tensor)
        return out

    def small_side(self, n: int, d: int, device_type: str) -> SmallSideRoute | None:
        eps, eps_mode = self.eps, self.eps_mode
        if self.p != 0.5:
            if not small_side_cheaper(n, d, "eigh"):
                return None
            return functools.partial(
                powm_from_features, p=self.p, eps=eps, eps_mode=eps_mode, floor=self.floor
            )
        # The small side reproduces an exact root with the exact (lyapunov_eig) gradient and
        # Newton-Schulz with the gradient of its unrolled iterations (autograd) only.
        found = self.fused_settings()
        if found is None:
            return None
        method, backward = resolve_sqrtm(found[0], self.backward, device_type, d)
        route: Literal["eigh", "newton_schulz"]
        if method in ("eigh", "svd") and backward == "lyapunov_eig":
            route = "eigh"
        elif method == "newton_schulz" and backward == "autograd":
            route = "newton_schulz"
        else:
            return None
        if not small_side_cheaper(n, d, route, found[1]):
            return None
        return functools.partial(
            sqrtm_from_features,
            method=route,
            iters=found[1],
            scale=self.scale,
            eps=eps,
            eps_mode=eps_mode,
        )

    def extra_repr(self) -> str:
        if self.p != 0.5:
            return f"p={self.p}, " + super().extra_repr()
        root = f"method={self.method}, iters={self.iters}, backward={self.backward}"
        return f"{root}, scale={self.scale}, " + super().extra_repr()


class MatrixSqrt(MatrixPower):
    """(A + ridge)^(1/2) through ``bcnn.ops.sqrtm``: ``MatrixPower`` at p = 0.5.

    Args:
        method: ``newton_schulz`` (the paper: approximate on purpose at 5 iterations),
            ``eigh``, ``svd`` or ``auto`` (device-dependent).
        iters: Newton-Schulz iterations.
        backward: ``sqrtm``'s backward; ``auto`` is the one that matches ``method``.
        scale: Newton-Schulz pre-scaling, ``fro`` or ``trace``.
        eps, eps_mode: The ridge (see the module docstring).
        eval_method, eval_iters: Method and iterations where no gradient flows; None =
            ``method`` / ``iters``.
    """

    @checked
    def __init__(
        self,
        method: Method = "newton_schulz",
        iters: Iters = 5,
        backward: Backward = "auto",
        scale: Scale = "fro",
        eps: NonNegative = 1e-4,
        eps_mode: EpsMode = "trace",
        eval_method: Method | None = None,
        eval_iters: Iters | None = None,
    ) -> None:
        super().__init__(
            0.5, method, iters, backward, eps, eps_mode,
            eval_method=eval_method, eval_iters=eval_iters,
        )  # fmt: skip
        self.scale = scale


class MatrixLog(MatrixStep):
    """log(A + ridge) through ``bcnn.ops.logm``.

    Args:
        method: ``eigh`` (exact, Daleckii-Krein gradient) or ``iterative`` (repeated
            Newton-Schulz roots; matmuls only).
        eps, eps_mode: The ridge (see the module docstring).
        floor: Absolute eigenvalue floor inside ``logm`` (guards an all-zero matrix).
        eval_method: Method where no gradient flows; None = ``method``.
    """

    @checked
    def __init__(
        self,
        method: LogMethod = "eigh",
        eps: NonNegative = 1e-4,
        eps_mode: EpsMode = "trace",
        floor: Positive = 1e-10,
        eval_method: LogMethod | None = None,
    ) -> None:
        super().__init__(eps, eps_mode)
        self.method, self.eval_method, self.floor = method, eval_method, floor

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The iterative logarithm needs a ridge: its repeated roots of a singular matrix
        reach log(0)."""
        iterative = "iterative" in (values["method"], values["eval_method"])
        if iterative and values["eps"] == 0:
            return "eps", "must be > 0 with method=iterative (a singular matrix has log 0)"
        return None

    def function(self, a: torch.Tensor) -> torch.Tensor:
        return logm(a, method=self.settings(self.gradient_flows(a)), eps=self.floor)

    def small_side(self, n: int, d: int, device_type: str) -> SmallSideRoute | None:
        if self.fused_settings() != "eigh" or not small_side_cheaper(n, d, "eigh"):
            return None
        return functools.partial(
            logm_from_features, eps=self.eps, eps_mode=self.eps_mode, floor=self.floor
        )

    def extra_repr(self) -> str:
        return f"method={self.method}, " + super().extra_repr()


class Vectorize(Step):
    """(B, d1, d2) matrices -> (B, d1 d2) vectors; vectors pass unchanged.

    Args:
        triu: Keep the upper triangle of symmetric matrices, (B, d(d+1)/2), the off-diagonal
            entries scaled by sqrt(2) so that inner products stay the Frobenius ones.
    """

    phase = "vectorize"

    @checked
    def __init__(self, triu: bool = False) -> None:
        super().__init__()
        self.triu = triu

    def output_shape(self, shape: FeatureShape) -> FeatureShape:
        if not shape.is_matrix:
            return shape
        if not self.triu:
            return FeatureShape((shape.numel,))
        if not shape.symmetric:
            raise ValueError(
                f"Vectorize(triu=true) needs symmetric matrices; two-stream pooling gives "
                f"x_a x_b^T ({shape}): set the vectorize step's triu=false"
            )
        d = shape.dims[0]
        return FeatureShape((d * (d + 1) // 2,))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d1, d2) -> (B, D); (B, D) unchanged."""
        if a.dim() == 2:
            return a
        if not self.triu:
            return a.flatten(1)
        d = a.shape[-1]
        rows, cols = torch.triu_indices(d, d, device=a.device)
        scale = torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(a.dtype)
        return a[:, rows, cols] * scale

    def extra_repr(self) -> str:
        return f"triu={self.triu}"


class SignedPower(Step):
    """Elementwise sign(z) ((|z| + eps)^p - eps^p), 0 < p <= 1: 0 at 0, continuous, and its
    derivative is at most p eps^(p - 1) where the exact one is infinite.

    Args:
        p: Exponent in (0, 1].
        eps: Guard added under the power; > 0.
    """

    @checked
    def __init__(self, p: Exponent = 0.5, eps: Positive = 1e-8) -> None:
        super().__init__()
        self.p, self.eps = float(p), float(eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Any shape -> same shape."""
        return signed_power(z, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class SignedSqrt(SignedPower):
    """Elementwise sign(z) sqrt(|z|) with a guarded gradient at 0 (``SignedPower``, p = 0.5)."""

    @checked
    def __init__(self, eps: Positive = 1e-8) -> None:
        super().__init__(0.5, eps)


class L2Normalize(Step):
    """Divides each sample by its L2 norm (Frobenius for matrices), floored at ``eps``."""

    @checked
    def __init__(self, eps: Positive = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, ...)."""
        return F.normalize(z.flatten(1), dim=1, eps=self.eps).view_as(z)


PHASES = ("matrix", "vectorize", "elementwise")


class NormalizationChain(nn.Module):
    """Named normalization steps, run phase by phase (see the module docstring).

    Args:
        **steps: The steps by name (the config keys); ``None`` values are dropped, so a
            preset's step can be switched off with ``normalization.<name>=null``.
    """

    def __init__(self, **steps: Step | None) -> None:
        super().__init__()
        for name, step in steps.items():
            if step is not None and not isinstance(step, Step):
                raise ValueError(
                    f"normalization.{name} must be a normalization step (a config with a "
                    f"_target_ such as bcnn.models.normalization.L2Normalize), got {step!r}"
                )
        ordered = sorted(
            ((n, s) for n, s in steps.items() if s is not None),
            key=lambda item: PHASES.index(item[1].phase),
        )
        self.steps = nn.ModuleDict(dict(ordered))

    def output_shape(self, shape: FeatureShape) -> FeatureShape:
        """Per-sample shape after every step, for a pooled per-sample ``shape``.

        Raises:
            ValueError: a step cannot act on what reaches it, naming the step's key.
        """
        for name, step in self.steps.items():
            try:
                shape = cast(Step, step).output_shape(shape)
            except ValueError as err:
                raise ValueError(f"normalization.{name}: {err}") from None
        return shape

    def divergence_hints(self) -> list[str]:
        """Its steps' settings that can make training diverge (``<step>.<key>=value``)."""
        return [
            f"{name}.{hint}"
            for name, step in self.steps.items()
            if isinstance(step, MatrixStep)
            for hint in step.divergence_hints()
        ]

    def leading_matrix_step(self) -> MatrixStep | None:
        """The first step when it is a matrix function (the one sum pooling can fuse with)."""
        first = next(iter(self.steps.values()), None)
        return first if isinstance(first, MatrixStep) else None

    def forward(self, pooled: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, d1, d2) or (B, D) -> the normalized descriptor (shape: ``output_shape``).

        Args:
            pooled: The pooling head's output.
            start: Skip the first ``start`` steps (already applied by a fused route).
        """
        for step in list(self.steps.values())[start:]:
            pooled = step(pooled)
        return pooled
