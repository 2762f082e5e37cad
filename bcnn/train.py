"""Hydra entry point: ``python train.py``, ``python -m bcnn.train`` and ``bcnn-train``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import bcnn.config  # noqa: F401  (registers the structured-config schema)
from bcnn.engine import train


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Trains one configuration; returns the validation accuracy for sweepers."""
    return train(cfg)["val_acc"]


if __name__ == "__main__":
    main()
