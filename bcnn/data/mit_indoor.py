"""MIT Indoor 67: 67 scene categories, official lists of 80 train / 20 test per class.

Split protocol: ``TrainImages.txt`` (5,360) and ``TestImages.txt`` (1,340). ``trainval``
is all of ``TrainImages`` (what B-CNN trains on), ``train``/``val`` carve a stratified
``val_fraction`` of it, ``test`` is ``TestImages``. Images of the archive that neither
list names (about 9,000) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from bcnn.data.base import FileDataset, Record, Splits, read_rows
from bcnn.data.source import Archive, DatasetSource

LISTS = ("TrainImages.txt", "TestImages.txt")
IMAGE_DIRS = ("Images", "indoorCVPR_09/Images")
_LISTS_URL = "http://web.mit.edu/torralba/www"


class MITIndoor67(FileDataset):
    """MIT Indoor 67 from its two list files.

    List lines are ``<category>/<file>.jpg`` relative to ``Images/``. Classes are the
    sorted category names of the two lists (the dataset's own spellings such as
    ``stairscase`` and ``kindergarden``). ``root`` is ``data/mit_indoor`` holding the two
    lists and ``Images/`` (or Kaggle's ``indoorCVPR_09/Images/``); the options are those
    of :class:`~bcnn.data.base.FileDataset`.
    """

    source = DatasetSource(
        name="mit_indoor",
        title="MIT Indoor 67",
        homepage="https://web.mit.edu/torralba/www/indoor.html",
        layout="""\
<root>/                        e.g. data/mit_indoor
  TrainImages.txt  TestImages.txt
  Images/<category>/<file>.jpg   (Kaggle: indoorCVPR_09/Images/ is accepted too)""",
        variants={
            "default": (
                Archive(
                    "http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar",
                    None,
                    creates="Images",
                ),
                *(
                    Archive(f"{_LISTS_URL}/{name}", None, creates=name, extract=False)
                    for name in LISTS
                ),
            )
        },
    )
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
