"""Datasets, splits and transforms.

A dataset is chosen by its config's Hydra ``_target_`` (``configs/dataset/<name>.yaml``
points at the class, e.g. ``bcnn.data.cub.CUB200``) and built once per split with
``instantiate(cfg.dataset, split=..., augment=...)``. Every loader is a
:class:`~bcnn.data.base.FileDataset`: it declares its source and layout and parses its
own files; the base does the rest (see :mod:`bcnn.data.base`).
"""

from __future__ import annotations

from bcnn.data.base import SPLITS, BadImageError, FileDataset, Record, RecordDataset, Splits

__all__ = ["SPLITS", "BadImageError", "FileDataset", "Record", "RecordDataset", "Splits"]
