"""MIT Indoor 67: 67 scene categories, official lists of 80 train / 20 test per class.

Split protocol: ``TrainImages.txt`` (5,360) and ``TestImages.txt`` (1,340). ``trainval``
is all of ``TrainImages`` (what B-CNN trains on), ``train``/``val`` carve a stratified
``val_fraction`` of it, ``test`` is ``TestImages``. Images of the archive that neither
list names (about 9,000) are ignored.
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


class MITIndoor67(RecordDataset):
    """MIT Indoor 67 from its two list files.

    List lines are ``<category>/<file>.jpg`` relative to ``Images/``. Classes are the
    sorted category names of the two lists (the dataset's own spellings such as
    ``stairscase`` and ``kindergarden``).

    Args:
        root: ``data/mit_indoor`` holding ``TrainImages.txt``, ``TestImages.txt`` and
            ``Images/`` (or Kaggle's ``indoorCVPR_09/Images/``).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of ``TrainImages`` held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).

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
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        source = SOURCES["mit_indoor"]
        folder = find_dataset_dir(root, "TrainImages.txt", (".", "indoorCVPR_09"))
        images = next(
            (d for d in ("Images", "indoorCVPR_09/Images") if folder and (folder / d).is_dir()),
            "Images",
        )
        lists = ["TrainImages.txt", "TestImages.txt"]
        folder = require_files(
            folder, [*lists, images], source.title, source.how_to_obtain(), source.layout
        )

        train, test = ([row[0] for row in read_rows(folder / name, 0)] for name in lists)
        classes = sorted({p.split("/", 1)[0] for p in (*train, *test)})
        index = {name: i for i, name in enumerate(classes)}
        train_records, test_records = (
            [Record(f"{images}/{p}", index[p.split("/", 1)[0]]) for p in paths]
            for paths in (train, test)
        )
        records = select_split(
            split,
            train=train_records,
            test=test_records,
            val_fraction=val_fraction,
            val_seed=val_seed,
        )
        super().__init__(folder, records, classes, transform, augment, on_bad_image)
