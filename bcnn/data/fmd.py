"""Flickr Material Database: 10 materials x 100 images, no official split.

Split protocol: the usual random per-class halves. Trial ``t`` shuffles each class with
its own generator seeded by ``(t, class index)`` and puts the first ``train_fraction``
(50 of 100) in the official-train half and the rest in ``test``. ``trainval`` is the
train half, ``train``/``val`` carve a stratified ``val_fraction`` of it. Papers report
mean and standard deviation over trials (usually 10); the trainer's saved sample lists
record each trial's split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from bcnn.data.base import (
    Record,
    RecordDataset,
    check_options,
    find_dataset_dir,
    require_files,
    select_split,
)
from bcnn.data.download import SOURCES


class FMD(RecordDataset):
    """FMD with a seeded per-class train/test split.

    Only ``*.jpg`` files directly under ``image/<material>/`` are used: the archive also
    holds masks, MATLAB scripts and ``Thumbs.db`` files. Classes are the sorted material
    folder names.

    Args:
        root: ``data/fmd`` (holding ``image/``).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the train half held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        trial: Seed of the train/test split (trials 1-10 in the usual protocol).
        train_fraction: Share of each class in the train half (0.5: 50 of 100).

    Raises:
        FileNotFoundError: ``image/`` is missing.
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
        trial: int = 1,
        train_fraction: float = 0.5,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"FMD train_fraction must be in (0, 1), got {train_fraction}")
        source = SOURCES["fmd"]
        folder = find_dataset_dir(root, "image", (".", "FMD"))
        folder = require_files(
            folder, ["image"], source.title, source.how_to_obtain(), source.layout
        )

        image_dir = folder / "image"
        classes = sorted(
            d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        train: list[Record] = []
        test: list[Record] = []
        for label, name in enumerate(classes):
            files = sorted(
                f.name
                for f in (image_dir / name).iterdir()
                if f.suffix.lower() == ".jpg" and not f.name.startswith(".") and f.is_file()
            )
            order = np.random.default_rng([int(trial), label]).permutation(len(files))
            n_train = int(train_fraction * len(files) + 0.5)
            records = [Record(f"image/{name}/{files[j]}", label) for j in order]
            train += sorted(records[:n_train])
            test += sorted(records[n_train:])
        records = select_split(
            split, train=train, test=test, val_fraction=val_fraction, val_seed=val_seed
        )
        super().__init__(folder, records, classes, transform, augment, on_bad_image)
        self.trial = int(trial)
