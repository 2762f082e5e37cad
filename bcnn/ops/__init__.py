"""Differentiable matrix functions and pooling operators (no model code).

Matrix functions take batched symmetric PSD matrices ``(..., d, d)`` and compute in float32
(float64 for float64 inputs) whatever the autocast state. See ``docs/ops.md``.
"""

from bcnn.ops.compact import RandomMaclaurin, TensorSketch
from bcnn.ops.democratic import democratic_pool, democratic_weights
from bcnn.ops.elementwise import signed_power, signed_sqrt
from bcnn.ops.fisher import GMM, fisher_vector, fit_gmm
from bcnn.ops.small_side import (
    logm_from_features,
    matrix_function_from_features,
    powm_from_features,
    small_side_cheaper,
    sqrtm_from_features,
)
from bcnn.ops.spectral import logm, powm
from bcnn.ops.sqrtm import SQRTM_AUTO_TABLE, resolve_sqrtm, sqrtm

__all__ = [
    "GMM",
    "SQRTM_AUTO_TABLE",
    "RandomMaclaurin",
    "TensorSketch",
    "democratic_pool",
    "democratic_weights",
    "fisher_vector",
    "fit_gmm",
    "logm",
    "logm_from_features",
    "matrix_function_from_features",
    "powm",
    "powm_from_features",
    "resolve_sqrtm",
    "signed_power",
    "signed_sqrt",
    "small_side_cheaper",
    "sqrtm",
    "sqrtm_from_features",
]
