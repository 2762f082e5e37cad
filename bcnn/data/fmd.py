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
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge, Interval

from bcnn.data.base import FileDataset, Record, Splits
from bcnn.data.source import DatasetSource
from bcnn.limits import checked


class FMD(FileDataset):
    """FMD with a seeded per-class train/test split.

    Only ``*.jpg`` files directly under ``image/<material>/`` are used: the archive also
    holds masks, MATLAB scripts and ``Thumbs.db`` files. Classes are the sorted material
    folder names.

    Args:
        root: ``data/fmd`` (holding ``image/``).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        trial: Seed of the train/test split (trials 1-10 in the usual protocol).
        train_fraction: Share of each class in the train half (0.5: 50 of 100).
        **common: The options of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource.named("fmd")
    folders = (".", "FMD")
    files = ("image",)

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        trial: Annotated[int, Ge(1)] = 1,
        train_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
        **common: Any,
    ) -> None:
        self.trial, self.train_fraction = int(trial), train_fraction
        super().__init__(root, split, **common)

    def parse(self, folder: Path) -> Splits:
        """Lists each material's images and splits them with the trial's generators."""
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
            order = np.random.default_rng([self.trial, label]).permutation(len(files))
            n_train = int(self.train_fraction * len(files) + 0.5)
            records = [Record(f"image/{name}/{files[j]}", label) for j in order]
            train += sorted(records[:n_train])
            test += sorted(records[n_train:])
        return Splits(classes, train, test)
