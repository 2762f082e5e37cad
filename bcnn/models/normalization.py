"""Normalization chains: matrix steps on (B, d, d), vectorization, then vector steps.

Steps (``STEPS``: name -> (class, acts on matrices)):

* ``sqrt``: matrix square root (A + eps I)^(1/2) through ``bcnn.ops.sqrtm``.
* ``log``: matrix logarithm log(A + eps I) through ``bcnn.ops.logm``.
* ``mpow``: matrix power (A + eps I)^p through ``bcnn.ops.powm`` (``sqrtm`` for p = 0.5).
* ``power``: elementwise sign(z) |z|^p with a bounded gradient at 0.
* ``signsqrt``: elementwise sign(z) sqrt(|z|) (``power`` with p = 0.5, guarded).
* ``l2``: division by the L2 norm (the Frobenius norm for a matrix).

The ridge ``eps`` of the matrix steps is either absolute (``eps_mode="abs"``, in the units
of A: BMVC 2017 uses eps = 1 for MatConvNet VGG-D features, whose largest eigenvalue is
~1e6) or relative to the mean eigenvalue tr(A)/d (``eps_mode="trace"``, the presets'
choice): the same value then suits any backbone and input scaling, whereas the Gram
matrix of torchvision VGG-D features ([0, 1] standardized input) is ~3000x smaller than
that of MatConvNet's (0-255 input) and an absolute eps = 1 would swamp it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bcnn.ops import logm, powm, signed_power, signed_sqrt, sqrtm

EPS_MODES = ("abs", "trace")


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
    raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")


class _MatrixStep(nn.Module):
    """Common ridge handling of the matrix steps."""

    def __init__(self, eps: float, eps_mode: str) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0, got {eps}")
        if eps_mode not in EPS_MODES:
            raise ValueError(f"{type(self).__name__}: eps_mode must be one of {EPS_MODES}")
        self.eps = float(eps)
        self.eps_mode = eps_mode

    def extra_repr(self) -> str:
        return f"eps={self.eps}, eps_mode={self.eps_mode}"


class MatrixSqrt(_MatrixStep):
    """(A + eps I)^(1/2) of symmetric PSD (B, d, d) matrices via ``bcnn.ops.sqrtm``.

    Args:
        method: ``newton_schulz`` (the paper: approximate on purpose at 5 iterations),
            ``eigh``, ``svd`` or ``auto`` (device-dependent: avoid where results must not
            depend on the device).
        iters: Newton-Schulz iterations.
        backward: ``lyapunov_iterative``, ``lyapunov_eig``, ``autograd``, ``svd``, ``auto``.
        scale: Newton-Schulz pre-scaling, ``fro`` or ``trace``.
        eps: Ridge added before the root (see the module docstring).
        eps_mode: ``abs`` or ``trace``.
    """

    def __init__(
        self,
        method: str = "newton_schulz",
        iters: int = 5,
        backward: str = "auto",
        scale: str = "fro",
        eps: float = 1e-4,
        eps_mode: str = "trace",
    ) -> None:
        super().__init__(eps, eps_mode)
        self.method, self.iters, self.backward, self.scale = method, iters, backward, scale

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d, d) -> (B, d, d)."""
        out = sqrtm(
            add_ridge(a, self.eps, self.eps_mode),
            method=self.method,
            iters=self.iters,
            backward=self.backward,
            scale=self.scale,
        )
        assert isinstance(out, torch.Tensor)
        return out

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, iters={self.iters}, backward={self.backward}, "
            f"scale={self.scale}, " + super().extra_repr()
        )


