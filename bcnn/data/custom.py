"""Your own images: a folder with one sub-folder per class, or CSV lists of (path, label).

Without an official test set (no ``test/`` folder, no test CSV), ``test`` is a seeded,
class-stratified ``test_fraction`` of the training images, carved before ``val``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Interval
from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn.data.base import FileDataset, Record, Splits, class_folders, split_train_val
from bcnn.data.source import DatasetSource
from bcnn.limits import Seed, checked

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")


def _image_files(top: Path) -> Iterator[str]:
    """The image files below ``top``, sorted, hidden files and folders left out.

    Links are followed, but each folder is entered once: a link back to a parent folder
    (``class/again -> .``) ends there instead of listing its images again and again.
    """
    entered: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in entered:
            dirnames.clear()
            continue
        entered.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                yield os.path.join(dirpath, name)


class _OwnData(FileDataset):
    """Options shared by the two loaders of user data.

    Args:
        root: The folder holding the data.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        test_fraction: Without an official test set: the share of each class held out
            as ``test``, in ``(0, 1)``.
        split_seed: Seed of that hold-out.
        **common: The options of :class:`~bcnn.data.base.FileDataset`.
    """

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
        split_seed: Seed = 0,
        **common: Any,
    ) -> None:
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)
        super().__init__(root, split, **common)

    def carve_test(self, splits: Splits, folder: Path) -> Splits:
        """Holds out a stratified ``test_fraction`` of ``train`` as ``test`` when there is none."""
        if splits.test:
            return splits
        if self.split == "test":  # said once, by the split it is about
            logger.info(
                "%s has no test set: test = a seeded %.0f%% of each class",
                folder,
                100 * self.test_fraction,
            )
        train, test = split_train_val(splits.train, self.test_fraction, self.split_seed)
        return splits._replace(train=train, test=test)


class FolderDataset(_OwnData):
    """Images sorted into one sub-folder per class (like ``torchvision.datasets.ImageFolder``).

    Either ``root/train/<class>/...`` with optional ``val/`` and ``test/`` folders (which
    may lack classes but not add any), or a single tree ``root/<class>/...``; classes are
    the sorted class-folder names, images the files with an image extension at any depth
    below them (docs/datasets.md). The options are ``test_fraction``, ``split_seed`` and
    those of :class:`~bcnn.data.base.FileDataset`.

    Raises:
        ValueError: No class folders, a class folder without images, a class in
            ``val/`` or ``test/`` that ``train/`` lacks, ``val/``/``test/`` without
            ``train/``, or one file in two classes or splits.
    """

    source = DatasetSource.named("folder")

    def parse(self, folder: Path) -> Splits:
        """Lists the class folders and their images; carves the missing splits."""
        present = [s for s in SPLIT_FOLDERS if (folder / s).is_dir()]
        if present and "train" not in present:
            raise ValueError(
                f"{folder} has {' and '.join(s + '/' for s in present)} but no train/ folder; "
                "add train/<class>/ folders, or put the class folders directly in it"
            )
        tree = folder / "train" if present else folder
        if not (classes := class_folders(tree)):
            raise ValueError(
                f"{tree} holds no class folders: put each class's images in {tree}/<class name>/"
            )
        trees = {s: folder / s for s in present} if present else {"train": folder}
        seen: dict[tuple[int, int] | str, tuple[Path, Record]] = {}
        lists = {s: self._images(folder, tree, classes, seen) for s, tree in trees.items()}
        splits = Splits(classes, lists["train"], lists.get("test", []), lists.get("val"))
        return self.carve_test(splits, folder)

    @staticmethod
    def _images(
        folder: Path,
        tree: Path,
        classes: Sequence[str],
        seen: dict[tuple[int, int] | str, tuple[Path, Record]],
    ) -> list[Record]:
        """The images of ``tree/<class>/``, as records relative to ``folder``.

        Each file is listed once, however many links lead to it: ``seen`` maps each file
        (device and inode) to where it was first found, across the split folders.
        """
        names = class_folders(tree)
        if unknown := sorted(set(names) - set(classes)):
            raise ValueError(
                f"class folder {tree / unknown[0]} is not a class of {folder / 'train'} "
                f"(classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
            )
        records: list[Record] = []
        for name in names:
            count, top = len(records), tree / name
            # Strings, not Paths, for each file: pathlib would take most of the listing time.
            prefix, start = top.relative_to(folder).as_posix(), len(str(top)) + 1
            for path in _image_files(top):
                rel = f"{prefix}/{path[start:].replace(os.sep, '/')}"
                record = Record(rel, classes.index(name))
                try:
                    stat = os.stat(path)
                    key: tuple[int, int] | str = (stat.st_dev, stat.st_ino)
                except OSError:  # a broken link: a bad image when read
                    key = record.path
                first_tree, first = seen.setdefault(key, (tree, record))
                if first is record:
                    records.append(record)
                elif first_tree != tree or first.label != record.label:
                    raise ValueError(
                        f"{folder / record.path} is the same file as {folder / first.path} "
                        "(a link or a hard link): an image belongs to one class and one "
                        "split; remove one of them"
                    )
            if len(records) == count:
                raise ValueError(
                    f"class folder {tree / name} holds no images "
                    f"(extensions: {' '.join(IMG_EXTENSIONS)}); remove it or add images"
                )
        return records


class CSVDataset(_OwnData):
    """Images listed in CSV files, one per split, as ``path,label`` rows (docs/datasets.md).

    The ``path`` and ``label`` columns are named in a header row, or else the first two.

    Args:
        root: The folder holding the CSV files (``dataset.root``).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        train_csv: The train CSV, relative to ``root`` (or absolute).
        val_csv: The val CSV; used if it exists.
        test_csv: The test CSV; used if it exists.
        image_root: Folder the image paths are relative to (relative to ``root``, or
            absolute); ``None``: each CSV's own folder.
        classes: The class names in label order; ``None``: the train CSV's labels, sorted
            (numerically when all are integers, so ``0..K-1`` keep their numbers).
        **options: ``test_fraction``, ``split_seed`` and the options of
            :class:`~bcnn.data.base.FileDataset`.

    Raises:
        FileNotFoundError: The train CSV is missing, or (with ``on_bad_image="fail"``)
            an image a CSV lists; the message names the CSV, its line and the path.
        ValueError: A label that is not a class (in val/test, or any CSV when
            ``classes`` is given), a row without a path or label, or an empty train CSV.
    """

    source = DatasetSource.named("csv")

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        train_csv: str = "train.csv",
        val_csv: str | None = "val.csv",
        test_csv: str | None = "test.csv",
        image_root: str | None = None,
        classes: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        self.train_csv, self.other_csvs = train_csv, {"val": val_csv, "test": test_csv}
        self.image_root = image_root
        self.class_names = None if classes is None else [str(c) for c in classes]
        super().__init__(root, split, **options)

    def required_files(self, folder: Path | None) -> list[str]:
        """The train CSV."""
        return [self.train_csv]

    def parse(self, folder: Path) -> Splits:
        """Reads the CSVs present; names the classes; checks labels and files."""
        rows = {"train": _read_csv(folder / self.train_csv)}
        for split, name in self.other_csvs.items():
            if name and (folder / name).is_file():
                rows[split] = _read_csv(folder / name)
        if not rows["train"]:
            raise ValueError(f"{folder / self.train_csv} lists no images")
        labels = sorted({label for *_, label in rows["train"]})
        if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
            labels.sort(key=int)  # so that labels 0..K-1 keep their numbers
        classes = self.class_names or labels
        origin = "dataset.classes" if self.class_names else str(folder / self.train_csv)
        known = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        index = {name: i for i, name in enumerate(classes)}
        records: dict[str, list[Record]] = {split: [] for split in rows}
        missing = []
        for split, split_rows in rows.items():
            for csv_path, number, image, label in split_rows:
                if label not in index:
                    raise ValueError(
                        f"{csv_path} line {number}: label {label!r} is not a class "
                        f"(classes, from {origin}: {known})"
                    )
                base = folder / self.image_root if self.image_root else csv_path.parent
                full = (base / image).expanduser()
                if not full.is_file():
                    missing.append(f"{csv_path} line {number}: {full}")
                path = image if Path(image).is_absolute() else os.path.relpath(full, folder)
                records[split].append(Record(Path(path).as_posix(), index[label]))
        if missing and self.on_bad_image == "skip":
            logger.warning(
                "%d listed images do not exist; they will be skipped. First: %s",
                len(missing),
                missing[0],
            )
        elif missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"missing image {missing[0]}{more}; fix the paths (relative to "
                f"{'dataset.image_root' if self.image_root else 'the CSV folder'}) or set "
                "dataset.on_bad_image=skip"
            )
        splits = Splits(classes, records["train"], records.get("test", []), records.get("val"))
        return self.carve_test(splits, folder)


def _read_csv(path: Path) -> list[tuple[Path, int, str, str]]:
    """``(csv, line, path, label)`` for every row of one CSV."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(n, row) for n, row in enumerate(csv.reader(f), 1) if any(map(str.strip, row))]
    header = [c.strip().lower() for c in lines[0][1]] if lines else []
    columns = (0, 1)
    if "path" in header and "label" in header:
        columns, lines = (header.index("path"), header.index("label")), lines[1:]
    out = []
    for number, row in lines:
        if len(row) <= max(columns) or not row[columns[0]].strip():
            raise ValueError(f"{path} line {number}: expected a path and a label, got {row}")
        out.append((path, number, row[columns[0]].strip(), row[columns[1]].strip()))
    return out
