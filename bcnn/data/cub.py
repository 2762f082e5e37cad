"""CUB-200-2011 (Caltech-UCSD Birds): 200 species, 11,788 images (5,994 train / 5,794 test).

Split protocol: the official ``train_test_split.txt``. ``trainval`` is the whole
official train set (what the B-CNN papers train on), ``train``/``val`` carve a stratified
``val_fraction`` of it for model selection, ``test`` is the official test set.
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


class CUB200(RecordDataset):
    """CUB-200-2011, parsed from its list files and joined on image id.

    Labels are ``class_id - 1`` from ``image_class_labels.txt``; ``classes`` holds the
    names of ``classes.txt`` without their ``NNN.`` prefix, in class-id order.

    Args:
        root: ``data/cub`` (holding ``CUB_200_2011/``) or ``CUB_200_2011/`` itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the official train set held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        bbox_crop: Crop every image to its ``bounding_boxes.txt`` box (``x y w h``).

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
        bbox_crop: bool = False,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        source = SOURCES["cub"]
        folder = find_dataset_dir(root, "images.txt", ("CUB_200_2011", "."))
        lists = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
        extra = ["bounding_boxes.txt"] if bbox_crop else []
        folder = require_files(
            folder, [*lists, *extra, "images"], source.title, source.how_to_obtain(), source.layout
        )

        paths = dict(read_rows(folder / "images.txt", 1))
        labels = {i: int(c) - 1 for i, c in read_rows(folder / "image_class_labels.txt")}
        is_train = {i: flag == "1" for i, flag in read_rows(folder / "train_test_split.txt")}
        class_rows = sorted(read_rows(folder / "classes.txt", 1), key=lambda row: int(row[0]))
        boxes = {}
        if bbox_crop:
            for i, x, y, w, h in read_rows(folder / "bounding_boxes.txt"):
                x, y, w, h = float(x), float(y), float(w), float(h)
                boxes[i] = (x, y, x + w, y + h)
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            if missing := paths.keys() - table.keys():
                raise ValueError(
                    f"CUB-200-2011: {folder / name} has no row for image id {min(missing)}"
                )

        records = {i: Record(f"images/{p}", labels[i], boxes.get(i)) for i, p in paths.items()}
        records = select_split(
            split,
            train=[r for i, r in records.items() if is_train[i]],
            test=[r for i, r in records.items() if not is_train[i]],
            val_fraction=val_fraction,
            val_seed=val_seed,
        )
        classes = [name.split(".", 1)[-1] for _, name in class_rows]
        super().__init__(folder, records, classes, transform, augment, on_bad_image, box_crop=bbox_crop)
