"""Texture synthesis with second-order descriptors (Gatys et al. 2015; Lin & Maji, CVPR 2016).

Starting from noise, the image is optimized in pixel space until the Gram matrices
G_l = (1/n_l) F_l F_l^T of its feature maps F_l (C_l x n_l, n_l = H_l W_l locations) at the
chosen layers match those of a target image: the bilinear (sum-pooled) descriptor of each
layer. The loss is

    L(I) = sum_l w_l ||G_l(I) - G_l(T)||_F^2 / ||G_l(T)||_F^2  /  sum_l w_l,

each layer relative to its target's energy so that layers of different scales weigh what
their weights say (1 = the synthesis has no information yet about a layer whose Gram is
far smaller than the target's; 0 = matched).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bcnn.models.pooling import bilinear
from bcnn.viz.layers import FeatureTaps

OPTIMIZERS = ("lbfgs", "adam")


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
    total = 0.0
    norm = 0.0
    for name, g in grams.items():
        w = 1.0 if weights is None else float(weights[name])
        t = targets[name]
        energy = t.square().sum(dim=(-2, -1)).clamp_min(torch.finfo(t.dtype).tiny)
        total = total + w * (g - t).square().sum(dim=(-2, -1)) / energy
        norm += w
    assert isinstance(total, torch.Tensor), "gram_loss: no layers"
    return total / norm


@dataclass
class TextureResult:
    """A synthesized texture and its optimization history.

    Attributes:
        image: (3, H, W) floats in [0, 1].
        losses: The Gram loss before the first iteration and after every iteration, in
            order over the scales.
        scale_starts: Index in ``losses`` where each scale's run starts.
        sizes: (H, W) of each scale.
    """

    image: torch.Tensor
    losses: list[float] = field(default_factory=list)
    scale_starts: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def _as_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) or float in [0, 1] -> float32 (1, 3, H, W) in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got shape {tuple(image.shape)}")
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    return image[None]


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


def synthesize_texture(
    taps: FeatureTaps,
    target: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    optimizer: str = "lbfgs",
    steps: int = 100,
    lr: float | None = None,
    layer_weights: Mapping[str, float] | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
    desc: str | None = None,
) -> TextureResult:
    """An image whose Gram matrices at ``taps.layers`` match those of ``target``.

    Pixels are optimized directly and kept in [0, 1] (clamped after every iteration).
    With several ``scales`` the synthesis runs coarse to fine: at each scale s the target
    is resized to s times its size (the output to s times ``size``), the previous result
    is upsampled as the start, and ``steps`` iterations run.

    Args:
        taps: The feature maps to match (a ``FeatureTaps`` of some backbone).
        target: The exemplar, (3, H, W) uint8 or floats in [0, 1].
        size: Output (H, W); ``None``: the target's.
        scales: Increasing fractions of the full size, ending at 1 (e.g. ``(0.5, 1.0)``).
        optimizer: ``lbfgs`` (strong-Wolfe line search) or ``adam``.
        steps: Iterations per scale.
        lr: Step size; ``None``: 1.0 for L-BFGS, 0.02 for Adam.
        layer_weights: {layer: weight}; ``None``: equal weights.
        init: Start image (3, H, W) in [0, 1] instead of uniform noise.
        seed: Seed of the noise.
        desc: The label of a progress bar per scale; ``None``: no bar.

    Returns:
        The texture and the loss history (``TextureResult``).

    Raises:
        ValueError: an unknown optimizer, bad scales, or weights for unknown layers.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"viz.texture.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not scales or any(not 0 < s <= 1 for s in scales) or list(scales) != sorted(scales):
        raise ValueError(f"viz.texture.scales must increase within (0, 1], got {list(scales)}")
    if steps < 1:
        raise ValueError(f"viz.texture.steps must be >= 1, got {steps}")
    if layer_weights is not None:
        unknown = set(layer_weights) - set(taps.layers)
        if unknown:
            raise ValueError(
                f"viz.texture.layer_weights names layers that are not matched: {sorted(unknown)} "
                f"(layers: {taps.layers})"
            )
        layer_weights = {n: float(layer_weights.get(n, 1.0)) for n in taps.layers}
    device = next(iter(taps.parameters())).device
    exemplar = _as_float_image(target).to(device)
    full = tuple(size) if size is not None else tuple(exemplar.shape[-2:])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result = TextureResult(image=torch.empty(0))
    x: torch.Tensor | None = None
    for scale in scales:
        hw = (max(1, round(full[0] * scale)), max(1, round(full[1] * scale)))
        t_hw = (
            max(1, round(exemplar.shape[-2] * scale)),
            max(1, round(exemplar.shape[-1] * scale)),
        )
        with torch.no_grad():
            targets = gram_matrices(taps(_resize(exemplar, t_hw)))
        if x is None:
            start = _as_float_image(init).to(device) if init is not None else None
            if start is None:
                start = torch.rand((1, 3, *hw), generator=gen).to(device)
            x = _resize(start, hw).clamp(0, 1)
        else:
            x = _resize(x, hw).clamp(0, 1)
        result.scale_starts.append(len(result.losses))
        result.sizes.append(hw)
        bar = f"{desc} {hw[0]}x{hw[1]}" if desc else None
        x = _optimize(taps, x, targets, layer_weights, optimizer, steps, lr, result.losses, bar)
    assert x is not None
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
    losses: list[float],
    desc: str | None = None,
) -> torch.Tensor:
    """Runs ``steps`` iterations from ``x`` (1, 3, H, W) in [0, 1]; returns the result.

    Adam steps the pixels and clamps them into [0, 1] after each step. L-BFGS optimizes
    logits z with I = sigmoid(z) instead, an unconstrained problem: a projection after each
    step would make its curvature pairs (step, change of gradient) inconsistent.
    """
    if optimizer == "lbfgs":
        eps = 1e-3
        param = torch.logit(x.detach().clamp(eps, 1 - eps)).requires_grad_(True)
        # One iteration per call, but a full line search in it (max_eval defaults to
        # max_iter * 5 // 4 = 1, which leaves the line search no evaluation). No
        # tolerance-based stop: the pixel gradients of the (relative, location-averaged) loss
        # shrink with the image size and fall below the default 1e-7 at 64x64 already.
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            [param],
            lr=lr or 1.0,
            max_iter=1,
            max_eval=25,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

        def image() -> torch.Tensor:
            return torch.sigmoid(param)
    else:
        param = x.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=lr or 0.02)

        def image() -> torch.Tensor:
            return param

    def objective() -> torch.Tensor:
        return gram_loss(gram_matrices(taps(image())), targets, weights).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        # One iteration per call (L-BFGS keeps its curvature history in its state), so that
        # every iteration's loss is recorded.
        loss = opt.step(closure)
        losses.append(float(loss.detach()))
        if optimizer == "adam":
            with torch.no_grad():
                param.clamp_(0, 1)
    with torch.no_grad():
        final = float(objective())
    if math.isfinite(final):
        losses.append(final)
    return image().detach()
