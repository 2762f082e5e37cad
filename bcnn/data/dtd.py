"""Describable Textures Dataset: 47 classes x 120 images, ten official partitions.

Split protocol: partition ``k`` (1-10) has official ``train{k}``/``val{k}``/``test{k}``
lists of 40 images per class each. ``train``/``val`` are those lists
(``val_fraction``/``val_seed`` are not used), ``trainval`` is their union (what B-CNN
trains on) and ``test`` is ``test{k}``. Papers report the mean over partitions 1-10.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from bcnn.data.base import (
    Record,
    RecordDataset,
    check_options,
    find_dataset_dir,
    read_rows,
    require_files,
    select_split,
)
from bcnn.data.download import SOURCES


class DTD(RecordDataset):
    """DTD, one partition of its official splits.

    Classes are the sorted folder names that appear in the partition's three lists.

    Args:
        root: ``data/dtd`` (holding ``dtd/``) or ``dtd/`` itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Unused: DTD has official val lists. Accepted so every dataset has
            the same signature.
        val_seed: Unused, as ``val_fraction``.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        partition: Which of the ten official splits, 1-10.

    Raises:
        FileNotFoundError: A list file or the image folder is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        transform: Mapping[str, Any] | Callable[[Image.Image], Any] | None = None,
        augment: bool = False,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        on_bad_image: str = "fail",
        partition: int = 1,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        partition = int(partition)
        if not 1 <= partition <= 10:
            raise ValueError(f"DTD partition must be in 1..10, got {partition}")
        source = SOURCES["dtd"]
        lists = {s: f"labels/{s}{partition}.txt" for s in ("train", "val", "test")}
        folder = find_dataset_dir(root, lists["train"], ("dtd", "."))
        folder = require_files(
            folder, [*lists.values(), "images"], source.title, source.how_to_obtain(), source.layout
        )

        # Lines look like "banded/banded_0002.jpg", relative to images/.
        paths = {s: [row[0] for row in read_rows(folder / f, 0)] for s, f in lists.items()}
        classes = sorted({p.split("/", 1)[0] for ps in paths.values() for p in ps})
        index = {name: i for i, name in enumerate(classes)}
        official = {
            s: [Record(f"images/{p}", index[p.split("/", 1)[0]]) for p in ps]
            for s, ps in paths.items()
        }
        records = select_split(split, **official)
        super().__init__(folder, records, classes, transform, augment, on_bad_image)
        self.partition = partition
