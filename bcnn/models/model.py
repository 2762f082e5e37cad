"""The assembled model: images -> input normalization -> backbone -> pooling -> chain ->
classifier."""

from __future__ import annotations

import torch
from torch import nn

from bcnn.models.backbones.base import Backbone
from bcnn.models.inputs import InputNormalizer, InputSpec
from bcnn.models.normalization import NormalizationChain
from bcnn.models.pooling import BilinearPool, Features, PoolingHead, bilinear, locations
from bcnn.models.shapes import FeatureShape


class BilinearModel(nn.Module):
    """A second-order (or first-order baseline) classification model.

    It takes uint8 images (B, 3, H, W) or floats in [0, 1] and normalizes them for its
    backbone itself (``input_norm``). After ``freeze_backbone()`` the backbone gets no
    gradient and stays in eval mode (frozen batch-norm statistics) whatever ``train()`` says.

    Attributes:
        channels_last: Convert the normalized images to channels-last memory format (set
            together with ``model.to(memory_format=torch.channels_last)``).

    Args:
        backbone: Feature extractor (declares ``out_channels`` and ``input_spec``).
        pooling: Pooling head applied to the feature map.
        normalization: Normalization chain turning the pooled output into the descriptor.
        classifier: Module mapping descriptors to logits (B, num_classes).
    """

    def __init__(
        self,
        backbone: Backbone,
        pooling: PoolingHead,
        normalization: NormalizationChain,
        classifier: nn.Module,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalization = normalization
        self.classifier = classifier
        self.input_norm = InputNormalizer(backbone.input_spec)
        self.backbone_frozen = False
        self.channels_last = False

    @property
    def descriptor_shape(self) -> FeatureShape:
        """Per-sample shape of ``features``' output (what the classifier reads)."""
        return self.normalization.output_shape(self.pooling.output_shape)

    @property
    def input_spec(self) -> InputSpec:
        """The pixel convention the backbone expects."""
        return self.backbone.input_spec

    def set_input_spec(self, spec: InputSpec) -> None:
        """Adopts another input convention (a trained checkpoint's), for the whole model."""
        self.backbone.input_spec = spec
        self.input_norm = InputNormalizer(spec).to(self.input_norm.pixel_mean.device)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freezes (or unfreezes) the backbone: no gradients, and eval mode while frozen."""
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> BilinearModel:
        """Sets training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) or float in [0, 1] -> the backbone's float convention."""
        x = self.input_norm(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or float in [0, 1] -> descriptors (B, D), or the
        normalized matrices (B, d1, d2) for a chain without ``vectorize``; float32 after
        matrix steps."""
        return self.head(self.backbone(self.normalize_input(images)))

    def head(self, fmap: Features) -> torch.Tensor:
        """Pooling, then the normalization chain: backbone map(s) -> descriptor.

        Sum pooling followed by a matrix function goes through the n x n Gram matrix of the
        n locations where that is cheaper and equal in value and gradient (fewer locations
        than channels; ``MatrixStep.small_side``).
        """
        step = self.normalization.leading_matrix_step()
        if step is None or type(self.pooling) is not BilinearPool or len(self.pooling.channels) > 1:
            return self.normalization(self.pooling(fmap))
        (x,) = self.pooling.streams(fmap)
        route = step.small_side(x.shape[2] * x.shape[3], x.shape[1], x.device.type)
        if route is None:
            return self.normalization(bilinear(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            feats = locations(x)
            feats = feats if feats.dtype == torch.float64 else feats.float()
            return self.normalization(route(feats), start=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or float in [0, 1] -> logits (B, num_classes)."""
        return self.classifier(self.features(images))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in the linear stage: everything except the backbone."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    def param_groups(self, lr: float, backbone_lr: float | None) -> list[dict]:
        """Optimizer parameter groups: backbone, pooling projection, head.

        Args:
            lr: Learning rate of the head (everything after the backbone).
            backbone_lr: Learning rate of the backbone; ``None`` leaves it out (frozen).

        Returns:
            ``{"params", "lr", "name"}`` dicts for ``torch.optim``, without empty groups;
            the pooling's projection is group ``"proj"`` at ``lr * pooling.proj_lr_scale``.
        """
        proj = self.pooling.projection_parameters()
        proj_ids = {id(p) for p in proj}
        head = [p for p in self.head_parameters() if id(p) not in proj_ids]
        groups = [
            {"params": proj, "lr": lr * self.pooling.proj_lr_scale, "name": "proj"},
            {"params": head, "lr": lr, "name": "head"},
        ]
        if backbone_lr is not None:
            groups.insert(
                0,
                {"params": list(self.backbone.parameters()), "lr": backbone_lr, "name": "backbone"},
            )
        return [g for g in groups if g["params"]]
