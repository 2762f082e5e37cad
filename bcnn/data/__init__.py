"""Datasets, splits and transforms (docs/datasets.md).

A dataset is chosen by its config's Hydra ``_target_`` (``bcnn.data.cub.CUB200``) and
built once per split with ``instantiate(cfg.dataset, split=..., augment=...)``.
"""

from __future__ import annotations

from bcnn.data.base import SPLITS, BadImageError, FileDataset, Record, RecordDataset, Splits

__all__ = ["SPLITS", "BadImageError", "FileDataset", "Record", "RecordDataset", "Splits"]
