"""Metric loggers. ``metrics.csv`` and ``curves.png`` are always written; wandb is optional."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bcnn.engine.curves import plot_training_curves

log = logging.getLogger(__name__)

COLUMNS = (
    "stage",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc",
    "val_mean_class_acc",
    "seconds",
)


class CSVLogger:
    """Writes one row per stage and epoch to ``<output_dir>/metrics.csv``; on ``close``,
    draws the training curves into ``<output_dir>/curves.png``.

    Args:
        output_dir: The run directory.
        run_config: The resolved config (unused here; other loggers record it).
    """

    def __init__(self, output_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(output_dir) / "metrics.csv"
        self.curves = Path(output_dir) / "curves.png"

    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rewrites the file with ``rows`` (the history a resumed checkpoint carries)."""
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Appends one epoch's metrics (keys: ``COLUMNS``)."""
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in COLUMNS})

    def log_summary(self, results: Mapping[str, Any]) -> None:
        """Records the final results (the CSV logger leaves them to results.json)."""

    def close(self) -> None:
        """Draws ``curves.png`` from the rows written so far."""
        if self.path.exists():
            plot_training_curves(self.path, self.curves)


class WandbLogger(CSVLogger):
    """Weights & Biases logging on top of ``metrics.csv``; offline unless configured.

    Args:
        output_dir: The run directory; wandb's files go under it.
        run_config: The resolved config, recorded by wandb.
        project: wandb project name.
        entity: wandb entity (team or user); ``None`` uses the account's default.
        mode: ``offline`` (default: nothing leaves the machine), ``online`` or ``disabled``.
        tags: Run tags.
    """

    def __init__(
        self,
        output_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        project: str = "bcnn",
        entity: str | None = None,
        mode: str = "offline",
        tags: Sequence[str] = (),
    ) -> None:
        super().__init__(output_dir, run_config)
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "logger=wandb needs the wandb package: pip install 'bcnn[wandb]' "
                "(or use the default logger=csv)"
            ) from err
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            tags=list(tags),
            dir=str(output_dir),
            config=dict(run_config or {}),
            resume="allow",
        )

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        super().log_epoch(row)
        stage = row["stage"]
        self.run.log({f"{stage}/{k}": v for k, v in row.items() if k != "stage"})

    def log_summary(self, results: Mapping[str, Any]) -> None:
        for key, value in results.items():
            if isinstance(value, (int, float)):
                self.run.summary[key] = value

    def close(self) -> None:
        super().close()
        self.run.finish()
