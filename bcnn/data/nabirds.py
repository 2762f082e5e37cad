"""NABirds: 48,562 images of 555 leaf classes (23,929 train / 24,633 test).

Split protocol: the official ``train_test_split.txt``. ``trainval`` is the whole official
train set, ``train``/``val`` carve a stratified ``val_fraction`` of it, ``test`` is the
official test set.
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


class NABirds(RecordDataset):
    """NABirds, with labels over the leaf classes that images use.

    ``classes.txt`` also lists the inner nodes of the taxonomy, so class ids are sparse:
    the label set is the ids used in ``image_class_labels.txt``, sorted numerically and
    mapped to ``0..554``. Image ids are UUID strings and every file is joined on them.

    Args:
        root: ``data/nabirds`` (holding ``nabirds/``) or ``nabirds/`` itself.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the official train set held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        bbox_crop: Crop every image to its ``bounding_boxes.txt`` box (``x y w h``).

    Attributes:
        class_ids: Original id of each label (``class_ids[label]``).
        hierarchy: ``child id -> parent id`` over the whole taxonomy (``hierarchy.txt``).
        node_names: ``id -> name`` of every taxonomy node (``classes.txt``).

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
        source = SOURCES["nabirds"]
        folder = find_dataset_dir(root, "images.txt", ("nabirds", "."))
        lists = [
            "images.txt",
            "image_class_labels.txt",
            "train_test_split.txt",
            "classes.txt",
            "hierarchy.txt",
        ]
        extra = ["bounding_boxes.txt"] if bbox_crop else []
        folder = require_files(
            folder, [*lists, *extra, "images"], source.title, source.how_to_obtain(), source.layout
        )

        paths = dict(read_rows(folder / "images.txt", 1))
        class_of = {i: int(c) for i, c in read_rows(folder / "image_class_labels.txt")}
        is_train = {i: flag == "1" for i, flag in read_rows(folder / "train_test_split.txt")}
        self.node_names = {int(i): name for i, name in read_rows(folder / "classes.txt", 1)}
        self.hierarchy = {
            int(child): int(parent) for child, parent in read_rows(folder / "hierarchy.txt")
        }
        boxes: dict[str, Box] = {}
        if bbox_crop:
            for i, x, y, w, h in read_rows(folder / "bounding_boxes.txt"):
                boxes[i] = (float(x), float(y), float(x) + float(w), float(y) + float(h))
        for name, table in (
            ("image_class_labels.txt", class_of),
            ("train_test_split.txt", is_train),
        ):
            if missing := paths.keys() - table.keys():
                raise ValueError(f"NABirds: {folder / name} has no row for image id {min(missing)}")

        self.class_ids = sorted(set(class_of.values()))
        label_of = {cid: label for label, cid in enumerate(self.class_ids)}
        records = {
            i: Record(f"images/{p}", label_of[class_of[i]], boxes.get(i)) for i, p in paths.items()
        }
        records = select_split(
            split,
            train=[r for i, r in records.items() if is_train[i]],
            test=[r for i, r in records.items() if not is_train[i]],
            val_fraction=val_fraction,
            val_seed=val_seed,
        )
        classes = [self.node_names.get(cid, str(cid)) for cid in self.class_ids]
        super().__init__(folder, records, classes, transform, augment, on_bad_image, box_crop=bbox_crop)

    def ancestors(self, label: int) -> list[int]:
        """Taxonomy node ids above a label's class, nearest first, up to the root."""
        chain, node = [], self.class_ids[label]
        while (node := self.hierarchy.get(node)) is not None and node not in chain:
            chain.append(node)
        return chain
