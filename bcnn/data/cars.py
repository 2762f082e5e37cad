"""Stanford Cars: 196 classes, 16,185 images (8,144 train / 8,041 test).

Split protocol: the official train/test split. ``trainval`` is the whole official train
set, ``train``/``val`` carve a stratified ``val_fraction`` of it, ``test`` is the
official test set (labels from ``cars_test_annos_withlabels.mat`` or the ``test`` flag
of ``cars_annos.mat``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bcnn.data.base import FileDataset, Record, Splits
from bcnn.data.source import Archive, DatasetSource

TEST_LABELS = "cars_test_annos_withlabels.mat"
_CARS = "http://ai.stanford.edu/~jkrause"


def _load_mat(path: Path, key: str) -> np.ndarray:
    """Loads one variable of a MATLAB file as a 1-D array (structs become record arrays)."""
    from scipy.io import loadmat  # scipy is only needed by this dataset

    return np.atleast_1d(loadmat(path, squeeze_me=True)[key])


def _box(entry: np.void) -> tuple[float, float, float, float]:
    # MATLAB boxes are 1-based and inclusive.
    return (
        float(entry["bbox_x1"]) - 1,
        float(entry["bbox_y1"]) - 1,
        float(entry["bbox_x2"]),
        float(entry["bbox_y2"]),
    )


def _devkit_records(folder: Path, annos: str, image_dir: str) -> list[Record]:
    # Kaggle's copy nests every image folder twice.
    if (folder / image_dir / image_dir).is_dir():
        image_dir = f"{image_dir}/{image_dir}"
    entries = _load_mat(folder / annos, "annotations")
    if "class" not in (entries.dtype.names or ()):
        raise ValueError(
            f"Stanford Cars: {folder / annos} has no 'class' field "
            "(the test labels are in cars_test_annos_withlabels.mat)"
        )
    return [Record(f"{image_dir}/{e['fname']}", int(e["class"]) - 1, _box(e)) for e in entries]


class StanfordCars(FileDataset):
    """Stanford Cars from either of its two published layouts, detected automatically.

    * ``devkit`` (torchvision, TFDS): ``cars_train/``, ``cars_test/``,
      ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat`` and the test labels in
      ``cars_test_annos_withlabels.mat`` at the root or in ``devkit/``. Kaggle's doubled
      ``cars_train/cars_train/`` folders are accepted as they are.
    * ``car_ims`` (the B-CNN authors): ``car_ims/`` plus ``cars_annos.mat``, whose
      ``test`` field gives the split.

    ``.mat`` struct fields are read by name, so both layouts share one parser. Labels are
    ``class - 1``; ``classes`` are the ``class_names`` of the ``.mat`` files. ``root`` is
    ``data/cars``; the options are those of :class:`~bcnn.data.base.FileDataset`
    (``bbox_crop`` crops to the annotated box).

    Attributes:
        layout: ``"devkit"`` or ``"car_ims"``, the layout found.
    """

    source = DatasetSource(
        name="cars",
        title="Stanford Cars",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline)",
        layout="""\
<root>/                        e.g. data/cars; either layout A (devkit):
  cars_train/00001.jpg ...     cars_test/00001.jpg ...   (Kaggle's doubled
                               cars_train/cars_train/ is accepted too)
  devkit/cars_meta.mat  devkit/cars_train_annos.mat
  cars_test_annos_withlabels.mat   (here or in devkit/)
or layout B (the B-CNN authors'):
  car_ims/000001.jpg ...  cars_annos.mat""",
        manual="""\
no public download; the original host ai.stanford.edu/~jkrause is offline (torchvision
  issue #7545).
  1. Images: Kaggle dataset jessicali9530/stanford-cars-dataset (cars_train/, cars_test/),
     or car_ims.tgz + cars_annos.mat from an archive mirror (layout B).
  2. Devkit: car_devkit.tgz, re-hosted at
     https://github.com/pytorch/vision/files/11644847/car_devkit.tgz
  3. Test labels: cars_test_annos_withlabels.mat (e.g. a Kaggle mirror); put it in the
     root or in devkit/.
  4. Install each file with checksum verification where its MD5 is known:
     bcnn-prepare-data dataset=cars root=data/cars archive=[FILE,...]""",
        known_files=tuple(
            Archive(f"{_CARS}/{path}", md5, creates=creates, extract=not path.endswith(".mat"))
            for path, md5, creates in (
                ("cars/car_devkit.tgz", "c3b158d763b6e2245038c8ad08e45376", "devkit"),
                ("car196/cars_train.tgz", "065e5b463ae28d29e77c1b4b166cfe61", "cars_train"),
                ("car196/cars_test.tgz", "4ce7ebf6a94d07f1952d94dd34c4d501", "cars_test"),
                (f"car196/{TEST_LABELS}", "b0a2b23655a3edd16d84508592a98d10", TEST_LABELS),
                ("car196/car_ims.tgz", "d5c8f0aa497503f355e17dc7886c3f14", "car_ims"),
                ("car196/cars_annos.mat", "b407c6086d669747186bd1d764ff9dbc", "cars_annos.mat"),
            )
        ),
    )
    box_file = ""  # boxes are fields of the .mat annotations

    def locate(self, root: str | os.PathLike | None) -> Path | None:
        """``root`` itself; also decides the layout by what is there."""
        folder = None if root is None else Path(root)
        car_ims = folder is not None and (folder / "cars_annos.mat").is_file()
        self.layout = "car_ims" if car_ims else "devkit"
        return folder

    def required_files(self, folder: Path | None) -> list[str]:
        """The files of the layout found."""
        if self.layout == "car_ims":
            return ["cars_annos.mat", "car_ims"]
        annotations = ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat"]
        return [*annotations, self._test_labels(folder), "cars_train", "cars_test"]

    @staticmethod
    def _test_labels(folder: Path | None) -> str:
        where = (TEST_LABELS, f"devkit/{TEST_LABELS}")
        return next((p for p in where if folder and (folder / p).is_file()), TEST_LABELS)

    def parse(self, folder: Path) -> Splits:
        """Reads the ``.mat`` annotations of the layout found."""
        if self.layout == "devkit":
            return Splits(
                classes=[str(c) for c in _load_mat(folder / "devkit/cars_meta.mat", "class_names")],
                train=_devkit_records(folder, "devkit/cars_train_annos.mat", "cars_train"),
                test=_devkit_records(folder, self._test_labels(folder), "cars_test"),
            )
        entries = _load_mat(folder / "cars_annos.mat", "annotations")
        records = [
            Record(str(e["relative_im_path"]), int(e["class"]) - 1, _box(e)) for e in entries
        ]
        is_test = [bool(e["test"]) for e in entries]
        return Splits(
            classes=[str(c) for c in _load_mat(folder / "cars_annos.mat", "class_names")],
            train=[r for r, t in zip(records, is_test) if not t],
            test=[r for r, t in zip(records, is_test) if t],
        )
