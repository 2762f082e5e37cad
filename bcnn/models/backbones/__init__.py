"""Backbones: image (B, 3, H, W) -> feature map (B, C, H', W') (or a pair of maps)."""

from bcnn.models.backbones.base import Backbone, InputAdapter, WeightsUnavailableError
from bcnn.models.backbones.densenet import DenseNet201
from bcnn.models.backbones.small import SmallCNN
from bcnn.models.backbones.timm_backbone import TimmBackbone
from bcnn.models.backbones.two_stream import TwoStream, align_maps
from bcnn.models.backbones.vgg import VGG16, VGG16FC7, VGGM, VGGMFC7

__all__ = [
    "VGG16",
    "VGG16FC7",
    "VGGM",
    "VGGMFC7",
    "Backbone",
    "DenseNet201",
    "InputAdapter",
    "SmallCNN",
    "TimmBackbone",
    "TwoStream",
    "WeightsUnavailableError",
    "align_maps",
]
