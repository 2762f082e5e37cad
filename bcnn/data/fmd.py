"""Flickr Material Database: 10 materials x 100 images, no official split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge, Interval

from bcnn.data.base import FileDataset, Record, Splits, class_folders
from bcnn.data.source import DatasetSource
from bcnn.limits import checked


class FMD(FileDataset):
    """FMD with a seeded per-class train/test split (docs/datasets.md).

    Trial ``t`` shuffles each class with a generator seeded by ``(t, class index)``; the
    first ``train_fraction`` is the train half. Only ``*.jpg`` files directly under
    ``image/<material>/`` count: the archive also holds masks, scripts and ``Thumbs.db``.

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
        classes = class_folders(image_dir)
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
