"""iNaturalist 2017 / 2018 / 2021, read from the competition's COCO-style JSON files.

Split protocol. The competitions publish train and val annotations but no test labels,
so the official val set plays the role of the test set:

* ``test``: the official val JSON (``val2017.json``, ``val2018.json``, ``val.json``).
* ``trainval``: the whole official train JSON.
* ``train`` / ``val``: a stratified ``val_fraction`` of the official train set is held
  out as our ``val`` for model selection; ``train`` is the rest.

With ``supercategory`` set (the B-CNN iNat subsets), only its categories are kept and
they are re-indexed ``0..K-1`` in the order of the JSON ``categories`` list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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

# version -> (train JSON, val JSON); the 2021 "mini" train set swaps in train_mini.json.
ANNOTATIONS = {
    2017: ("train2017.json", "val2017.json"),
    2018: ("train2018.json", "val2018.json"),
    2021: ("train.json", "val.json"),
}
TAXONOMY_FIELDS = ("kingdom", "phylum", "class", "order", "family", "genus")


def select_categories(
    categories: list[dict[str, Any]], supercategory: str | None
) -> list[dict[str, Any]]:
    """Keeps the categories of one supercategory, in list order.

    A name matching some category's ``supercategory`` field wins. Otherwise it is
    looked up in the taxonomy fields, so the Latin names of the 2017/2018 subsets
    (``Aves``, ``Plantae``...) also select from 2021, whose supercategories are English
    (``Birds``, ``Plants``...): ``Aves`` matches ``class == "Aves"``.

    Raises:
        ValueError: Nothing matches; the message lists the supercategories present.
    """
    if supercategory is None:
        return list(categories)
    exact = [c for c in categories if c.get("supercategory") == supercategory]
    if exact:
        return exact
    by_taxon = [c for c in categories if any(c.get(f) == supercategory for f in TAXONOMY_FIELDS)]
    if by_taxon:
        return by_taxon
    present = sorted({str(c.get("supercategory")) for c in categories})
    raise ValueError(
        f"iNaturalist: no category has supercategory or taxon {supercategory!r}; present: {present}"
    )


class INaturalist(RecordDataset):
    """iNaturalist from its JSON annotations, optionally one supercategory.

    Images and labels are joined on ``image_id`` (never on list position: the
    ``images`` and ``annotations`` lists need not be aligned). Labels index the kept
    categories in JSON list order. For 2018, an optional ``categories.json`` next to the
    annotations (the un-obfuscated release) replaces category names and taxonomy by id.

    Args:
        root: ``data/inat`` holding one folder per version (``2018/``...), or the
            version folder itself. Image paths are the JSON ``file_name`` relative to it.
        split: ``train``, ``val``, ``trainval`` or ``test`` (see the module docstring).
        transform: A transform recipe (see ``bcnn.data.transforms``) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the official train set held out as ``val``.
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        version: 2017, 2018 or 2021.
        supercategory: Keep only this supercategory (``Aves``, ``Plantae``... or the
            2021 English names ``Birds``, ``Plants``...); ``None`` keeps all.
        mini: 2021 only: train on ``train_mini.json`` (50 images per species).

    Attributes:
        categories: The kept category dicts; ``categories[label]`` has ``id``, ``name``,
            ``supercategory`` and, from 2018 on, the taxonomy fields.
        category_ids: JSON category id of each label.

    Raises:
        FileNotFoundError: The split's JSON file is missing.
        ValueError: Unknown version, ``mini`` with 2017/2018, an unknown supercategory,
            or a JSON without annotations (a test-set file).
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
        version: int = 2018,
        supercategory: str | None = None,
        mini: bool = False,
    ) -> None:
        check_options(split, val_fraction, on_bad_image)
        version = int(version)
        if version not in ANNOTATIONS:
            raise ValueError(
                f"iNaturalist version must be one of {sorted(ANNOTATIONS)}, got {version}"
            )
        if mini and version != 2021:
            raise ValueError("iNaturalist mini=True exists only for version 2021 (train_mini.json)")
        train_json, val_json = ANNOTATIONS[version]
        if mini:
            train_json = "train_mini.json"
        json_name = val_json if split == "test" else train_json
        source = SOURCES["inat"]
        folder = find_dataset_dir(root, json_name, (str(version), "."))
        folder = require_files(
            folder, [json_name], source.title, source.how_to_obtain(), source.layout
        )

        with open(folder / json_name, encoding="utf-8") as f:
            data = json.load(f)
        categories = (
            self._real_names(data["categories"], folder / "categories.json")
            if version == 2018
            else data["categories"]
        )
        self.categories = select_categories(categories, supercategory)
        self.category_ids = [c["id"] for c in self.categories]
        self.version, self.supercategory, self.mini = version, supercategory, mini

        records = self._join(
            data, folder / json_name, {cid: label for label, cid in enumerate(self.category_ids)}
        )
        del data
        if split != "test":
            records = select_split(
                split, train=records, test=[], val_fraction=val_fraction, val_seed=val_seed
            )
        classes = [str(c["name"]) for c in self.categories]
        super().__init__(folder, records, classes, transform, augment, on_bad_image)

    @staticmethod
    def _real_names(categories: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
        """Overlays the released 2018 names and taxonomy on the obfuscated ones, by id."""
        if not path.is_file():
            return categories
        with open(path, encoding="utf-8") as f:
            real = {c["id"]: c for c in json.load(f)}
        return [{**c, **real.get(c["id"], {})} for c in categories]

    @staticmethod
    def _join(data: dict[str, Any], path: Path, label_of: dict[int, int]) -> list[Record]:
        """Pairs each image with its annotation by ``image_id``; drops other categories."""
        if not data.get("annotations"):
            raise ValueError(
                f"iNaturalist: {path} has no annotations (a test-set file cannot be used here)"
            )
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        records = []
        for image in data["images"]:
            category = category_of.get(image["id"])
            if category in label_of:
                records.append(Record(image["file_name"], label_of[category]))
        return records
