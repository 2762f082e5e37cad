"""Describable Textures Dataset: 47 classes, ten official train/val/test partitions.

Split protocol (docs/datasets.md): ``trainval`` is ``train{k}`` + ``val{k}`` (what B-CNN
trains on), ``test`` is ``test{k}``; papers report the mean over partitions 1-10.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Interval

from bcnn.data.base import FileDataset, Splits, splits_by_folder
from bcnn.data.source import DatasetSource
from bcnn.limits import checked


class DTD(FileDataset):
    """DTD, one partition of its official splits; classes are the sorted folder names.

    Args:
        root: ``data/dtd`` (holding ``dtd/``) or ``dtd/`` itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        partition: Which of the ten official splits, 1-10.
        **common: The options of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource.named("dtd")
    folders = ("dtd", ".")

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        partition: Annotated[int, Interval(ge=1, le=10)] = 1,
        **common: Any,
    ) -> None:
        self.partition = int(partition)
        super().__init__(root, split, **common)

    def _lists(self) -> dict[str, str]:
        return {s: f"labels/{s}{self.partition}.txt" for s in ("train", "val", "test")}

    def required_files(self, folder: Path | None) -> list[str]:
        """The partition's three lists and ``images/``."""
        return [*self._lists().values(), "images"]

    def parse(self, folder: Path) -> Splits:
        """Reads the partition's lists (lines such as ``banded/banded_0002.jpg``)."""
        return splits_by_folder({s: folder / f for s, f in self._lists().items()}, "images")
