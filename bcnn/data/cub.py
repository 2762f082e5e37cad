"""CUB-200-2011 (Caltech-UCSD Birds): 200 species, 11,788 images (5,994 train / 5,794 test).

Split protocol: the official ``train_test_split.txt``. ``trainval`` is the whole
official train set (what the B-CNN papers train on), ``train``/``val`` carve a stratified
``val_fraction`` of it for model selection, ``test`` is the official test set.
"""

from __future__ import annotations

from bcnn.data.caltech import CaltechListDataset
from bcnn.data.source import Archive, DatasetSource


class CUB200(CaltechListDataset):
    """CUB-200-2011, read from its Caltech-format list files.

    Labels are ``class_id - 1``; ``classes`` holds the names of ``classes.txt`` without
    their ``NNN.`` prefix, in class-id order. Options are those of
    :class:`~bcnn.data.base.FileDataset`; ``bbox_crop`` crops to ``bounding_boxes.txt``.
    ``root`` is ``data/cub`` (holding ``CUB_200_2011/``) or ``CUB_200_2011/`` itself.
    """

    source = DatasetSource(
        name="cub",
        title="CUB-200-2011",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        layout="""\
<root>/                        e.g. data/cub (root may also be CUB_200_2011/ itself)
  CUB_200_2011/
    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt
    bounding_boxes.txt         (used by bbox_crop)
    images/<NNN>.<Class_Name>/<Class_Name>_<NNNN>_<id>.jpg""",
        variants={
            "default": (
                Archive(
                    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                    "97eceeb196236b17998738112f37df78",
                    creates="CUB_200_2011/images.txt",
                ),
            )
        },
    )
    folders = ("CUB_200_2011", ".")

    def class_name(self, name: str) -> str:
        """``001.Black_footed_Albatross`` -> ``Black_footed_Albatross``."""
        return name.split(".", 1)[-1]
