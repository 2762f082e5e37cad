"""One dataset base for every benchmark: records ``(path, label[, box])`` to ``(image, label)``.

Each dataset module only parses its own annotation files into :class:`Record` lists and
hands them, with the class names, to :class:`RecordDataset`. Everything else lives here:
split selection (:func:`select_split`, :func:`split_train_val`), image decoding with the
bad-image policy, optional box crops, the sample lists written into a run directory, and
the one clear error raised when files are missing (:func:`require_files`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from bcnn.data import SPLITS
from bcnn.data.transforms import build_transforms

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")

# (left, upper, right, lower) in PIL pixel coordinates: right/lower are exclusive.
Box = tuple[float, float, float, float]


class Record(NamedTuple):
    """One image of a dataset.

    A NamedTuple rather than a dataclass: iNaturalist holds millions of these, and a
    tuple costs no per-instance dict.

    Attributes:
        path: Image path relative to the dataset folder, ``/``-separated.
        label: Class index into ``classes``.
        box: Optional object box ``(left, upper, right, lower)`` in pixels (PIL crop
            convention, right/lower exclusive), used when box cropping is on.
    """

    path: str
    label: int
    box: Box | None = None


class BadImageError(OSError):
    """An image file that is missing, truncated or cannot be decoded."""


def find_dataset_dir(
    root: str | os.PathLike | None, marker: str, candidates: Sequence[str]
) -> Path | None:
    """Finds the folder that holds a dataset's files below a user-given root.

    Users point ``root`` either at the folder an archive was extracted into
    (``data/cub``, holding ``CUB_200_2011/``) or at the extracted folder itself, so each
    loader lists where its ``marker`` may sit.

    Args:
        root: Folder given by the user (``dataset.root``), or ``None``.
        marker: A file or folder that identifies the dataset folder, relative to it.
        candidates: Sub-folders of ``root`` to try in order (``"."`` for ``root`` itself).
            The first one is the documented layout and is returned when none matches,
            so that :func:`require_files` then reports paths of that layout.

    Returns:
        The dataset folder (not checked for existence when nothing matched), or ``None``
        when ``root`` is ``None``.
    """
    if root is None:
        return None
    for sub in candidates:
        if (Path(root) / sub / marker).exists():
            return Path(root) / sub
    return Path(root) / candidates[0]


def require_files(
    root: str | os.PathLike | None,
    relpaths: Iterable[str],
    dataset_name: str,
    how_to_obtain: str,
    layout: str = "",
) -> Path:
    """Checks that a dataset's files exist, raising one readable error if not.

    Args:
        root: The dataset folder the ``relpaths`` are relative to.
        relpaths: Files (or folders) that must exist.
        dataset_name: Human-readable dataset name for the message.
        how_to_obtain: Where to get the data (download command or manual steps).
        layout: The expected folder layout, shown in the message.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileNotFoundError: ``root`` is ``None`` or does not exist, or a file is missing.
            The message names the first missing path, the layout and how to obtain it.
    """
    parts: list[str] = []
    if root is None:
        parts.append(f"{dataset_name}: no dataset root given (set dataset.root=... or BCNN_DATA).")
        root_path = Path(".")
    else:
        root_path = Path(root)
        missing = [p for p in relpaths if not (root_path / p).exists()]
        if root_path.is_dir() and not missing:
            return root_path
        if not root_path.is_dir():
            parts.append(f"{dataset_name}: dataset folder {root_path} does not exist.")
        else:
            more = (
                f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}...)"
                if len(missing) > 1
                else ""
            )
            parts.append(f"{dataset_name}: missing {root_path / missing[0]}{more}.")
    if layout:
        parts.append(f"Expected layout:\n{layout.rstrip()}")
    parts.append(f"How to obtain it: {how_to_obtain.strip()}")
    parts.append("Point dataset.root=<folder> (or the BCNN_DATA environment variable) at the data.")
    raise FileNotFoundError("\n".join(parts))


def read_rows(path: str | os.PathLike, maxsplit: int = -1) -> list[list[str]]:
    """Reads a space-separated list file: one record per non-blank line.

    Lines are stripped (this also removes ``\\r`` of files written on Windows) and split
    at most ``maxsplit`` times, so a last column holding spaces (class names) survives.
    """
    with open(path, encoding="utf-8") as f:
        return [
            line.split(" ", maxsplit) if maxsplit >= 0 else line.split()
            for line in map(str.strip, f)
            if line
        ]


def split_train_val(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Carves a deterministic, class-stratified validation set out of training records.

    Each class with ``n >= 2`` images gives ``clamp(round(fraction * n), 1, n - 1)`` of
    them to val (classes with one image stay in train, so every class can be learned).
    The choice depends only on ``seed``, the class and the set of paths in that class
    (paths are sorted first), not on the order of ``records``; its own generator per
    class means adding a class does not reshuffle the others.

    Args:
        records: The official training records.
        fraction: Share of each class moved to val, in ``[0, 1)``; 0 gives an empty val.
        seed: Seed of the split.

    Returns:
        ``(train, val)``, each in the order of ``records``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(records), []
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_class[record.label].append(i)
    val_indices: set[int] = set()
    for label, indices in by_class.items():
        n = len(indices)
        if n < 2:
            continue
        k = min(n - 1, max(1, int(fraction * n + 0.5)))
        ordered = sorted(indices, key=lambda i: records[i].path)
        chosen = np.random.default_rng([seed, label]).choice(n, size=k, replace=False)
        val_indices.update(ordered[j] for j in chosen)
    train = [r for i, r in enumerate(records) if i not in val_indices]
    val = [r for i, r in enumerate(records) if i in val_indices]
    return train, val


def select_split(
    split: str,
    *,
    train: Sequence[Record],
    test: Sequence[Record],
    val: Sequence[Record] | None = None,
    val_fraction: float = 0.1,
    val_seed: int = 0,
) -> list[Record]:
    """Maps ``train|val|trainval|test`` onto a dataset's official lists.

    Without an official val list (``val=None``), ``train``/``val`` are carved from the
    official train list by :func:`split_train_val` and ``trainval`` is all of it. With an
    official val list, ``train``/``val`` are the official lists, ``trainval`` is their
    union and ``val_fraction``/``val_seed`` are not used.

    Args:
        split: One of ``SPLITS``.
        train: Official training records.
        test: Official test records.
        val: Official validation records, if the dataset has them.
        val_fraction: Share of each class held out as val when carving.
        val_seed: Seed of the carving.

    Returns:
        The records of ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return list(test)
    if val is not None:
        return {"train": list(train), "val": list(val), "trainval": [*train, *val]}[split]
    if split == "trainval":
        return list(train)
    carved_train, carved_val = split_train_val(train, val_fraction, val_seed)
    return carved_train if split == "train" else carved_val


