"""MIT Indoor 67: 67 scene categories, official lists of 80 train / 20 test per class.

Images of the archive that neither list names (about 9,000) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from bcnn.data.base import FileDataset, Splits, splits_by_folder
from bcnn.data.source import DatasetSource

LISTS = ("TrainImages.txt", "TestImages.txt")
IMAGE_DIRS = ("Images", "indoorCVPR_09/Images")


class MITIndoor67(FileDataset):
    """MIT Indoor 67 from its two lists of ``<category>/<file>.jpg`` below ``Images/``.

    ``root`` is ``data/mit_indoor`` holding the two lists and ``Images/`` (or Kaggle's
    ``indoorCVPR_09/Images/``); the options are those of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource.named("mit_indoor")
    folders = (".", "indoorCVPR_09")

    @staticmethod
    def _images(folder: Path | None) -> str:
        return next((d for d in IMAGE_DIRS if folder and (folder / d).is_dir()), IMAGE_DIRS[0])

    def required_files(self, folder: Path | None) -> list[str]:
        """The two lists and the image folder found."""
        return [*LISTS, self._images(folder)]

    def parse(self, folder: Path) -> Splits:
        """Reads the two lists; the category is the first path component."""
        lists = {"train": folder / LISTS[0], "test": folder / LISTS[1]}
        return splits_by_folder(lists, self._images(folder))
