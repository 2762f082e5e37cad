"""Small helpers shared by the matrix functions: compute dtype, autocast, guards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# Half precision cannot hold the dynamic range of Gram matrices of VGG features (largest
# eigenvalue ~1e6, smallest ~0) and LAPACK/cuSOLVER have no half kernels: compute in float32.
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the matrix functions compute in: float64 stays, everything else is float32."""
    if dtype == torch.float64:
        return torch.float64
    return _UPCAST.get(dtype, torch.float32)


@contextlib.contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Turn autocast off for ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def to_compute(x: Tensor) -> Tensor:
    """Differentiable cast of ``x`` to its compute dtype (gradients flow back in x.dtype)."""
    return x.to(compute_dtype(x.dtype))


def symmetrize(A: Tensor) -> Tensor:
    """(A + A^T) / 2 over the last two dims."""
    return (A + A.mT) * 0.5


def check_square(A: Tensor, name: str) -> int:
    """Validate a batch of square matrices ``(..., d, d)`` and return ``d``."""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name}: expected (..., d, d) matrices, got shape {tuple(A.shape)}")
    if not (A.is_floating_point()):
        raise TypeError(f"{name}: expected a floating-point tensor, got {A.dtype}")
    return A.shape[-1]


def machine_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (a python float: no device sync)."""
    return torch.finfo(dtype).eps


def frobenius_norm(A: Tensor) -> Tensor:
    """||A||_F of each matrix of ``(..., d, d)``, shape ``(..., 1, 1)``, floored at machine eps.

    Clamping the squared norm (not the norm) keeps the sqrt's backward finite at 0, and the
    floor keeps A / ||A||_F finite for the zero matrix.
    """
    eps = machine_eps(A.dtype)
    return (A * A).sum((-2, -1), keepdim=True).clamp_min(eps * eps).sqrt()


def add_to_diagonal_(M: Tensor, value: float) -> Tensor:
    """M += value * I in place over the last two dims (cheaper than materialising I)."""
    M.diagonal(dim1=-2, dim2=-1).add_(value)
    return M


def sandwich(V: Tensor, M: Tensor) -> Tensor:
    """V M V^T."""
    return V @ M @ V.mT


def sandwich_t(V: Tensor, M: Tensor) -> Tensor:
    """V^T M V."""
    return V.mT @ M @ V


def from_spectrum(V: Tensor, f: Tensor) -> Tensor:
    """V diag(f) V^T from eigenvectors ``(..., d, d)`` and values ``(..., d)``."""
    return (V * f[..., None, :]) @ V.mT