def check_options(split: str, val_fraction: float, on_bad_image: str) -> None:
    """Validates the constructor arguments every dataset shares, before any parsing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")


class RecordDataset(Dataset):
    """A map-style dataset over ``(path, label[, box])`` records.

    Images are opened with PIL and converted to RGB whatever their stored mode
    (grayscale, CMYK, palette, a PNG behind a ``.jpg`` name). An image that cannot be
    read (missing, truncated, not an image) either raises :class:`BadImageError` naming
    its path (``on_bad_image="fail"``) or is skipped (``"skip"``): the item is then
    replaced by the next readable record in index order (wrapping around), together with
    that record's label, and a warning is logged once per bad file. The replacement is
    deterministic, so a run is reproducible; bad files are remembered per process (each
    DataLoader worker keeps its own ``num_skipped``).

    Attributes:
        root: The dataset folder record paths are relative to.
        records: The records of this split.
        classes: Class names; ``classes[label]`` names a label.
        transform: Callable applied to the PIL RGB image, or ``None`` (PIL images out).
        on_bad_image: ``"fail"`` or ``"skip"``.
        box_crop: Whether images are cropped to their record's box.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        records: Sequence[Record],
        classes: Sequence[str],
        transform: Mapping[str, Any] | Callable[[Image.Image], Any] | None = None,
        augment: bool = False,
        on_bad_image: str = "fail",
        box_crop: bool = False,
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        self.root = Path(root)
        self.records = list(records)
        self.classes = list(classes)
        # A recipe (the dataset config's ``transform`` mapping) gives uint8 tensors.
        self.transform = (
            build_transforms(transform, augment) if isinstance(transform, Mapping) else transform
        )
        self.on_bad_image = on_bad_image
        self.box_crop = box_crop
        bad = [r for r in self.records if not 0 <= r.label < len(self.classes)]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: label {bad[0].label} of {bad[0].path} "
                f"is outside 0..{len(self.classes) - 1}"
            )
        if box_crop and any(r.box is None for r in self.records):
            missing = next(r for r in self.records if r.box is None)
            raise ValueError(f"{type(self).__name__}: box_crop is on but {missing.path} has no box")
        self._bad: set[int] = set()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(absolute path, label)`` pairs, as in ``torchvision.datasets.ImageFolder``."""
        return [(str(self.root / r.path), r.label) for r in self.records]

    @property
    def targets(self) -> list[int]:
        """The label of every record, in order."""
        return [r.label for r in self.records]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``, also those absent from this split)."""
        return len(self.classes)

    @property
    def num_skipped(self) -> int:
        """Bad images skipped so far in this process."""
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            record = self.records[i]
            try:
                image = self.load_image(record)
            except BadImageError as err:
                if self.on_bad_image == "fail":
                    raise
                self._bad.add(i)
                logger.warning(
                    "Skipping unreadable image (%d in this process): %s", len(self._bad), err
                )
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, record.label
        raise BadImageError(f"{type(self).__name__}: no readable image left in this split")

    def load_image(self, record: Record) -> Image.Image:
        """Opens one record's image as RGB, cropped as configured.

        Raises:
            BadImageError: The file is missing, truncated or not a decodable image.
        """
        path = self.root / record.path
        try:
            with Image.open(path) as img:
                # Decode now: a truncated file must fail here, under the policy, not later
                # inside the transform where the path is no longer known.
                img.load()
                image = img if img.mode == "RGB" else img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadImageError(f"cannot read image {path}: {err}") from err
        return self.crop(image, record)

    def crop(self, image: Image.Image, record: Record) -> Image.Image:
        """Crops to the record's box when ``box_crop`` is on (box clipped to the image).

        Datasets override this to add their own fixed crops (the Aircraft banner).
        """
        if not self.box_crop or record.box is None:
            return image
        left, upper, right, lower = record.box
        w, h = image.size
        left, upper = min(max(0, round(left)), w - 1), min(max(0, round(upper)), h - 1)
        right, lower = max(min(w, round(right)), left + 1), max(min(h, round(lower)), upper + 1)
        return image.crop((left, upper, right, lower))

    def write_samples(self, path: str | os.PathLike) -> None:
        """Writes the split as ``<relpath> <label>`` lines, relative to ``root``.

        Paths may contain spaces (iNat 2017 species folders): read the label with
        ``line.rsplit(" ", 1)``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{r.path} {r.label}\n" for r in self.records)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"


__all__ = [
    "BAD_IMAGE_POLICIES",
    "BadImageError",
    "Box",
    "Record",
    "RecordDataset",
    "check_options",
    "find_dataset_dir",
    "read_rows",
    "require_files",
    "select_split",
    "split_train_val",
]
