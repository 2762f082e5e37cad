"""The training engine: two-stage training, evaluation, checkpoints, logging."""

from bcnn.engine.trainer import train

__all__ = ["train"]
