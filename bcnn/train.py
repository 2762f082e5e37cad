"""Hydra entry point: ``python train.py``, ``python -m bcnn.train`` and ``bcnn-train``.

What happens around a run or a sweep is in the Hydra callbacks of ``bcnn.cli.callbacks``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import bcnn.config  # noqa: F401  (registers the structured-config schema)
from bcnn.cli.overrides import check_overrides
from bcnn.engine import train
from bcnn.errors import user_errors

log = logging.getLogger(__name__)
# Validation metrics only: a search never selects on the test split.
OPTIMIZABLE = ("val_acc", "val_mean_class_acc")


def optimized_metric(cfg: DictConfig) -> str:
    """The results key the task function returns: ``hparams_search.optimized_metric``.

    Raises:
        ValueError: the key names anything but a validation metric.
    """
    search = cfg.get("hparams_search")
    name = str(search.get("optimized_metric", "val_acc")) if search else "val_acc"
    if name not in OPTIMIZABLE:
        raise ValueError(
            f"Invalid config value for 'hparams_search.optimized_metric': {name!r}; choose "
            f"one of {OPTIMIZABLE} (tuning on the test split would select on it)"
        )
    return name


def objective(results: Mapping[str, Any], metric: str = "val_acc") -> float:
    """The number a sweep optimizes: ``results[metric]`` in percent, always a number.

    Without a validation split the last epoch's training accuracy (``metrics.csv``) stands
    in, with a warning; NaN when there is none either.
    """
    value = results.get(metric)
    if value is not None and math.isfinite(float(value)):
        return float(value)
    train_acc = math.nan
    metrics = Path(str(results.get("output_dir", ""))) / "metrics.csv"
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train_acc")]
        if rows:
            train_acc = float(rows[-1]["train_acc"])
    log.warning(
        "%s is not available (no validation split: dataset.val_fraction=0); returning the "
        "last epoch's training accuracy %.2f instead, which rewards overfitting: keep a "
        "validation split for hyper-parameter search",
        metric,
        train_acc,
    )
    return train_acc


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    with user_errors("bcnn-train"):
        metric = optimized_metric(cfg)  # before the training, which may take hours
        return objective(train(cfg), metric)


def main() -> None:
    """Trains one configuration, a ``-m`` sweep or an ``hparams_search``."""
    check_overrides("bcnn-train", "train")
    _hydra_main()


if __name__ == "__main__":
    main()
