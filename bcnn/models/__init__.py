"""Model assembly from the composed Hydra config."""

from __future__ import annotations

from omegaconf import DictConfig

from bcnn.errors import instantiate
from bcnn.models.model import BilinearModel


def build_model(cfg: DictConfig, num_classes: int) -> BilinearModel:
    """Assembles backbone, pooling head, normalization chain and classifier.

    The pooling head gets ``in_channels`` from the backbone (a pair for two streams), the
    classifier ``in_features``, the shape the chain gives. Combinations that cannot work
    raise a ``ValueError`` naming the config key and the fix before any training.

    Args:
        cfg: The composed config; reads its ``backbone``, ``pooling``, ``normalization``
            and ``classifier`` nodes.
        num_classes: Output size of the classifier.

    Returns:
        A ``BilinearModel``: uint8 or [0, 1] images (B, 3, H, W) -> logits (B, num_classes).
    """
    backbone = instantiate(cfg.backbone)
    pooling = instantiate(cfg.pooling, in_channels=backbone.out_channels)
    normalization = instantiate(cfg.normalization)
    shape = normalization.output_shape(pooling.output_shape)
    classifier = instantiate(cfg.classifier, in_features=shape, num_classes=num_classes)
    return BilinearModel(backbone, pooling, normalization, classifier)


__all__ = ["BilinearModel", "build_model"]
