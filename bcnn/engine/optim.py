"""Optimizers and learning-rate schedules of one stage."""

from __future__ import annotations

import torch

from bcnn.config import StageConfig
from bcnn.models import BilinearModel


def build_optimizer(
    model: BilinearModel, stage: StageConfig, train_backbone: bool
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the stage's trainable parameter groups.

    Args:
        model: The model; its ``param_groups`` gives head and backbone groups.
        stage: The stage's settings (``optimizer``, ``lr``, ``backbone_lr``, ...).
        train_backbone: Include the backbone (fine-tuning) or not (linear stage).
    """
    groups = model.param_groups(stage.lr, stage.backbone_lr if train_backbone else None)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay
        )
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


def _constant(_: int) -> float:
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``constant``, ``cosine`` (to 0 over the stage) or ``step``."""
    if stage.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage.epochs)
    if stage.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, stage.step_size, gamma=stage.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
