"""The input convention a backbone declares, and the model's own input normalization.

Datasets hand over uint8 images (or floats in [0, 1]); the model converts them to what
its backbone was trained with. ``InputSpec`` describes that convention; ``InputNormalizer``
applies it on the model's device, with its constants as non-persistent buffers (they
follow ``.to(device)`` but are not weights: a state dict never carries them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """How a backbone expects its input tensors.

    Attributes:
        mean: Per-channel mean subtracted after scaling, in the order of ``color``.
        std: Per-channel divisor applied after the mean.
        color: ``"RGB"`` or ``"BGR"`` channel order.
        scale: ``1.0`` for pixel values in [0, 1], ``255.0`` for [0, 255] (MatConvNet).
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = "RGB"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "BGR"):
            raise ValueError(f"InputSpec.color must be 'RGB' or 'BGR', got {self.color!r}")
        if self.scale not in (1.0, 255.0):
            raise ValueError(f"InputSpec.scale must be 1.0 or 255.0, got {self.scale}")


IMAGENET = InputSpec()


class InputNormalizer(nn.Module):
    """uint8 images, or floats in [0, 1], -> the backbone's float convention.

    ``(v * scale - mean) / std`` of the pixel value v in [0, 1], channels swapped first for
    ``BGR``, computed as one multiply-add per element with per-channel constants.

    Args:
        spec: The backbone's input convention.
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer(
            "pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 (0-255) or float ([0, 1]) -> (B, 3, H, W) float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.spec.color == "BGR":
            images = images.flip(1)  # on the uint8 data: 4x fewer bytes than after conversion
        pixel_range = 255.0 if images.dtype == torch.uint8 else 1.0
        weight = self.spec.scale / pixel_range / self.pixel_std
        bias = -self.pixel_mean / self.pixel_std
        return torch.addcmul(bias, images.float(), weight)

    def extra_repr(self) -> str:
        return str(self.spec)
