"""Stanford Cars: 196 classes, 16,185 images (8,144 train / 8,041 test).

Split protocol: the official train/test split. ``trainval`` is the whole official train
set, ``train``/``val`` carve a stratified ``val_fraction`` of it, ``test`` is the
official test set (labels from ``cars_test_annos_withlabels.mat`` or the ``test`` flag
of ``cars_annos.mat``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bcnn.data.base import Record, RecordDataset, check_options, require_files, select_split
from bcnn.data.download import SOURCES

TEST_LABELS = "cars_test_annos_withlabels.mat"


def _load_mat(path: Path, key: str) -> np.ndarray:
    """Loads one variable of a MATLAB file as a 1-D array (structs become record arrays)."""
    from scipy.io import loadmat  # scipy is only needed by this dataset

    return np.atleast_1d(loadmat(path, squeeze_me=True)[key])


def _box(entry: np.void) -> tuple[float, float, float, float]:
    # MATLAB boxes are 1-based and inclusive.
    return (
        float(entry["bbox_x1"]) - 1,
        float(entry["bbox_y1"]) - 1,
        float(entry["bbox_x2"]),
        float(entry["bbox_y2"]),
    )


class StanfordCars(RecordDataset):
    """Stanford Cars from either of its two published layouts, detected automatically.

    * ``devkit`` (torchvision, TFDS): ``cars_train/``, ``cars_test/``,
      ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat`` and the test labels in
      ``cars_test_annos_withlabels.mat`` at the root or in ``devkit/``. Kaggle's doubled
      ``cars_train/cars_train/`` folders are accepted as they are.
    * ``car_ims`` (the B-CNN authors): ``car_ims/`` plus ``cars_annos.mat``, whose
      ``test`` field gives the split.

    ``.mat`` struct fields are read by name, so both layouts share one parser. Labels are
    ``class - 1``; ``classes`` are the ``class_names`` of the ``.mat`` files.

    Args:
        root: ``data/cars``.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the official train set held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        bbox_crop: Crop every image to its annotated box.

    Attributes:
        layout: ``"devkit"`` or ``"car_ims"``, the layout found.

    Raises:
        FileNotFoundError: Neither layout is complete under ``root``.
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
        bbox_crop: bool = False,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        source = SOURCES["cars"]
        folder = None if root is None else Path(root)
        if folder is not None and (folder / "cars_annos.mat").is_file():
            self.layout = "car_ims"
            require_files(folder, ["car_ims"], source.title, source.how_to_obtain(), source.layout)
            entries = _load_mat(folder / "cars_annos.mat", "annotations")
            classes = [str(c) for c in _load_mat(folder / "cars_annos.mat", "class_names")]
            records = [
                Record(str(e["relative_im_path"]), int(e["class"]) - 1, _box(e)) for e in entries
            ]
            is_test = [bool(e["test"]) for e in entries]
            train = [r for r, t in zip(records, is_test) if not t]
            test = [r for r, t in zip(records, is_test) if t]
        else:
            self.layout = "devkit"
            test_labels = next(
                (
                    p
                    for p in (TEST_LABELS, f"devkit/{TEST_LABELS}")
                    if folder and (folder / p).is_file()
                ),
                TEST_LABELS,
            )
            meta, train_annos = "devkit/cars_meta.mat", "devkit/cars_train_annos.mat"
            folder = require_files(
                folder,
                [meta, train_annos, test_labels, "cars_train", "cars_test"],
                source.title,
                source.how_to_obtain(),
                source.layout,
            )
            classes = [str(c) for c in _load_mat(folder / meta, "class_names")]
            train = self._devkit_records(folder, train_annos, "cars_train")
            test = self._devkit_records(folder, test_labels, "cars_test")
        records = select_split(
            split, train=train, test=test, val_fraction=val_fraction, val_seed=val_seed
        )
        super().__init__(folder, records, classes, transform, augment, on_bad_image, box_crop=bbox_crop)

    @staticmethod
    def _devkit_records(folder: Path, annos: str, image_dir: str) -> list[Record]:
        # Kaggle's copy nests every image folder twice.
        if (folder / image_dir / image_dir).is_dir():
            image_dir = f"{image_dir}/{image_dir}"
        entries = _load_mat(folder / annos, "annotations")
        if "class" not in (entries.dtype.names or ()):
            raise ValueError(
                f"Stanford Cars: {folder / annos} has no 'class' field "
                "(the test labels are in cars_test_annos_withlabels.mat)"
            )
        return [Record(f"{image_dir}/{e['fname']}", int(e["class"]) - 1, _box(e)) for e in entries]
