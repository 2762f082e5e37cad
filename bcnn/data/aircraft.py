"""FGVC-Aircraft 2013b: 100 variants / 70 families / 30 manufacturers, official splits.

The dataset ships its own val set: ``train``/``val`` are the official lists
(``val_fraction`` is unused) and ``trainval`` their union, what B-CNN trains on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge
from PIL import Image

from bcnn.data.base import Box, FileDataset, Record, Splits, read_rows
from bcnn.data.source import DatasetSource
from bcnn.limits import checked

CLASS_FILES = {
    "variant": "variants.txt",
    "family": "families.txt",
    "manufacturer": "manufacturers.txt",
}


class FGVCAircraft(FileDataset):
    """FGVC-Aircraft at one annotation level, with the copyright banner cropped off.

    Image ids stay strings (leading zeros matter); lines are split once because class
    names hold spaces and ``/`` (``F/A-18``). Classes are in the order of the level's
    class file, as in torchvision. The banner is cropped first, then the box.

    Args:
        root: ``data/aircraft`` (holding ``fgvc-aircraft-2013b/data``) or the ``data``
            folder itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        level: ``variant`` (100 classes), ``family`` (70) or ``manufacturer`` (30).
        crop_banner: Remove the bottom ``banner_height`` pixels of every image.
        banner_height: Height of the banner in pixels.
        **common: The options of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource.named("aircraft")
    folders = ("fgvc-aircraft-2013b/data", "data", ".")
    box_file = "images_box.txt"

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        level: Literal["variant", "family", "manufacturer"] = "variant",
        crop_banner: bool = True,
        banner_height: Annotated[int, Ge(0)] = 20,
        **common: Any,
    ) -> None:
        self.level, self.crop_banner, self.banner_height = level, crop_banner, banner_height
        super().__init__(root, split, **common)

    def required_files(self, folder: Path | None) -> list[str]:
        """The level's class file (first: it marks the folder), its three lists, boxes."""
        lists = [f"images_{self.level}_{s}.txt" for s in ("train", "val", "test")]
        return [CLASS_FILES[self.level], *lists, *super().required_files(folder), "images"]

    def parse(self, folder: Path) -> Splits:
        """Reads the level's class file and its official train/val/test lists."""
        classes = [row[0] for row in read_rows(folder / CLASS_FILES[self.level], 0)]
        index = {name: i for i, name in enumerate(classes)}
        boxes: dict[str, Box] = {}
        if self.box_crop:
            # images_box.txt is 1-based and inclusive (top-left pixel is (1, 1)).
            for image_id, x1, y1, x2, y2 in read_rows(folder / "images_box.txt"):
                boxes[image_id] = (float(x1) - 1, float(y1) - 1, float(x2), float(y2))

        def official(split: str) -> list[Record]:
            path = folder / f"images_{self.level}_{split}.txt"
            records = []
            for image_id, name in read_rows(path, 1):
                if name not in index:
                    raise ValueError(
                        f"FGVC-Aircraft: class {name!r} of {path} is not in "
                        f"{CLASS_FILES[self.level]}"
                    )
                records.append(Record(f"images/{image_id}.jpg", index[name], boxes.get(image_id)))
            return records

        return Splits(classes, official("train"), official("test"), official("val"))

    def crop(self, image: Image.Image, record: Record) -> Image.Image:
        """Removes the bottom banner, then applies the box crop if on."""
        if self.crop_banner and self.banner_height:
            w, h = image.size
            image = image.crop((0, 0, w, max(1, h - self.banner_height)))
        return super().crop(image, record)
