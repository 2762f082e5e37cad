"""Contribution maps of a batch of images (``bcnn-viz kind=maps``; definitions in
``bcnn.viz.contributions``): the shares of sum pooling, of gamma-democratic pooling and of
the matrix-normalized descriptor, the democratic weights and the class map S_c(x).

Shares are shown times n, so 1 everywhere means every location contributes equally; their
coefficient of variation (std / mean) measures how unequal the contributions are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bcnn.models.model import BilinearModel
from bcnn.models.pooling import DemocraticPool
from bcnn.viz.contributions import (
    ClassContributions,
    class_contributions,
    democratic_contributions,
    local_features,
    matrix_contributions,
    steps,
    sum_contributions,
)
from bcnn.viz.figures import draw_image, draw_overlay, figure


@dataclass
class ImageMaps:
    """Every map of B images, each (B, n) on the ``grid`` (h, w): the shares times n of
    ``sum``, ``democratic`` (exponent ``gamma``) and ``matrix`` pooling (f named by
    ``matrix_label``), the democratic weights n w(x) (``alpha``), the class map S_c(x)
    (``class_map``, from ``explained``) and ``checks``: {name: (B,) relative error of the
    identity sum_x w C = <xi', xi>}."""

    sum: torch.Tensor
    democratic: torch.Tensor
    alpha: torch.Tensor
    matrix: torch.Tensor
    class_map: torch.Tensor
    explained: ClassContributions
    grid: tuple[int, int]
    gamma: float
    matrix_label: str
    checks: dict[str, torch.Tensor] = field(default_factory=dict)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs().clamp_min(torch.finfo(b.dtype).tiny)


def compute_maps(
    model: BilinearModel,
    images: torch.Tensor,
    *,
    gamma: float | None = None,
    tau: float = 0.5,
    iters: int = 10,
    power: float | None = None,
) -> ImageMaps:
    """Every map of ``images`` (module docstring).

    Args:
        model: A one-stream trained model with a sum / democratic (spectral) head.
        images: (B, 3, H, W) uint8 or floats in [0, 1].
        gamma: Democratic exponent; ``None``: the model's if it pools democratically,
            else 0.5.
        tau, iters: Sinkhorn damping and iterations.
        power: p of the matrix map f(A) = A^p; ``None``: the model's matrix steps if it
            has any, else 0.5.
    """
    model.eval()
    feats = local_features(model, images)
    X, n = feats.X, feats.X.shape[1]
    if gamma is None:
        gamma = model.pooling.gamma if isinstance(model.pooling, DemocraticPool) else 0.5
    matrix = steps(model, "matrix")
    if power is None and len(matrix):
        mat = matrix_contributions(X, matrix)
        names = [k for k, s in model.normalization.steps.items() if s.phase == "matrix"]
        label = "f = " + "+".join(names) + " (model)"
    else:
        p = 0.5 if power is None else float(power)
        mat, label = matrix_contributions(X, p=p), f"A^{p:g}"
    total = sum_contributions(X)
    demo = democratic_contributions(X, gamma=gamma, tau=tau, iters=iters)
    explained = class_contributions(model, images)
    checks = {
        name: _relative_error((c.weights * c.values).sum(1), c.descriptor.square().sum((1, 2)))
        for name, c in (("sum", total), ("democratic", demo))
    }
    checks["class"] = _relative_error(
        explained.values.sum(1) + explained.bias + explained.ridge, explained.score
    )
    return ImageMaps(
        sum=total.shares() * n,
        democratic=demo.shares() * n,
        alpha=demo.weights * n,
        matrix=mat.shares() * n,
        class_map=explained.values,
        explained=explained,
        grid=feats.grid,
        gamma=float(gamma),
        matrix_label=label,
        checks=checks,
    )


def spread(shares: torch.Tensor) -> torch.Tensor:
    """(B, n) -> (B,) coefficient of variation std / mean of each row."""
    return shares.std(1) / shares.mean(1).clamp_min(torch.finfo(shares.dtype).tiny)


def draw_maps(
    images: torch.Tensor,
    maps: ImageMaps,
    classes: Sequence[str],
    labels: Sequence[int] | None = None,
    top_k: int = 3,
    opacity: float = 0.55,
    tile: float = 1.55,
):
    """A grid: one row per image (input with its top predictions, then the five maps).

    Args:
        images: (B, 3, H, W).
        maps: Their ``compute_maps``.
        classes: Class names.
        labels: True labels (shown when given).
        top_k: Predictions listed under the input.
        opacity: Of the maps.
        tile: Size of one panel in inches.

    Returns:
        The matplotlib Figure.
    """
    b = images.shape[0]
    probs = maps.explained.logits.float().softmax(1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    fig = figure(tile * 6, (tile + 0.55) * b)
    axes = np.asarray(fig.subplots(b, 6)).reshape(b, 6)
    cv = {k: spread(getattr(maps, k)) for k in ("sum", "democratic", "matrix")}
    for i in range(b):
        lines = [f"true: {classes[labels[i]]}"] if labels is not None else []
        lines += [f"{classes[c]} {p:.2f}" for p, c in zip(top.values[i], top.indices[i].tolist())]
        draw_image(axes[i, 0], images[i], "\n".join(lines))
        panels = [
            (maps.sum[i], f"sum  cv {cv['sum'][i]:.2f}"),
            (maps.democratic[i], f"democratic g={maps.gamma:g}  cv {cv['democratic'][i]:.2f}"),
            (maps.alpha[i], "alpha (n w)"),
            (maps.matrix[i], f"{maps.matrix_label}  cv {cv['matrix'][i]:.2f}"),
            (maps.class_map[i], f"class {classes[int(maps.explained.target[i])]}"),
        ]
        for k, (ax, (values, title)) in enumerate(zip(axes[i, 1:], panels)):
            draw_overlay(
                ax, images[i], values, maps.grid, title=title, signed=k == 4, opacity=opacity
            )
    return fig
