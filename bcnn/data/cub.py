"""CUB-200-2011 (Caltech-UCSD Birds): 200 species, 11,788 images (5,994 train / 5,794 test).

Split protocol: the official ``train_test_split.txt``. ``trainval`` is the whole
official train set (what the B-CNN papers train on), ``train``/``val`` carve a stratified
``val_fraction`` of it for model selection, ``test`` is the official test set.
"""

from __future__ import annotations

from bcnn.data.caltech import CaltechListDataset
from bcnn.data.source import DatasetSource


class CUB200(CaltechListDataset):
    """CUB-200-2011, read from its Caltech-format list files.

    Labels are ``class_id - 1``; ``classes`` holds the names of ``classes.txt`` without
    their ``NNN.`` prefix, in class-id order. Options are those of
    :class:`~bcnn.data.base.FileDataset`; ``bbox_crop`` crops to ``bounding_boxes.txt``.
    ``root`` is ``data/cub`` (holding ``CUB_200_2011/``) or ``CUB_200_2011/`` itself.
    """

    source = DatasetSource.named("cub")
    folders = ("CUB_200_2011", ".")

    def class_name(self, name: str) -> str:
        """``001.Black_footed_Albatross`` -> ``Black_footed_Albatross``."""
        return name.split(".", 1)[-1]
