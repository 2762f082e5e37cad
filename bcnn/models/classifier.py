"""Classifiers of the normalized descriptor: vectors (D,), or the (d1, d2) matrix when the
chain ends before vectorizing (``in_features``, the chain's ``FeatureShape``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from annotated_types import Gt, Interval
from torch import nn

from bcnn.limits import Positive, PositiveInt, checked
from bcnn.models.shapes import FeatureShape
from bcnn.models.svm import median_calibration, train_linear_svm


class LinearClassifier(nn.Linear):
    """A linear layer (softmax classifier): (B, D) -> (B, num_classes).

    Args:
        in_features: The descriptor shape (vectors (D,)), or the int D; supplied by
            ``build_model``.
        num_classes: Number of classes, supplied by ``build_model``.
        bias: Learn a bias.
        init: ``zeros`` (bcnn's default: descriptors are L2-normalized and the linear stage
            runs at lr ~ 1, where a random start only adds noise), ``normal`` (weights
            N(0, init_std^2), as the authors' MATLAB code) or ``torch`` (``nn.Linear``'s
            own, as their PyTorch code). The recipes set it (``configs/recipe/``).
        init_std: Standard deviation of the ``normal`` weights.
        init_bias: The bias of ``zeros`` and ``normal`` (the MATLAB B-CNN: 0.1).
    """

    @checked
    def __init__(
        self,
        in_features: int | FeatureShape,
        num_classes: int,
        bias: bool = True,
        init: Literal["zeros", "normal", "torch"] = "zeros",
        init_std: Annotated[float, Gt(0)] = 0.01,
        init_bias: float = 0.0,
    ) -> None:
        if isinstance(in_features, FeatureShape):
            if in_features.is_matrix:
                raise ValueError(
                    f"classifier=linear needs vectors but the normalization chain gives "
                    f"{in_features}: add a vectorize step (normalization.vectorize="
                    "{_target_: bcnn.models.normalization.Vectorize})"
                )
            in_features = in_features.dims[0]
        super().__init__(int(in_features), num_classes, bias=bias)  # init "torch"
        if init != "torch":
            with torch.no_grad():
                if init == "normal":
                    self.weight.normal_(0.0, init_std)
                else:
                    self.weight.zero_()
                if self.bias is not None:
                    self.bias.fill_(init_bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) logits in z's dtype."""
        return super().forward(z.to(self.weight.dtype))


