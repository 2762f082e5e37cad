"""The Caltech list format shared by CUB-200-2011 and NABirds.

A folder of space-separated list files, all keyed by image id::

    images.txt              <image id> <path below images/>
    image_class_labels.txt  <image id> <class id>
    train_test_split.txt    <image id> <1 = train, 0 = test>
    classes.txt             <class id> <class name, may hold spaces>
    bounding_boxes.txt      <image id> <x> <y> <width> <height>     (optional)

Image ids are strings (CUB numbers them, NABirds uses UUIDs) and every file is joined on
them, never on line order. Labels index the class ids that images use, sorted
numerically: for CUB (ids 1..200, all used) that is ``class id - 1``; for NABirds, whose
``classes.txt`` also lists the inner nodes of its taxonomy, it maps the 555 leaf ids used
to ``0..554``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from bcnn.data.base import Box, FileDataset, Record, Splits, read_rows


class CaltechLists(NamedTuple):
    """The list files of one dataset folder, as dictionaries keyed by id.

    Attributes:
        paths: image id -> path relative to ``images/``.
        class_of: image id -> class id.
        is_train: image id -> whether it is in the official train set.
        names: class id -> name, for every line of ``classes.txt``.
        boxes: image id -> box ``(left, upper, right, lower)``; empty unless read.
    """

    paths: dict[str, str]
    class_of: dict[str, int]
    is_train: dict[str, bool]
    names: dict[int, str]
    boxes: dict[str, Box]


def read_caltech_lists(folder: Path, title: str, boxes: bool = False) -> CaltechLists:
    """Reads and joins the list files of a Caltech-format dataset folder.

    Args:
        folder: The folder holding ``images.txt`` and the other lists.
        title: Dataset name for error messages.
        boxes: Also read ``bounding_boxes.txt`` (``x y w h``).

    Raises:
        ValueError: An image of ``images.txt`` has no label or no split row.
    """
    paths = dict(read_rows(folder / "images.txt", 1))
    class_of = {i: int(c) for i, c in read_rows(folder / "image_class_labels.txt")}
    is_train = {i: flag == "1" for i, flag in read_rows(folder / "train_test_split.txt")}
    names = {int(c): name for c, name in read_rows(folder / "classes.txt", 1)}
    box_of: dict[str, Box] = {}
    if boxes:
        for i, x, y, w, h in read_rows(folder / "bounding_boxes.txt"):
            box_of[i] = (float(x), float(y), float(x) + float(w), float(y) + float(h))
    for name, table in (("image_class_labels.txt", class_of), ("train_test_split.txt", is_train)):
        if missing := paths.keys() - table.keys():
            raise ValueError(f"{title}: {folder / name} has no row for image id {min(missing)}")
    return CaltechLists(paths, class_of, is_train, names, box_of)


class CaltechListDataset(FileDataset):
    """A dataset in the Caltech list format (CUB-200-2011, NABirds).

    Attributes:
        class_ids: Original class id of each label (``class_ids[label]``).
        node_names: ``class id -> name`` of every line of ``classes.txt``.
    """

    files = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    box_file = "bounding_boxes.txt"

    def required_files(self, folder: Path | None) -> list[str]:
        """The list files, the boxes when cropping, and ``images/``."""
        return [*super().required_files(folder), "images"]

    def class_name(self, name: str) -> str:
        """A class's name as shown, from its ``classes.txt`` name."""
        return name

    def parse(self, folder: Path) -> Splits:
        """Joins the lists on image id; labels index the class ids used, sorted."""
        lists = read_caltech_lists(folder, self.source.title, boxes=self.box_crop)
        self.class_ids = sorted(set(lists.class_of.values()))
        self.node_names = lists.names
        label_of = {cid: label for label, cid in enumerate(self.class_ids)}
        records = {
            i: Record(f"images/{p}", label_of[lists.class_of[i]], lists.boxes.get(i))
            for i, p in lists.paths.items()
        }
        return Splits(
            classes=[self.class_name(lists.names.get(c, str(c))) for c in self.class_ids],
            train=[r for i, r in records.items() if lists.is_train[i]],
            test=[r for i, r in records.items() if not lists.is_train[i]],
        )


__all__ = ["CaltechListDataset", "CaltechLists", "read_caltech_lists"]
