"""MIT Indoor 67: 67 scene categories, official lists of 80 train / 20 test per class.

Split protocol: ``TrainImages.txt`` (5,360) and ``TestImages.txt`` (1,340). ``trainval``
is all of ``TrainImages`` (what B-CNN trains on), ``train``/``val`` carve a stratified
``val_fraction`` of it, ``test`` is ``TestImages``. Images of the archive that neither
list names (about 9,000) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from bcnn.data.base import FileDataset, Record, Splits, read_rows
from bcnn.data.source import DatasetSource

LISTS = ("TrainImages.txt", "TestImages.txt")
IMAGE_DIRS = ("Images", "indoorCVPR_09/Images")


class MITIndoor67(FileDataset):
    """MIT Indoor 67 from its two list files.

    List lines are ``<category>/<file>.jpg`` relative to ``Images/``. Classes are the
    sorted category names of the two lists (the dataset's own spellings such as
    ``stairscase`` and ``kindergarden``). ``root`` is ``data/mit_indoor`` holding the two
    lists and ``Images/`` (or Kaggle's ``indoorCVPR_09/Images/``); the options are those
    of :class:`~bcnn.data.base.FileDataset`.
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
        images = self._images(folder)
        train, test = ([row[0] for row in read_rows(folder / name, 0)] for name in LISTS)
        classes = sorted({p.split("/", 1)[0] for p in (*train, *test)})
        index = {name: i for i, name in enumerate(classes)}
        train_records, test_records = (
            [Record(f"{images}/{p}", index[p.split("/", 1)[0]]) for p in paths]
            for paths in (train, test)
        )
        return Splits(classes, train_records, test_records)