class LowRankBilinearClassifier(nn.Module):
    """Low-rank bilinear classifier (Kong & Fowlkes, CVPR 2017) on the pooled matrix.

    score_k(A) = <W_k, A>_F + b_k with a rank-r W_k: U_k+ U_k+^T - U_k- U_k-^T for a
    symmetric A (both signs: a PSD A gives u^T A u >= 0), U_k V_k^T for a two-stream
    x_a x_b^T. K r d parameters instead of K d^2; compute and memory B d K r
    (docs/models.md).

    Args:
        in_features: The matrix shape: symmetric (d, d) or two-stream (d_a, d_b); supplied
            by ``build_model``.
        num_classes: K, supplied by ``build_model``.
        rank: r per class (8 in the paper); for symmetric A, ceil(r/2) positive terms.
        bias: Learn a per-class bias.
        init: ``normal``: U (and V) N(0, init_std^2), the bias ``init_bias``; ``torch``:
            ``nn.Linear``'s rule, uniform in +-1/sqrt(fan in) (d for U and V, d1 d2 for the
            bias). A zero start has no gradient, so ``zeros`` is not an option.
        init_std: Standard deviation of ``normal``; None: 1/sqrt(d) (unit-norm columns on
            average: a Frobenius-normalized A gives scores of order 1/d at the start).
        init_bias: The bias of ``normal``.
    """

    signs: torch.Tensor

    @checked
    def __init__(
        self,
        in_features: FeatureShape,
        num_classes: int,
        rank: Annotated[int, Interval(ge=1, le=4096)] = 8,
        bias: bool = True,
        init: Literal["normal", "torch"] = "normal",
        init_std: Annotated[float, Gt(0)] | None = None,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if not in_features.is_matrix:
            raise ValueError(
                f"classifier=lowrank reads the pooled matrix but the normalization chain gives "
                f"{in_features}: use a matrix pooling (sum, democratic) and a chain that ends "
                "before vectorizing (~normalization.vectorize)"
            )
        d1, d2 = in_features.dims
        self.symmetric = in_features.symmetric
        self.shape = (d1, d2)
        self.num_classes, self.rank = int(num_classes), int(rank)

        def factor(d: int) -> nn.Parameter:
            if init == "torch":
                return nn.Parameter(torch.empty(num_classes * rank, d).uniform_(-1, 1) / d**0.5)
            return nn.Parameter(torch.randn(num_classes * rank, d) * (init_std or d**-0.5))

        self.U = factor(d1)
        self.V = None if self.symmetric else factor(d2)
        signs = torch.ones(rank)
        signs[(rank + 1) // 2 :] = -1.0
        self.register_buffer("signs", signs if self.symmetric else torch.ones(rank))
        start = torch.full((num_classes,), float(init_bias))
        if init == "torch":
            start.uniform_(-1, 1).div_(math.sqrt(d1 * d2))
        self.bias = nn.Parameter(start) if bias else None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, d1, d2) normalized matrices -> (B, num_classes) logits."""
        if tuple(a.shape[1:]) != self.shape:
            raise ValueError(
                f"LowRankBilinearClassifier expects (B, {self.shape[0]}, {self.shape[1]}) "
                f"matrices, got {tuple(a.shape)}"
            )
        U = self.U.to(a.dtype)
        V = U if self.V is None else self.V.to(a.dtype)
        av = a @ V.T  # (B, d1, K r): A v_kr for every class and rank
        terms = (U.T * av).sum(1).view(a.shape[0], self.num_classes, self.rank)
        scores = terms @ self.signs.to(a.dtype)
        return scores if self.bias is None else scores + self.bias.to(a.dtype)

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, num_classes={self.num_classes}, rank={self.rank}, "
            f"symmetric={self.symmetric}, bias={self.bias is not None}"
        )


class SVMClassifier(LinearClassifier):
    """One-vs-all linear SVMs on the descriptors, as the papers' no-fine-tuning rows.

    A linear layer that the linear stage fits (``fit``, ``bcnn.models.svm``) on the cached
    descriptors of the training images and their flips; test scores are averaged over an
    image and its flip (``average_views = "scores"``).

    Args:
        in_features: The descriptor shape (vectors), supplied by ``build_model``.
        num_classes: Number of classes, supplied by ``build_model``.
        C: Cost of the hinge losses (1 in the papers).
        loss: ``hinge`` (the authors' ``vl_svmtrain``) or ``squared_hinge`` (faster).
        calibrate: The authors' median calibration of each class's scores after training.
        tol: Relative duality gap at which training stops.
        max_epochs: Most passes over the cached descriptors.
        bias: Learn the intercepts (regularized, as LinearSVC and ``vl_svmtrain`` do).
        init, init_std, init_bias: As :class:`LinearClassifier` (accepted so that a
            recipe's setting composes; the fit replaces these weights).
    """

    trains_on_cache = True
    linear_stage_only = "SVMs are fitted on cached descriptors in the linear stage only"
    average_views = "scores"

    @checked
    def __init__(
        self,
        in_features: int | FeatureShape,
        num_classes: int,
        C: Positive = 1.0,
        loss: Literal["hinge", "squared_hinge"] = "hinge",
        calibrate: bool = True,
        tol: Positive = 1e-3,
        max_epochs: PositiveInt = 200,
        bias: bool = True,
        init: Literal["zeros", "normal", "torch"] = "zeros",
        init_std: Annotated[float, Gt(0)] = 0.01,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes, bias, init, init_std, init_bias)
        self.C, self.loss, self.calibrate = float(C), loss, bool(calibrate)
        self.tol, self.max_epochs = float(tol), int(max_epochs)
        self.requires_grad_(False)  # trained by fit(), never by the optimizer

    def fit(self, features: Any, labels: Any) -> dict[str, Any]:
        """Trains the SVMs on cached descriptors.

        Args:
            features: ``(N, V, D)`` array-like (a feature cache's memory map: read in
                blocks, never copied whole), every view a training sample.
            labels: ``(N,)`` class indices.

        Returns:
            The solver's information (epochs, objective, training accuracy, ...).
        """
        W, b, info = train_linear_svm(
            features, labels, self.out_features, C=self.C, loss=self.loss,
            bias=self.bias is not None, tol=self.tol, max_epochs=self.max_epochs,
            device=self.weight.device,
        )  # fmt: skip
        if self.calibrate:
            W, b = median_calibration(features, labels, W, b)
        self.weight.copy_(W)
        if self.bias is not None:
            self.bias.copy_(b)
        return info
