"""The input convention a backbone declares and the data transforms read."""

from __future__ import annotations

from dataclasses import dataclass


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
