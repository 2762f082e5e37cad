"""iNaturalist 2017 / 2018 / 2021, read from the competition's COCO-style JSON files.

There are no public test labels, so ``test`` is the official val JSON (docs/datasets.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from bcnn.data.base import FileDataset, Record, Splits
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

    A name matching some category's ``supercategory`` field wins; else the taxonomy
    fields, so the Latin names of 2017/2018 (``Aves``) also select from 2021, whose
    supercategories are English (``Birds``): ``Aves`` matches ``class == "Aves"``.
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

    Images and labels are joined on ``image_id``, never on list position. Only the JSON
    file of the split asked for is read.

    Args:
        root: ``data/inat`` holding one folder per version (``2018/``...), or the
            version folder itself. Image paths are the JSON ``file_name`` relative to it.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        version: 2017, 2018 or 2021.
        supercategory: Keep only this supercategory (``Aves``, or 2021's ``Birds``...),
            re-indexed ``0..K-1`` in list order; ``None`` keeps all.
        mini: 2021 only: train on ``train_mini.json`` (50 images per species).
        **common: The options of :class:`~bcnn.data.base.FileDataset`.

    Attributes:
        categories: The kept category dicts; ``categories[label]`` has ``id``, ``name``,
            ``supercategory`` and, from 2018 on, the taxonomy fields.
        category_ids: JSON category id of each label.
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
        self.folders = (str(version), ".")
        super().__init__(root, split, **common)

    @classmethod
    def config_problem(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """Only the 2021 release has a mini training set."""
        if values.get("mini") and values.get("version") != 2021:
            return "mini", "exists only for version 2021 (train_mini.json)"
        return super().config_problem(values)

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
        if not data.get("annotations"):
            raise ValueError(
                f"iNaturalist: {path} has no annotations (a test-set file cannot be used here)"
            )
        categories = data["categories"]
        if self.version == 2018 and (folder / "categories.json").is_file():
            # The released names and taxonomy overlay the obfuscated ones, by id.
            with open(folder / "categories.json", encoding="utf-8") as f:
                real = {c["id"]: c for c in json.load(f)}
            categories = [{**c, **real.get(c["id"], {})} for c in categories]
        self.categories = select_categories(categories, self.supercategory)
        self.category_ids = [c["id"] for c in self.categories]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        records = [
            Record(image["file_name"], label_of[category_of[image["id"]]])
            for image in data["images"]
            if category_of.get(image["id"]) in label_of
        ]
        classes = [str(c["name"]) for c in self.categories]
        if self.split == "test":
            return Splits(classes, train=[], test=records)
        return Splits(classes, train=records, test=[])