class MatrixLog(_MatrixStep):
    """log(A + eps I) of symmetric PSD (B, d, d) matrices via ``bcnn.ops.logm``.

    Args:
        method: ``eigh`` (exact, Daleckii-Krein gradient) or ``iterative`` (repeated
            Newton-Schulz roots; matmuls only).
        eps: Ridge added before the logarithm (see the module docstring).
        eps_mode: ``abs`` or ``trace``.
        floor: Absolute eigenvalue floor inside ``logm`` (guards an all-zero matrix).
    """

    def __init__(
        self, method: str = "eigh", eps: float = 1e-4, eps_mode: str = "trace", floor: float = 1e-10
    ) -> None:
        super().__init__(eps, eps_mode)
        self.method = method
        self.floor = floor

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d, d) -> (B, d, d)."""
        return logm(add_ridge(a, self.eps, self.eps_mode), method=self.method, eps=self.floor)

    def extra_repr(self) -> str:
        return f"method={self.method}, " + super().extra_repr()


class MatrixPower(_MatrixStep):
    """(A + eps I)^p of symmetric PSD (B, d, d) matrices, 0 < p <= 1.

    ``p = 0.5`` goes through ``sqrtm`` (``method``, ``iters``, ``backward``), any other p
    through the eigendecomposition of ``powm``.

    Args:
        p: Exponent in (0, 1].
        method, iters, backward: ``sqrtm`` options, used when p = 0.5.
        eps: Ridge added first (see the module docstring).
        eps_mode: ``abs`` or ``trace``.
        floor: Absolute eigenvalue floor inside ``powm``.
    """

    def __init__(
        self,
        p: float = 0.5,
        method: str = "newton_schulz",
        iters: int = 5,
        backward: str = "auto",
        eps: float = 1e-4,
        eps_mode: str = "trace",
        floor: float = 1e-10,
    ) -> None:
        super().__init__(eps, eps_mode)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"MatrixPower: p must be in (0, 1], got {p}")
        self.p = float(p)
        self.floor = floor
        self.sqrt = (
            MatrixSqrt(method=method, iters=iters, backward=backward, eps=eps, eps_mode=eps_mode)
            if self.p == 0.5
            else None
        )

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d, d) -> (B, d, d)."""
        if self.sqrt is not None:
            return self.sqrt(a)
        return powm(add_ridge(a, self.eps, self.eps_mode), self.p, eps=self.floor)

    def extra_repr(self) -> str:
        return f"p={self.p}, " + super().extra_repr()


