"""Texture synthesis with second-order descriptors (Gatys et al. 2015; Lin & Maji, CVPR 2016).

Starting from noise, the image is optimized in pixel space until the Gram matrices
G_l = (1/n_l) F_l F_l^T of its feature maps F_l (C_l x n_l locations) at the chosen layers
match those of a target image: the bilinear (sum-pooled) descriptor of each layer. The loss

    L(I) = sum_l w_l ||G_l(I) - G_l(T)||_F^2 / ||G_l(T)||_F^2  /  sum_l w_l

weighs each layer relative to its target's energy, so that the weights w_l mean what they
say whatever a layer's scale (1: nothing matched yet; 0: matched). A total-variation prior
``tv_weight * TV_2(I) / TV_2(T)``, relative to the exemplar's own roughness, may be added:
the network hardly sees pixel-level noise, which the Gram loss then leaves in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from tqdm import tqdm

from bcnn.models.pooling import bilinear
from bcnn.viz.inverse import total_variation
from bcnn.viz.layers import FeatureTaps


def gram_matrices(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: (B, C, H, W)} -> {layer: (B, C, C)}, the (1/n) F F^T of each layer (float32)."""
    return {name: bilinear(f) for name, f in features.items()}


def gram_loss(
    grams: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """The weighted, per-layer relative Gram-matching loss (module docstring).

    Args:
        grams: {layer: (B, C, C)} of the images being synthesized.
        targets: {layer: (B or 1, C, C)} to match.
        weights: {layer: w_l}; ``None`` weighs every layer 1.

    Returns:
        (B,) the loss of each image.
    """
    w = {name: 1.0 if weights is None else float(weights[name]) for name in grams}
    terms = [
        w[name] * (g - t).square().sum((-2, -1)) / t.square().sum((-2, -1)).clamp_min(1e-30)
        for name, g in grams.items()
        for t in [targets[name]]
    ]
    return torch.stack(terms).sum(0) / sum(w.values())


@dataclass
class TextureResult:
    """A synthesized ``image`` (3, H, W) in [0, 1]; its Gram loss before the first and after
    every iteration (``losses``, in order over the scales); where each scale's run starts in
    ``losses`` (``scale_starts``) and the (H, W) of each scale (``sizes``)."""

    image: torch.Tensor
    losses: list[float] = field(default_factory=list)
    scale_starts: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def _float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) or floats in [0, 1] -> float32 (1, 3, H, W) in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got shape {tuple(image.shape)}")
    return (image.float() / 255.0 if image.dtype == torch.uint8 else image.float())[None]


