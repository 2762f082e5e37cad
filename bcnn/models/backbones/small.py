"""A small CNN for tests, smoke runs and the built-in synthetic dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import MinLen
from torch import nn

from bcnn.limits import Channels, checked
from bcnn.models.backbones.base import Backbone
from bcnn.models.inputs import InputSpec


class SmallCNN(Backbone):
    """Blocks of 3x3 conv + ReLU with 2x2 max-pooling between them, randomly initialized:
    ``channels=(32, 64)`` maps a 32x32 image to (B, 64, 16, 16).

    Args:
        channels: Output channels of each block.
        batch_norm: Insert BatchNorm after each convolution.
    """

    @checked
    def __init__(
        self,
        channels: Annotated[Sequence[Channels], MinLen(1)] = (32, 64),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = 3
        for i, ch in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.Conv2d(prev, ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.ReLU(inplace=True))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.out_channels = int(channels[-1])
        # Maps the built-in dataset's uint8 encoding round(255 (x / 8 + 1/2)) back to the
        # values x it generated (bcnn.data.synthetic); other [0, 1] images land in [-4, 4].
        self.input_spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.125, 0.125, 0.125))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H / 2^(k-1), W / 2^(k-1)) for k blocks."""
        return self.features(x)
