"""Maximal ("inverse") images of classes (Lin & Maji, CVPR 2016; docs/visualize.md).

For a class c, I*_c = arg max_I sum_m log P_m(c | I) - lambda_tv TV_beta(I) - lambda_p N_p(I)
over 0 <= I <= 1, for one model or several (m: e.g. classifiers on the bilinear descriptors
of several layers); TV_beta and N_p are the natural-image prior below, and the box is a hard
bound enforced by clamping after each Adam step in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn
from tqdm import tqdm


def total_variation(images: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """TV_beta: the mean over pixels and channels of (dx^2 + dy^2)^(beta/2).

    Args:
        images: (B, 3, H, W).
        beta: Exponent; 2 = squared gradient magnitude, 1 = total variation.

    Returns:
        (B,).
    """
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]
    sq = dx.square() + dy.square()
    # The 1/2 power has an infinite derivative at 0; the floor keeps beta = 1 finite.
    mag = sq if beta == 2.0 else (sq + 1e-8) ** (beta / 2)
    return mag.flatten(1).mean(1)


def norm_penalty(images: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    """N_p, a soft bound on the distance to mid-grey: mean |2 I - 1|^p, (B, 3, H, W) -> (B,)."""
    return (2 * images - 1).abs().pow(p).flatten(1).mean(1)


@dataclass
class InverseResult:
    """Maximal ``images`` (K, 3, H, W) in [0, 1] of the ``targets`` (K class indices), their
    ``probs`` P_m(c_k | I_k) (K, M) at the end, and the mean ``objective`` (maximized) before
    the first and after every step."""

    images: torch.Tensor
    targets: list[int]
    probs: torch.Tensor
    objective: list[float] = field(default_factory=list)


def class_log_prob(models: Sequence[nn.Module], images: torch.Tensor, targets: torch.Tensor):
    """(B,) sum over models of log P_m(target | image), and (B, M) the probabilities."""
    logps = [m(images).float().log_softmax(1).gather(1, targets[:, None])[:, 0] for m in models]
    stacked = torch.stack(logps, 1)
    return stacked.sum(1), stacked.exp()


def maximal_images(
    models: Sequence[nn.Module],
    targets: Sequence[int],
    size: tuple[int, int],
    *,
    steps: Annotated[int, Ge(0)] = 200,
    lr: float = 0.05,
    tv_weight: Annotated[float, Ge(0)] = 0.5,
    tv_beta: float = 2.0,
    norm_weight: Annotated[float, Ge(0)] = 0.05,
    norm_p: float = 6.0,
    init: torch.Tensor | None = None,
    seed: int = 0,
    desc: str | None = None,
) -> InverseResult:
    """The maximal image of each target class (module docstring), optimized jointly.

    Args:
        models: Classifiers taking (B, 3, H, W) floats in [0, 1] (``BilinearModel``s), with
            the same classes; used in eval mode and not changed.
        targets: K class indices.
        size: (H, W) of the images.
        steps: Adam steps.
        lr: Adam step size (pixel units).
        tv_weight, tv_beta: lambda_tv and beta of the TV term.
        norm_weight, norm_p: lambda_p and p of the norm bound.
        init: (K, 3, H, W) start images in [0, 1] (e.g. synthesized textures); ``None``:
            mid-grey plus small uniform noise.
        seed: Seed of the noise.
        desc: The label of a progress bar; ``None``: no bar.

    Raises:
        ValueError: no models or targets, or an ``init`` of another shape.
    """
    if not models:
        raise ValueError("maximal_images: no model given (run=<training run dir>)")
    if not targets:
        raise ValueError("viz.inverse.classes: no class selected")
    device = next(iter(models[0].parameters())).device
    for m in models:
        m.eval()
    k = len(targets)
    t = torch.as_tensor(list(targets), device=device)
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        init = 0.5 + 0.1 * (torch.rand((k, 3, *size), generator=gen) - 0.5)
    elif tuple(init.shape) != (k, 3, *size):
        raise ValueError(
            f"maximal_images: init must be ({k}, 3, {size[0]}, {size[1]}), got {tuple(init.shape)}"
        )
    x = init.float().to(device).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    history: list[float] = []

    def objective() -> torch.Tensor:
        logp, _ = class_log_prob(models, x, t)
        prior = tv_weight * total_variation(x, tv_beta) + norm_weight * norm_penalty(x, norm_p)
        return logp - prior  # (K,), maximized

    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        value = objective()
        history.append(float(value.detach().mean()))
        # autograd.grad, not backward: no gradient is accumulated in the models' weights.
        (x.grad,) = torch.autograd.grad(-value.sum(), x)
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.no_grad():
        history.append(float(objective().mean()))
        _, probs = class_log_prob(models, x, t)
    return InverseResult(x.detach().cpu(), [int(c) for c in targets], probs.cpu(), history)
