"""DenseNet-201 backbone (the 1920-channel comparison model of the second-order papers)."""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from bcnn.limits import checked
from bcnn.models.backbones.base import Backbone, WeightsFile, torchvision_download
from bcnn.models.inputs import IMAGENET

# torchvision's own DenseNet checkpoints still use the pre-1.0 layer names
# ("denselayer1.norm.1.weight" for "denselayer1.norm1.weight"); torchvision renames them
# with this pattern when it loads them, and so do we for a local copy of that file.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = _LEGACY_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


class DenseNet201(Backbone):
    """torchvision DenseNet-201 ``features`` plus the final ReLU: (B, 1920, H/32, W/32).

    At 448 the map is 14x14x1920: reduce it with ``pooling.proj_dim`` (128 or 256 in the
    public code) before second-order pooling, or the descriptor has 3.7M dimensions.

    Args:
        pretrained: Load torchvision's ImageNet weights (``IMAGENET1K_V1``).
        weights: A local state dict or ``.safetensors`` file instead (torchvision's
            ``densenet201-c1103571.pth`` loads as it is).
    """

    @checked
    def __init__(self, pretrained: bool = False, weights: WeightsFile | None = None) -> None:
        super().__init__()
        if pretrained:
            tv_weights = torchvision.models.DenseNet201_Weights.IMAGENET1K_V1
            with torchvision_download("DenseNet-201 (torchvision)", tv_weights):
                net = torchvision.models.densenet201(weights=tv_weights)
        else:
            net = torchvision.models.densenet201()
        self.features = net.features
        # torchvision applies this ReLU in DenseNet.forward, after features' last BatchNorm.
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = int(net.classifier.in_features)
        self.input_spec = IMAGENET
        self.load_weights_file(weights, remap=_rename_legacy_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1920, H / 32, W / 32)."""
        return self.relu(self.features(x))
