"""CUB-200-2011 (Caltech-UCSD Birds): 200 species, official train/test split (docs/datasets.md)."""

from __future__ import annotations

from bcnn.data.caltech import CaltechListDataset
from bcnn.data.source import DatasetSource


class CUB200(CaltechListDataset):
    """CUB-200-2011, read from its Caltech-format list files.

    Labels are ``class_id - 1``; ``classes`` are the names of ``classes.txt`` without their
    ``NNN.`` prefix. ``root`` is ``data/cub`` (holding ``CUB_200_2011/``) or
    ``CUB_200_2011/`` itself; the options are those of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource.named("cub")
    folders = ("CUB_200_2011", ".")

    def class_name(self, name: str) -> str:
        """``001.Black_footed_Albatross`` -> ``Black_footed_Albatross``."""
        return name.split(".", 1)[-1]
