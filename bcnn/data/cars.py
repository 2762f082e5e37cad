"""Stanford Cars: 196 classes, official train/test split, from either published layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bcnn.data.base import FileDataset, Record, Splits
from bcnn.data.source import DatasetSource

TEST_LABELS = "cars_test_annos_withlabels.mat"


def _load_mat(path: Path, key: str) -> np.ndarray:
    """Loads one variable of a MATLAB file as a 1-D array (structs become record arrays)."""
    from scipy.io import loadmat  # scipy is only needed by this dataset

    return np.atleast_1d(loadmat(path, squeeze_me=True)[key])


def _box(entry: np.void) -> tuple[float, float, float, float]:
    # MATLAB boxes are 1-based and inclusive.
    x1, y1, x2, y2 = (float(entry[f"bbox_{k}"]) for k in ("x1", "y1", "x2", "y2"))
    return (x1 - 1, y1 - 1, x2, y2)


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
    """Stanford Cars from either published layout (``source.layout``), detected by its files.

    ``devkit`` (torchvision, Kaggle, TFDS) or ``car_ims`` (the B-CNN authors'; the
    ``test`` field of ``cars_annos.mat`` gives the split). ``.mat`` struct fields are read
    by name; labels are ``class - 1``. ``root`` is ``data/cars``; the options are those of
    :class:`~bcnn.data.base.FileDataset`.

    Attributes:
        layout: ``"devkit"`` or ``"car_ims"``, the layout found.
    """

    source = DatasetSource.named("cars")
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