class ElementwisePower(nn.Module):
    """Elementwise sign(z) |z|^p, 0 < p <= 1, with a bounded gradient at 0.

    The value is sign(z) ((|z| + eps)^p - eps^p): 0 at 0, continuous, and its derivative
    p (|z| + eps)^(p - 1) is at most p eps^(p - 1) where the exact one is infinite.

    Args:
        p: Exponent in (0, 1].
        eps: Guard added under the power; > 0.
    """

    def __init__(self, p: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 < p <= 1.0:
            raise ValueError(f"normalization power step: p must be in (0, 1], got {p}")
        if eps <= 0:
            raise ValueError(f"normalization power step: eps must be > 0, got {eps}")
        self.p, self.eps = float(p), float(eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Any shape -> same shape."""
        return signed_power(z, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class SignedSqrt(nn.Module):
    """Elementwise sign(z) sqrt(|z|) with a guarded gradient at 0 (see ``ops.signed_sqrt``)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D)."""
        return signed_sqrt(z, self.eps)


class L2Normalize(nn.Module):
    """Divides each descriptor by its L2 norm (floored at ``eps``)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D)."""
        return F.normalize(z, dim=-1, eps=self.eps)


# step name -> (class, acts on matrices).
STEPS: dict[str, tuple[type[nn.Module], bool]] = {
    "sqrt": (MatrixSqrt, True),
    "log": (MatrixLog, True),
    "mpow": (MatrixPower, True),
    "power": (ElementwisePower, False),
    "signsqrt": (SignedSqrt, False),
    "l2": (L2Normalize, False),
}


def vectorize(a: torch.Tensor, triu: bool) -> torch.Tensor:
    """Flattens symmetric matrices (B, d, d) to (B, d*d) or, with ``triu``, (B, d(d+1)/2).

    The upper triangle scales off-diagonal entries by sqrt(2) so that inner products of
    the vectors equal the Frobenius inner products of the matrices.
    """
    if not triu:
        return a.flatten(1)
    d = a.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=a.device)
    scale = torch.where(rows == cols, 1.0, 2.0**0.5).to(a.dtype)
    return a[:, rows, cols] * scale


class NormalizationChain(nn.Module):
    """An ordered list of normalization steps.

    Matrix steps (``sqrt``, ``log``, ``mpow``) act on the pooled (B, d, d) matrix in
    float32 (float64 stays) with autocast off, then the matrix is vectorized, then vector
    steps (``signsqrt``, ``power``, ``l2``) apply to the (B, D) vector.

    With ``keep_matrix`` (set by ``build_model`` for classifiers that read the matrix, such
    as the low-rank bilinear classifier) the output stays (B, d1, d2): the vector steps
    act on the flattened matrix (``l2`` is then the Frobenius normalization) and it is
    reshaped back.

    Args:
        steps: Each a mapping with ``name`` (a key of ``STEPS``) and that step's keyword
            arguments, e.g. ``[{"name": "signsqrt", "eps": 1e-8}, {"name": "l2"}]``.
        triu: Vectorize matrices by their upper triangle (see ``vectorize``).
        keep_matrix: Output the normalized matrix instead of a vector.
    """

    def __init__(
        self,
        steps: Sequence[Mapping[str, Any]] = (),
        triu: bool = False,
        keep_matrix: bool = False,
    ) -> None:
        super().__init__()
        self.triu = triu
        self.keep_matrix = keep_matrix
        matrix, vector = [], []
        for i, step in enumerate(steps):
            kwargs = dict(step)
            name = kwargs.pop("name", None)
            if name not in STEPS:
                raise ValueError(
                    f"normalization.steps[{i}].name={name!r} is not a known step; "
                    f"choose one of {sorted(STEPS)}"
                )
            cls, on_matrix = STEPS[name]
            if on_matrix and vector:
                raise ValueError(
                    f"normalization.steps[{i}] ({name}) acts on matrices but follows a "
                    "vector step; put matrix steps first"
                )
            (matrix if on_matrix else vector).append(cls(**kwargs))
        self.matrix_steps = nn.ModuleList(matrix)
        self.vector_steps = nn.ModuleList(vector)

    def out_dim(self, pool_dim: int | Sequence[int], is_matrix: bool) -> int:
        """Descriptor length for a pooling output, checking that the two fit together.

        Args:
            pool_dim: d for a symmetric (B, d, d) matrix, (d1, d2) for a two-stream
                (B, d1, d2) matrix x_a x_b^T, or D for a (B, D) vector.
            is_matrix: Whether the pooling gives matrices.

        Raises:
            ValueError: the chain cannot act on that pooling output.
        """
        if not is_matrix:
            if len(self.matrix_steps):
                names = [type(s).__name__ for s in self.matrix_steps]
                raise ValueError(
                    f"normalization has matrix steps {names} but the pooling head gives "
                    "vectors (avg, compact); pick a matrix pooling (sum, democratic, "
                    "spectral) or a vector-only chain (signsqrt_l2, l2, none)"
                )
            if self.keep_matrix:
                raise ValueError(
                    "the classifier reads the pooled matrix, but the pooling head gives "
                    "vectors (avg, compact); use a matrix pooling or classifier=linear"
                )
            return int(pool_dim)  # type: ignore[arg-type]
        if isinstance(pool_dim, Sequence):
            d1, d2 = (int(v) for v in pool_dim)
            if len(self.matrix_steps):
                raise ValueError(
                    "matrix functions (sqrt, log, mpow) need the symmetric x x^T of one "
                    f"stream; two-stream bilinear pooling gives x_a x_b^T ({d1}x{d2}). Use "
                    "an elementwise chain (signsqrt_l2, l2, none) or a symmetric backbone"
                )
            if self.triu:
                raise ValueError(
                    "normalization.triu=true needs symmetric matrices; two-stream pooling "
                    f"gives {d1}x{d2} x_a x_b^T: set normalization.triu=false"
                )
            return d1 * d2
        d = int(pool_dim)
        if self.keep_matrix:
            if self.triu:
                raise ValueError(
                    "normalization.triu=true vectorizes the matrix, but the classifier "
                    "reads the matrix itself: set normalization.triu=false"
                )
            return d * d
        return d * (d + 1) // 2 if self.triu else d * d

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d1, d2) or (B, D) -> (B, descriptor length), or (B, d1, d2) with keep_matrix."""
        if pooled.dim() == 3:
            with torch.autocast(device_type=pooled.device.type, enabled=False):
                a = pooled if pooled.dtype == torch.float64 else pooled.float()
                for step in self.matrix_steps:
                    a = step(a)
                if self.keep_matrix:
                    z = a.flatten(1)
                    for step in self.vector_steps:
                        z = step(z)
                    return z.view_as(a)
            z = vectorize(a, self.triu)
        else:
            z = pooled
        for step in self.vector_steps:
            z = step(z)
        return z
