"""The assembled model: backbone -> pooling -> normalization -> classifier."""

from __future__ import annotations

import torch
from torch import nn

from bcnn.models.backbones.base import Backbone
from bcnn.models.normalization import NormalizationChain
from bcnn.models.pooling import PoolingHead


class BilinearModel(nn.Module):
    """A second-order (or first-order baseline) classification model.

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

    @property
    def input_spec(self):
        """The pixel convention the backbone expects (see ``bcnn.data.InputSpec``)."""
        return self.backbone.input_spec

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalized descriptors (B, D).

        Matrix heads give float32 (matrix steps run with autocast off); with a classifier
        that reads matrices (``wants_matrix``) the descriptor is the normalized matrix
        (B, d1, d2).
        """
        return self.normalization(self.pooling(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (B, num_classes)."""
        return self.classifier(self.features(x))

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
            A list of ``{"params", "lr", "name"}`` dicts for ``torch.optim``, without empty
            groups. The 1x1 projection of the pooling head (``pooling.proj_dim``), when
            there is one, is its own group ``"proj"`` at ``lr * pooling.proj_lr_scale``.
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
