"""The per-sample shape of what flows between the pooling head, the chain and the classifier."""

from __future__ import annotations

import math


class FeatureShape:
    """Per-sample shape of a pooled or normalized descriptor.

    A plain class rather than a dataclass: Hydra's ``instantiate`` would turn a dataclass
    passed as a keyword argument into a config dict.

    Args:
        dims: ``(D,)`` for vectors, ``(d1, d2)`` for matrices.
        symmetric: The matrix is x x^T of one stream (symmetric PSD), as opposed to the
            x_a x_b^T of two streams, which matrix functions cannot take even when square.
    """

    __slots__ = ("dims", "symmetric")

    def __init__(self, dims: tuple[int, ...], symmetric: bool = False) -> None:
        self.dims = tuple(int(d) for d in dims)
        self.symmetric = bool(symmetric)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureShape):
            return NotImplemented
        return (self.dims, self.symmetric) == (other.dims, other.symmetric)

    def __hash__(self) -> int:
        return hash((self.dims, self.symmetric))

    def __repr__(self) -> str:
        return f"FeatureShape(dims={self.dims}, symmetric={self.symmetric})"

    @property
    def is_matrix(self) -> bool:
        """True for (d1, d2) matrices."""
        return len(self.dims) == 2

    @property
    def numel(self) -> int:
        """Number of values per sample."""
        return math.prod(self.dims)

    def __str__(self) -> str:
        kind = "symmetric " if self.symmetric else ""
        if self.is_matrix:
            return f"{kind}{self.dims[0]}x{self.dims[1]} matrices"
        return f"vectors of length {self.dims[0]}"
