"""FGVC-Aircraft 2013b: 10,000 images, 100 variants / 70 families / 30 manufacturers.

Split protocol: the official lists. The dataset ships its own validation set, so
``train`` and ``val`` are the official ``images_<level>_train.txt`` and ``_val.txt``
(``val_fraction``/``val_seed`` are not used), ``trainval`` is their union (what B-CNN
trains on) and ``test`` is ``_test.txt``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from bcnn.data.base import (
    Box,
    Record,
    RecordDataset,
    check_options,
    find_dataset_dir,
    read_rows,
    require_files,
    select_split,
)
from bcnn.data.download import SOURCES

CLASS_FILES = {
    "variant": "variants.txt",
    "family": "families.txt",
    "manufacturer": "manufacturers.txt",
}


class FGVCAircraft(RecordDataset):
    """FGVC-Aircraft at one annotation level, with the photographer banner cropped off.

    Image ids are kept as strings (leading zeros matter) and split lines are parsed with
    ``split(" ", 1)`` because class names hold spaces and ``/`` (``F/A-18``). Classes are
    in the order of the level's class file (``variants.txt``...), as in torchvision.

    Every image carries a 20-pixel copyright banner at the bottom; it is cropped off
    first (``crop_banner``), then the optional box crop is applied, clipped to what is
    left.

    Args:
        root: ``data/aircraft`` (holding ``fgvc-aircraft-2013b/data``) or the ``data``
            folder itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Unused: Aircraft has an official val set. Accepted so every
            dataset has the same signature.
        val_seed: Unused, as ``val_fraction``.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        level: ``variant`` (100 classes), ``family`` (70) or ``manufacturer`` (30).
        crop_banner: Remove the bottom ``banner_height`` pixels of every image.
        banner_height: Height of the banner in pixels.
        bbox_crop: Crop every image to its ``images_box.txt`` box.

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
        level: str = "variant",
        crop_banner: bool = True,
        banner_height: int = 20,
        bbox_crop: bool = False,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        if level not in CLASS_FILES:
            raise ValueError(
                f"FGVCAircraft level must be one of {sorted(CLASS_FILES)}, got {level!r}"
            )
        if banner_height < 0:
            raise ValueError(f"banner_height must be >= 0, got {banner_height}")
        source = SOURCES["aircraft"]
        folder = find_dataset_dir(root, "variants.txt", ("fgvc-aircraft-2013b/data", "data", "."))
        lists = [CLASS_FILES[level], *(f"images_{level}_{s}.txt" for s in ("train", "val", "test"))]
        extra = ["images_box.txt"] if bbox_crop else []
        folder = require_files(
            folder, [*lists, *extra, "images"], source.title, source.how_to_obtain(), source.layout
        )

        classes = [row[0] for row in read_rows(folder / CLASS_FILES[level], 0)]
        index = {name: i for i, name in enumerate(classes)}
        boxes: dict[str, Box] = {}
        if bbox_crop:
            # images_box.txt is 1-based and inclusive (top-left pixel is (1, 1)).
            for image_id, x1, y1, x2, y2 in read_rows(folder / "images_box.txt"):
                boxes[image_id] = (float(x1) - 1, float(y1) - 1, float(x2), float(y2))

        def parse(official: str) -> list[Record]:
            path = folder / f"images_{level}_{official}.txt"
            records = []
            for image_id, name in read_rows(path, 1):
                if name not in index:
                    raise ValueError(
                        f"FGVC-Aircraft: class {name!r} of {path} is not in {CLASS_FILES[level]}"
                    )
                records.append(Record(f"images/{image_id}.jpg", index[name], boxes.get(image_id)))
            return records

        records = select_split(split, train=parse("train"), val=parse("val"), test=parse("test"))
        super().__init__(folder, records, classes, transform, augment, on_bad_image, box_crop=bbox_crop)
        self.level = level
        self.crop_banner = crop_banner
        self.banner_height = banner_height

    def crop(self, image: Image.Image, record: Record) -> Image.Image:
        """Removes the bottom banner, then applies the box crop if on."""
        if self.crop_banner and self.banner_height:
            w, h = image.size
            image = image.crop((0, 0, w, max(1, h - self.banner_height)))
        return super().crop(image, record)
