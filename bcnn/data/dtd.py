"""Describable Textures Dataset: 47 classes x 120 images, ten official partitions.

Split protocol: partition ``k`` (1-10) has official ``train{k}``/``val{k}``/``test{k}``
lists of 40 images per class each. ``train``/``val`` are those lists
(``val_fraction``/``val_seed`` are not used), ``trainval`` is their union (what B-CNN
trains on) and ``test`` is ``test{k}``. Papers report the mean over partitions 1-10.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Interval

from bcnn.data.base import FileDataset, Record, Splits, read_rows
from bcnn.data.source import DatasetSource
from bcnn.limits import checked


class DTD(FileDataset):
    """DTD, one partition of its official splits.

    Classes are the sorted folder names that appear in the partition's three lists.

    Args:
        root: ``data/dtd`` (holding ``dtd/``) or ``dtd/`` itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        partition: Which of the ten official splits, 1-10.
        **common: The options of :class:`~bcnn.data.base.FileDataset` (``val_fraction``
            and ``val_seed`` are unused: DTD has official val lists).
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
        paths = {s: [row[0] for row in read_rows(folder / f, 0)] for s, f in self._lists().items()}
        classes = sorted({p.split("/", 1)[0] for ps in paths.values() for p in ps})
        index = {name: i for i, name in enumerate(classes)}
        official = {
            s: [Record(f"images/{p}", index[p.split("/", 1)[0]]) for p in ps]
            for s, ps in paths.items()
        }
        return Splits(classes, **official)