def _resize(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", antialias=True)


def synthesize_texture(
    taps: FeatureTaps,
    target: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
    steps: Annotated[int, Ge(1)] = 100,
    lr: float | None = None,
    layer_weights: Mapping[str, float] | None = None,
    tv_weight: Annotated[float, Ge(0)] = 0.0,
    init: torch.Tensor | None = None,
    seed: int = 0,
    desc: str | None = None,
) -> TextureResult:
    """An image whose Gram matrices at ``taps.layers`` match those of ``target``.

    The start is the exemplar's mean colour plus uniform noise of amplitude 0.2 (saturated
    noise pixels would hardly move under the sigmoid below). With several ``scales`` the
    synthesis runs coarse to fine: at scale s the target is resized to s times its size and
    the output to s times ``size``, the previous result, upsampled, is the start, and
    ``steps`` iterations run.

    Args:
        taps: The feature maps to match (a ``FeatureTaps`` of some backbone).
        target: The exemplar, (3, H, W) uint8 or floats in [0, 1].
        size: Output (H, W); ``None``: the target's.
        scales: Increasing fractions of the full size, ending at 1 (e.g. ``(0.5, 1.0)``).
        optimizer: ``lbfgs`` (strong-Wolfe line search) or ``adam``.
        steps: Iterations per scale.
        lr: Step size; ``None``: 1.0 for L-BFGS, 0.02 for Adam.
        layer_weights: {layer: weight}; ``None``: equal weights.
        tv_weight: Weight of the prior TV_2(I) / TV_2(T) (``bcnn.viz.inverse``).
        init: Start image (3, H, W) in [0, 1] instead of the noise.
        seed: Seed of the noise.
        desc: The label of a progress bar per scale; ``None``: no bar.

    Raises:
        ValueError: bad scales, or weights for unknown layers.
    """
    if not scales or any(not 0 < s <= 1 for s in scales) or list(scales) != sorted(scales):
        raise ValueError(f"viz.texture.scales must increase within (0, 1], got {list(scales)}")
    if layer_weights is not None:
        unknown = set(layer_weights) - set(taps.layers)
        if unknown:
            raise ValueError(
                f"viz.texture.layer_weights names layers that are not matched: {sorted(unknown)} "
                f"(layers: {taps.layers})"
            )
        layer_weights = {n: float(layer_weights.get(n, 1.0)) for n in taps.layers}
    device = next(iter(taps.parameters())).device
    exemplar = _float_image(target).to(device)
    full = size or exemplar.shape[-2:]
    if init is None:
        noise = torch.rand((1, 3, *full), generator=torch.Generator().manual_seed(seed))
        x = exemplar.mean((2, 3), keepdim=True) + 0.2 * (noise.to(device) - 0.5)
    else:
        x = _float_image(init).to(device)
    result = TextureResult(image=x)
    for scale in scales:
        hw = [max(1, round(s * scale)) for s in full]
        with torch.no_grad():
            t = _resize(exemplar, [max(1, round(s * scale)) for s in exemplar.shape[-2:]])
            targets = gram_matrices(taps(t))
            tv = tv_weight / max(float(total_variation(t)), 1e-8) if tv_weight else 0.0
        result.scale_starts.append(len(result.losses))
        result.sizes.append((hw[0], hw[1]))
        x = _resize(x, hw).clamp(0, 1)
        bar = f"{desc} {hw[0]}x{hw[1]}" if desc else None
        x = _optimize(taps, x, targets, layer_weights, optimizer, steps, lr, tv, result, bar)
    result.image = x.detach()[0].cpu()
    return result


def _optimize(
    taps: FeatureTaps,
    x: torch.Tensor,
    targets: dict[str, torch.Tensor],
    weights: Mapping[str, float] | None,
    optimizer: str,
    steps: int,
    lr: float | None,
    tv_weight: float,
    result: TextureResult,
    desc: str | None = None,
) -> torch.Tensor:
    """Runs ``steps`` iterations from ``x`` (1, 3, H, W) in [0, 1]; returns the result and
    appends the Gram loss at the start of every iteration and at the end to ``result``.

    Adam steps the pixels and clamps them into [0, 1] after each step. L-BFGS optimizes
    logits z with I = sigmoid(z) instead, an unconstrained problem: a projection after each
    step would make its curvature pairs (step, change of gradient) inconsistent.
    """
    if optimizer == "lbfgs":
        param = torch.logit(x.detach().clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
        # One iteration per call, with a full line search in it (max_eval would default to
        # 1). No tolerance-based stop: the pixel gradients of the relative, location-averaged
        # loss shrink with the image size and fall below the default 1e-7 at 64x64 already.
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            [param], lr=lr or 1.0, max_iter=1, max_eval=25, history_size=20,
            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0,
        )  # fmt: skip
        squash: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid
    else:
        param = x.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=lr or 0.02)
        squash = torch.nn.Identity()
    grams: list[float] = []

    def closure() -> float:
        opt.zero_grad(set_to_none=True)
        pixels = squash(param)
        gram = gram_loss(gram_matrices(taps(pixels)), targets, weights).sum()
        grams.append(float(gram.detach()))
        loss = gram + tv_weight * total_variation(pixels).sum()
        loss.backward()
        return float(loss.detach())

    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        # One iteration per call (L-BFGS keeps its curvature history in its state); its
        # first evaluation is at the current image.
        first = len(grams)
        opt.step(closure)
        result.losses.append(grams[first])
        if optimizer == "adam":
            with torch.no_grad():
                param.clamp_(0, 1)
    with torch.no_grad():
        final = float(gram_loss(gram_matrices(taps(squash(param))), targets, weights).sum())
    if math.isfinite(final):
        result.losses.append(final)
    return squash(param).detach()
