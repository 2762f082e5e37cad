"""Hydra callbacks (configured under ``hydra.callbacks`` in ``configs/train.yaml``)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bcnn.reproduce.collect import summarize_sweep

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """After a ``-m`` sweep, gathers every job's results into ``summary.{csv,md}``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Writes the summary into the sweep directory."""
        sweep_dir = config.hydra.sweep.dir
        table = summarize_sweep(sweep_dir)
        log.info("Sweep summary of %d jobs: %s/summary.md", len(table), sweep_dir)
