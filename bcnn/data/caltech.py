"""The Caltech list format shared by CUB-200-2011 and NABirds.

A folder of space-separated list files, all keyed by image id::

    images.txt              <image id> <path below images/>
    image_class_labels.txt  <image id> <class id>
    train_test_split.txt    <image id> <1 = train, 0 = test>
    classes.txt             <class id> <class name, may hold spaces>
    bounding_boxes.txt      <image id> <x> <y> <width> <height>     (optional)

Image ids are strings (CUB numbers them, NABirds uses UUIDs) and every file is joined on
them, never on line order.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bcnn.data.base import Box, FileDataset, Record, Splits, read_rows


class CaltechListDataset(FileDataset):
    """A dataset in the Caltech list format (CUB-200-2011, NABirds).

    Labels index the class ids that images use, sorted numerically: ``class id - 1`` for
    CUB; NABirds' ``classes.txt`` also lists its taxonomy's inner nodes.

    Attributes:
        class_ids: Original class id of each label (``class_ids[label]``).
        node_names: ``class id -> name`` of every line of ``classes.txt``.
    """

    files: ClassVar[tuple[str, ...]] = (
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
    )
    box_file = "bounding_boxes.txt"

    def required_files(self, folder: Path | None) -> list[str]:
        """The list files, the boxes when cropping, and ``images/``."""
        return [*super().required_files(folder), "images"]

    def class_name(self, name: str) -> str:
        """A class's name as shown, from its ``classes.txt`` name."""
        return name

    def parse(self, folder: Path) -> Splits:
        """Joins the lists on image id; an image without a label or split row is an error."""
        paths = dict(read_rows(folder / "images.txt", 1))
        class_of = {i: int(c) for i, c in read_rows(folder / "image_class_labels.txt")}
        is_train = {i: flag == "1" for i, flag in read_rows(folder / "train_test_split.txt")}
        for name, table in (
            ("image_class_labels.txt", class_of),
            ("train_test_split.txt", is_train),
        ):
            if missing := paths.keys() - table.keys():
                raise ValueError(
                    f"{self.source.title}: {folder / name} has no row for image id {min(missing)}"
                )
        boxes: dict[str, Box] = {}
        if self.box_crop:
            for i, x, y, w, h in read_rows(folder / "bounding_boxes.txt"):
                boxes[i] = (float(x), float(y), float(x) + float(w), float(y) + float(h))
        self.node_names = {int(c): name for c, name in read_rows(folder / "classes.txt", 1)}
        self.class_ids = sorted(set(class_of.values()))
        label_of = {cid: label for label, cid in enumerate(self.class_ids)}
        records = {
            i: Record(f"images/{p}", label_of[class_of[i]], boxes.get(i)) for i, p in paths.items()
        }
        return Splits(
            classes=[self.class_name(self.node_names.get(c, str(c))) for c in self.class_ids],
            train=[r for i, r in records.items() if is_train[i]],
            test=[r for i, r in records.items() if not is_train[i]],
        )
