"""Model assembly from the composed Hydra config."""

from __future__ import annotations

from hydra.utils import get_object
from omegaconf import DictConfig

from bcnn.config import instantiate
from bcnn.models.model import BilinearModel


def build_model(cfg: DictConfig, num_classes: int) -> BilinearModel:
    """Assembles backbone, pooling head, normalization chain and classifier.

    The pooling head gets ``in_channels`` from the backbone (a pair for two-stream
    backbones), the classifier ``in_features`` from the chain: the descriptor length, or,
    for classifiers that read the matrix (``wants_matrix = True``, e.g. ``lowrank``), the
    pooled matrix size, in which case the chain keeps the matrix (``keep_matrix``).
    Combinations that cannot work (matrix steps after a vector pooling, matrix functions on
    a two-stream x_a x_b^T, a matrix classifier after a vector pooling) raise a
    ``ValueError`` saying what to change before any weights are trained.

    Args:
        cfg: The composed config; reads its ``backbone``, ``pooling``, ``normalization``
            and ``classifier`` nodes (each with a ``_target_``).
        num_classes: Output size of the classifier.

    Returns:
        A ``BilinearModel`` whose ``forward`` gives logits (B, num_classes) and whose
        ``features`` gives the normalized descriptor (B, D) (or (B, d1, d2)).
    """
    backbone = instantiate(cfg.backbone)
    pooling = instantiate(cfg.pooling, in_channels=backbone.out_channels)
    wants_matrix = bool(getattr(get_object(cfg.classifier._target_), "wants_matrix", False))
    normalization = instantiate(cfg.normalization, keep_matrix=wants_matrix)
    dim = normalization.out_dim(pooling.out_dim, pooling.is_matrix)
    classifier = instantiate(
        cfg.classifier,
        in_features=pooling.out_dim if wants_matrix else dim,
        num_classes=num_classes,
    )
    return BilinearModel(backbone, pooling, normalization, classifier)


__all__ = ["BilinearModel", "build_model"]
