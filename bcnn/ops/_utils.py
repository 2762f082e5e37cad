"""Small helpers shared by the ops: argument checks, compute dtype, autocast, guards."""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from bcnn.limits import problem

F = TypeVar("F", bound=Callable[..., Any])


def check_args(func: F) -> F:
    """Decorator: plain arguments of ``func`` must fit their declared ``Literal`` or
    ``Annotated`` annotations, else ``ValueError`` naming ``func`` and the argument."""
    sig = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hints = _declared(func)
        for name, value in sig.bind(*args, **kwargs).arguments.items():
            if name in hints and isinstance(value, (bool, int, float, str)):
                found = problem(value, hints[name])
                if found:
                    raise ValueError(f"{func.__name__}: {name} {found}")
        return func(*args, **kwargs)

    return typing.cast(F, wrapper)


@functools.cache
def _declared(func: Callable) -> dict[str, Any]:
    """The annotations of ``func`` that declare limits (generic forms, not plain types)."""
    hints = typing.get_type_hints(func, include_extras=True)
    return {k: v for k, v in hints.items() if typing.get_origin(v) is not None}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the matrix functions compute in: float64 stays, everything else is float32.

    Half precision cannot hold the dynamic range of Gram matrices of VGG features (largest
    eigenvalue ~1e6, smallest ~0) and LAPACK/cuSOLVER have no half kernels.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    if not A.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {A.dtype}")
    return A.shape[-1]


def frobenius_norm(A: Tensor) -> Tensor:
    """||A||_F of each matrix of ``(..., d, d)``, shape ``(..., 1, 1)``, floored at machine eps.

    Clamping the squared norm (not the norm) keeps the sqrt's backward finite at 0, and the
    floor keeps A / ||A||_F finite for the zero matrix.
    """
    eps = torch.finfo(A.dtype).eps
    return (A * A).sum((-2, -1), keepdim=True).clamp_min(eps * eps).sqrt()


def add_to_diagonal_(M: Tensor, value: float) -> Tensor:
    """M += value * I in place over the last two dims (cheaper than materialising I)."""
    M.diagonal(dim1=-2, dim2=-1).add_(value)
    return M


def from_spectrum(V: Tensor, f: Tensor) -> Tensor:
    """V diag(f) V^T from eigenvectors ``(..., d, d)`` and values ``(..., d)``."""
    return (V * f[..., None, :]) @ V.mT
