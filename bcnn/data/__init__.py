"""Datasets, splits and transforms."""

from __future__ import annotations

import importlib
from typing import Any

from torch.utils.data import Dataset

# name -> "module:attribute". Imported lazily so one dataset's optional parser
# dependencies never slow down or break another's.
DATASETS: dict[str, str] = {
    "synthetic": "bcnn.data.synthetic:SyntheticDataset",
    "cub": "bcnn.data.cub:CUB200",
    "aircraft": "bcnn.data.aircraft:FGVCAircraft",
    "cars": "bcnn.data.cars:StanfordCars",
    "nabirds": "bcnn.data.nabirds:NABirds",
    "inat": "bcnn.data.inat:INaturalist",
    "dtd": "bcnn.data.dtd:DTD",
    "fmd": "bcnn.data.fmd:FMD",
    "mit_indoor": "bcnn.data.mit_indoor:MITIndoor67",
}

SPLITS = ("train", "val", "trainval", "test")


def dataset_class(name: str) -> type:
    """Returns the dataset class registered under ``name``.

    Raises:
        ValueError: ``name`` is not a registered dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    module, attr = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_dataset(
    name: str, root: str | None = None, split: str = "train", **options: Any
) -> Dataset:
    """Builds one split of a dataset.

    Args:
        name: A key of ``DATASETS`` (``cub``, ``aircraft``, ... or ``synthetic``).
        root: Folder holding the extracted download (ignored by ``synthetic``).
        split: ``train``, ``val``, ``trainval`` or ``test``. ``val`` is a deterministic
            held-out part of the official train set; ``trainval`` is all of it.
        **options: Dataset-specific keyword arguments (``transform``, ``val_fraction``,
            ``val_seed``, ``version``, ``partition``, ...), the keys of its YAML file.

    Returns:
        A map-style dataset yielding ``(image, label)`` with ``.classes``.
    """
    if split not in SPLITS:
        raise ValueError(f"dataset split must be one of {SPLITS}, got {split!r}")
    return dataset_class(name)(root=root, split=split, **options)


__all__ = ["DATASETS", "SPLITS", "build_dataset", "dataset_class"]
