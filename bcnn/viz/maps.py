"""Contribution maps of a batch of images (``bcnn-viz kind=maps``).

For each image, on the features of the trained model (definitions in
``bcnn.viz.contributions``):

* ``sum``: the shares w(x) C(x) / ||A||^2 of sum pooling,
* ``democratic``: the same for gamma-democratic pooling,
* ``alpha``: the democratic weights, as n w(x) (1 = the weight of sum pooling),
* ``matrix``: the shares (1/n) C_f(x) / <A, f(A)> of the matrix-normalized descriptor,
* ``class``: S_c(x) for the predicted class c.

Shares are shown times n, so 1 everywhere means every location contributes equally; the
spread of the shares (their coefficient of variation, std / mean) measures how unequal the
contributions are.
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
    matrix_steps,
    sum_contributions,
)
from bcnn.viz.figures import draw_image, draw_overlay, figure


@dataclass
class ImageMaps:
    """All maps of a batch of B images, each (B, n) on a (h, w) grid.

    Attributes:
        sum, democratic, matrix: shares times n.
        alpha: n w(x) of democratic pooling.
        class_map: S_c(x) of the explained class.
        explained: ``ClassContributions`` behind ``class_map``.
        checks: {name: (B,) relative error of the identity sum_x w C = <xi', xi>}.
        gamma: The democratic exponent used.
        matrix_label: What f is (``"A^0.5"``, or the model's matrix steps).
    """

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

    Returns:
        ``ImageMaps``.
    """
    model.eval()
    feats = local_features(model, images)
    X = feats.X
    n = X.shape[1]
    head = model.pooling
    if gamma is None:
        gamma = head.gamma if isinstance(head, DemocraticPool) else 0.5
    steps = matrix_steps(model)
    if power is None and len(steps):
        mat = matrix_contributions(X, steps)
        names = [k for k, s in model.normalization.steps.items() if s.phase == "matrix"]
        label = "f = " + "+".join(names) + " (model)"
    else:
        p = 0.5 if power is None else float(power)
        mat = matrix_contributions(X, p=p)
        label = f"A^{p:g}"
    total = sum_contributions(X)
    demo = democratic_contributions(X, gamma=gamma, tau=tau, iters=iters)
    explained = class_contributions(model, images)
    checks = {
        "sum": _relative_error(
            (total.weights * total.values).sum(1), total.descriptor.square().sum((1, 2))
        ),
        "democratic": _relative_error(
            (demo.weights * demo.values).sum(1), demo.descriptor.square().sum((1, 2))
        ),
        "class": _relative_error(
            explained.values.sum(1) + explained.bias + explained.ridge, explained.score
        ),
    }
    assert demo.alpha is not None
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
    columns = 6
    fig = figure(tile * columns, (tile + 0.55) * b)
    axes = np.asarray(fig.subplots(b, columns)).reshape(b, columns)
    spreads = {k: spread(getattr(maps, k)) for k in ("sum", "democratic", "matrix")}
    for i in range(b):
        lines = [f"true: {classes[labels[i]]}"] if labels is not None else []
        lines += [
            f"{classes[c]} {p:.2f}" for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())
        ]
        draw_image(axes[i, 0], images[i], "\n".join(lines))
        panels = [
            (maps.sum[i], f"sum  cv {spreads['sum'][i]:.2f}", False),
            (
                maps.democratic[i],
                f"democratic g={maps.gamma:g}  cv {spreads['democratic'][i]:.2f}",
                False,
            ),
            (maps.alpha[i], "alpha (n w)", False),
            (maps.matrix[i], f"{maps.matrix_label}  cv {spreads['matrix'][i]:.2f}", False),
            (
                maps.class_map[i],
                f"class {classes[int(maps.explained.target[i])]}",
                True,
            ),
        ]
        for ax, (values, title, signed) in zip(axes[i, 1:], panels):
            draw_overlay(
                ax, images[i], values, maps.grid, title=title, signed=signed, opacity=opacity
            )
    return fig
