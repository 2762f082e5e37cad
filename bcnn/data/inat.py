"""iNaturalist 2017 / 2018 / 2021, read from the competition's COCO-style JSON files.

Split protocol: there are no public test labels, so ``test`` is the official val JSON;
``trainval`` is the official train JSON, and ``train``/``val`` carve a stratified
``val_fraction`` of it. With ``supercategory`` set (the B-CNN iNat subsets), only its
categories are kept, re-indexed ``0..K-1`` in the order of the JSON ``categories`` list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from bcnn.data.base import FileDataset, Record, Splits, find_dataset_dir
from bcnn.data.source import DatasetSource
from bcnn.limits import checked

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


class INaturalist(FileDataset):
    """iNaturalist from its JSON annotations, optionally one supercategory.

    Images and labels are joined on ``image_id``, never on list position. For 2018, an
    optional ``categories.json`` (the un-obfuscated release) replaces category names and
    taxonomy by id. Only the JSON file of the split asked for is read.

    Args:
        root: ``data/inat`` holding one folder per version (``2018/``...), or the
            version folder itself. Image paths are the JSON ``file_name`` relative to it.
        split: ``train``, ``val``, ``trainval`` or ``test`` (see the module docstring).
        version: 2017, 2018 or 2021.
        supercategory: Keep only this supercategory (``Aves``, ``Plantae``... or the
            2021 English names ``Birds``, ``Plants``...); ``None`` keeps all.
        mini: 2021 only: train on ``train_mini.json`` (50 images per species).
        **common: The options of :class:`~bcnn.data.base.FileDataset`.

    Attributes:
        categories: The kept category dicts; ``categories[label]`` has ``id``, ``name``,
            ``supercategory`` and, from 2018 on, the taxonomy fields.
        category_ids: JSON category id of each label.

    Raises:
        ValueError: Unknown version, ``mini`` with 2017/2018, an unknown supercategory,
            or a JSON without annotations (a test-set file).
    """

    source = DatasetSource.named("inat")

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        version: Literal[2017, 2018, 2021] = 2018,
        supercategory: str | None = None,
        mini: bool = False,
        **common: Any,
    ) -> None:
        self.version, self.supercategory, self.mini = version, supercategory, mini
        super().__init__(root, split, **common)

    @classmethod
    def config_problem(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """Only the 2021 release has a mini training set."""
        if values.get("mini") and values.get("version") != 2021:
            return "mini", "exists only for version 2021 (train_mini.json)"
        return super().config_problem(values)

    def locate(self, root: str | os.PathLike | None) -> Path | None:
        """The version's folder below ``root``, or ``root`` itself."""
        return find_dataset_dir(root, self.required_files(None)[0], (str(self.version), "."))

    def required_files(self, folder: Path | None) -> list[str]:
        """The JSON file of the split: the official val JSON for ``test``."""
        train_json, val_json = ANNOTATIONS[self.version]
        if self.split == "test":
            return [val_json]
        return ["train_mini.json" if self.mini else train_json]

    def parse(self, folder: Path) -> Splits:
        """Reads the split's JSON; its records are ``train`` (carved) or ``test``."""
        path = folder / self.required_files(folder)[0]
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        categories = data["categories"]
        if self.version == 2018:
            categories = self._real_names(categories, folder / "categories.json")
        self.categories = select_categories(categories, self.supercategory)
        self.category_ids = [c["id"] for c in self.categories]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        records = self._join(data, path, label_of)
        classes = [str(c["name"]) for c in self.categories]
        if self.split == "test":
            return Splits(classes, train=[], test=records)
        return Splits(classes, train=records, test=[])

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
