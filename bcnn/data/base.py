"""One dataset base for every loader: files on disk -> records ``(path, label[, box])`` -> items.

A loader declares its source and layout (class attributes of :class:`FileDataset`) and
implements only :meth:`FileDataset.parse`. The rest lives here: finding the dataset
folder, the missing-file error, the shared options, split selection, image decoding with
the bad-image policy, box crops and the sample lists written into a run directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from bcnn.data.images import open_rgb
from bcnn.data.source import DatasetSource
from bcnn.data.transforms import RecipeMapping, build_transforms
from bcnn.errors import BadImageError
from bcnn.limits import Fraction, NonEmpty, Seed, checked

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "trainval", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
BadImagePolicy = Literal["fail", "skip"]
# How a user lists every unreadable image of a dataset (named in the bad-image error).
VERIFY_COMMAND = "python scripts/prepare_data.py dataset={name} root={root} verify=true"

# (left, upper, right, lower) in PIL pixel coordinates: right/lower are exclusive.
Box = tuple[float, float, float, float]
Transform = RecipeMapping | Callable[[Image.Image], Any] | None


class Record(NamedTuple):
    """One image of a dataset (a NamedTuple: iNaturalist holds millions of them).

    Attributes:
        path: Image path relative to the dataset folder, ``/``-separated.
        label: Class index into ``classes``.
        box: Optional object box ``(left, upper, right, lower)`` in pixels (PIL crop
            convention, right/lower exclusive), used when box cropping is on.
    """

    path: str
    label: int
    box: Box | None = None


class Splits(NamedTuple):
    """What a loader's :meth:`FileDataset.parse` returns: the official lists.

    Attributes:
        classes: Class names; ``classes[label]`` names a label.
        train: Official training records.
        test: Official test records.
        val: Official validation records, or ``None`` when the dataset has none (then
            ``val`` is carved from ``train``, see :func:`select_split`).
    """

    classes: list[str]
    train: list[Record]
    test: list[Record]
    val: list[Record] | None = None


def require_files(
    root: str | os.PathLike | None, relpaths: Iterable[str], source: DatasetSource
) -> Path:
    """Checks that a dataset's files exist (``relpaths`` below ``root``); returns ``root``.

    Raises:
        FileNotFoundError: ``root`` is ``None`` or missing, or a file is missing; the
            message names the first missing path, the layout and how to obtain it.
    """
    if root is None:
        problem = "no dataset root given (set dataset.root=... or BCNN_DATA)"
    elif not (root := Path(root)).is_dir():
        problem = f"dataset folder {root} does not exist"
    elif missing := [p for p in relpaths if not (root / p).exists()]:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}...)"
        problem = f"missing {root / missing[0]}{more if len(missing) > 1 else ''}"
    else:
        return root
    raise FileNotFoundError(
        f"{source.title}: {problem}.\nExpected layout:\n{source.layout.rstrip()}\n"
        f"How to obtain it: {source.how_to_obtain()}\n"
        "Point dataset.root=<folder> (or the BCNN_DATA environment variable) at the data."
    )


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


def class_folders(tree: Path) -> list[str]:
    """The sorted names of the folders in ``tree``, hidden ones left out."""
    return sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))


def splits_by_folder(lists: Mapping[str, Path], prefix: str) -> Splits:
    """Reads list files of ``<class>/<file>`` lines; classes are the sorted class folders.

    Args:
        lists: ``train``, ``test`` and optionally ``val`` -> its list file.
        prefix: The folder the listed paths are relative to, below the dataset folder.
    """
    paths = {s: [row[0] for row in read_rows(f, 0)] for s, f in lists.items()}
    classes = sorted({p.split("/", 1)[0] for ps in paths.values() for p in ps})
    index = {name: i for i, name in enumerate(classes)}
    records = {
        s: [Record(f"{prefix}/{p}", index[p.split("/", 1)[0]]) for p in ps]
        for s, ps in paths.items()
    }
    return Splits(classes, **records)


def split_train_val(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Carves a deterministic, class-stratified held-out set out of training records.

    Each class with ``n >= 2`` images gives ``clamp(round(fraction * n), 1, n - 1)`` of
    them (``fraction`` in ``[0, 1)``) to the held-out set. The choice depends only on
    ``seed``, the class and its set of paths, not on the order of ``records`` nor on the
    other classes.

    Returns:
        ``(kept, held_out)``, each in the order of ``records``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(records), []
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_class[record.label].append(i)
    held: set[int] = set()
    for label, indices in by_class.items():
        n = len(indices)
        if n < 2:
            continue
        k = min(n - 1, max(1, int(fraction * n + 0.5)))
        ordered = sorted(indices, key=lambda i: records[i].path)
        chosen = np.random.default_rng([seed, label]).choice(n, size=k, replace=False)
        held.update(ordered[j] for j in chosen)
    kept = [r for i, r in enumerate(records) if i not in held]
    return kept, [r for i, r in enumerate(records) if i in held]


def select_split(
    split: str,
    *,
    train: Sequence[Record],
    test: Sequence[Record],
    val: Sequence[Record] | None = None,
    val_fraction: float = 0.1,
    val_seed: int = 0,
) -> list[Record]:
    """The records of ``split`` (one of ``SPLITS``) from a dataset's official lists.

    Without an official ``val`` list, ``train``/``val`` are carved from ``train`` by
    :func:`split_train_val` (``val_fraction``, ``val_seed``) and ``trainval`` is all of
    it; with one, ``train``/``val`` are the official lists and ``trainval`` their union.
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


def check_disjoint(splits: Splits, folder: Path, title: str) -> None:
    """Raises ``ValueError`` naming an image listed in two of the official splits."""
    lists = {s: getattr(splits, s) for s in ("train", "val", "test") if getattr(splits, s)}
    seen: dict[str, str] = {}
    for split, records in lists.items() if len(lists) > 1 else ():
        for record in records:
            path = os.path.normpath(os.path.join(folder, record.path))
            if seen.setdefault(path, split) != split:
                raise ValueError(
                    f"{title}: {path} is listed in both {seen[path]} and {split}: a model "
                    "would be tested on an image it trained on; list it in one split only"
                )


def _remove_skip_log(folder: Path, owner_pid: int) -> None:
    # Forked DataLoader workers inherit this finalizer with their copy of the dataset:
    # only the process that chose the folder may remove it.
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


class RecordDataset(Dataset):
    """A map-style dataset over ``(path, label[, box])`` records.

    An image that cannot be read raises :class:`BadImageError` naming its path and the
    fixes (``on_bad_image="fail"``) or is skipped (``"skip"``): replaced by the next
    readable record in index order, with its label (docs/datasets.md). Each skip is
    appended to a log file per process, in a temporary folder named when the dataset is
    built, so :meth:`skipped` in the main process lists what DataLoader workers skipped.

    Attributes:
        root: The dataset folder record paths are relative to.
        records: The records of this split.
        classes: Class names; ``classes[label]`` names a label.
        transform: Callable applied to the PIL RGB image, or ``None`` (PIL images out).
        on_bad_image: ``"fail"`` or ``"skip"``.
        box_crop: Whether images are cropped to their record's box.
    """

    @checked
    def __init__(
        self,
        root: str | os.PathLike,
        records: Sequence[Record],
        classes: Sequence[str],
        transform: Transform = None,
        augment: bool = False,
        on_bad_image: BadImagePolicy = "fail",
        box_crop: bool = False,
    ) -> None:
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
        self._skip_log: Path | None = None
        if on_bad_image == "skip":
            # Named now, in the building process, so every worker writes into the same
            # folder; created only when something is skipped.
            name = f"bcnn-skipped-{os.getpid()}-{uuid.uuid4().hex}"
            self._skip_log = Path(tempfile.gettempdir()) / name
            weakref.finalize(self, _remove_skip_log, self._skip_log, os.getpid())

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(absolute path, label)`` pairs, as in ``torchvision.datasets.ImageFolder``."""
        return [(str(self.root / r.path), r.label) for r in self.records]

    @property
    def targets(self) -> list[int]:
        """The label of every record, in order."""
        return [r.label for r in self.records]

    def skipped(self) -> list[str]:
        """Full paths of the images skipped so far by any process, each once, in order."""
        indices = set(self._bad)
        if self._skip_log is not None and self._skip_log.is_dir():
            for log in self._skip_log.glob("*.txt"):
                indices.update(int(line) for line in log.read_text().split())
        return [str(self.root / self.records[i].path) for i in sorted(indices)]

    @property
    def num_skipped(self) -> int:
        """Number of images skipped so far in any process (``len(skipped())``)."""
        return len(self.skipped())

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
                    raise BadImageError(f"{err}; {self.bad_image_fix()}") from err
                self._skip(i, err)
                continue
            return (image if self.transform is None else self.transform(image)), record.label
        raise BadImageError(f"{type(self).__name__}: no readable image left in this split")

    def _skip(self, index: int, err: BadImageError) -> None:
        self._bad.add(index)
        # The message, not the error: a record holding its traceback would keep the dataset.
        logger.warning("Skipping unreadable image (on_bad_image=skip): %s", str(err))
        assert self._skip_log is not None
        try:
            self._skip_log.mkdir(exist_ok=True)
            # One small append per skip: whole lines, never interleaved across processes.
            with open(self._skip_log / f"{os.getpid()}.txt", "a", encoding="utf-8") as f:
                f.write(f"{index}\n")
        except OSError as log_err:
            logger.warning("Cannot record the skip in %s: %s", self._skip_log, log_err)

    def bad_image_fix(self) -> str:
        """What to do about an unreadable image, for the error that names it."""
        return "set dataset.on_bad_image=skip to train without it"

    def load_image(self, record: Record) -> Image.Image:
        """Opens one record's image as upright RGB, cropped as configured.

        Raises:
            BadImageError: The file is missing, truncated, too large or not a decodable
                image (see :func:`bcnn.data.images.open_rgb`).
        """
        return open_rgb(self.root / record.path, lambda image: self.crop(image, record))

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
        """Writes the split as ``<relpath> <label>`` lines (split at the last space)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{r.path} {r.label}\n" for r in self.records)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"


class FileDataset(RecordDataset):
    """A dataset read from files below a root folder: the base of every loader.

    A subclass declares ``source`` (its :class:`~bcnn.data.source.DatasetSource`),
    ``folders`` (where below ``root`` the dataset folder may sit, the documented one
    first), ``files`` (what must exist in it; the first marks the folder) and
    ``box_file`` (read when ``bbox_crop`` is on; ``""`` when the boxes come with the
    annotations, ``None`` when there are none), and implements :meth:`parse`
    (docs/datasets.md, "Adding a dataset").

    Args:
        root: The folder holding the dataset (``dataset.root``).
        split: ``train``, ``val``, ``trainval`` or ``test`` (see :func:`select_split`).
        transform: A transform recipe (see :mod:`bcnn.data.transforms`) or a callable
            applied to the PIL RGB image.
        augment: Random crops and flips of the recipe (training) or not (evaluation).
        val_fraction: Share of each class of the official train set held out as ``val``
            (unused where the dataset has an official val set).
        val_seed: Seed of that hold-out.
        on_bad_image: ``"fail"`` or ``"skip"`` (see :class:`RecordDataset`).
        bbox_crop: Crop every image to its annotated box (datasets with boxes only).
        name: The dataset's name in results (default: ``source.name``).

    Raises:
        FileNotFoundError: A file the dataset needs is missing.
        ValueError: An annotation file is inconsistent, or an image is in two splits.
    """

    source: ClassVar[DatasetSource]
    folders: tuple[str, ...] = (".",)  # a loader may set its own in __init__ (iNat)
    files: ClassVar[tuple[str, ...]] = ()
    box_file: ClassVar[str | None] = None

    @classmethod
    def config_problem(cls, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """Only a dataset with object boxes crops to them."""
        if values.get("bbox_crop") and cls.box_file is None:
            return "bbox_crop", f"{cls.source.title} has no object boxes: set bbox_crop=false"
        return None

    @checked
    def __init__(
        self,
        root: str | os.PathLike | None,
        split: Split,
        transform: Transform = None,
        augment: bool = False,
        val_fraction: Fraction = 0.1,
        val_seed: Seed = 0,
        on_bad_image: BadImagePolicy = "fail",
        bbox_crop: bool = False,
        name: NonEmpty | None = None,
    ) -> None:
        # Set before parsing, which may read them (iNat reads one split's file).
        self.split, self.box_crop, self.on_bad_image = split, bool(bbox_crop), on_bad_image
        folder = self.locate(root)
        folder = require_files(folder, self.required_files(folder), self.source)
        parsed = self.parse(folder)
        check_disjoint(parsed, folder, self.source.title)
        records = select_split(
            split,
            train=parsed.train,
            test=parsed.test,
            val=parsed.val,
            val_fraction=val_fraction,
            val_seed=val_seed,
        )
        super().__init__(
            folder, records, parsed.classes, transform, augment, on_bad_image, self.box_crop
        )
        self.name = name or self.source.name

    def bad_image_fix(self) -> str:
        """Skip it, or list every unreadable image with the verify command."""
        verify = VERIFY_COMMAND.format(name=self.source.name, root=shlex.quote(str(self.root)))
        return f"{super().bad_image_fix()}, or list every unreadable one with `{verify}`"

    def locate(self, root: str | os.PathLike | None) -> Path | None:
        """The first of ``folders`` below ``root`` holding the first required file, else
        the first of them, the documented layout (``None`` when ``root`` is)."""
        if root is None:
            return None
        found = [Path(root).expanduser() / sub for sub in self.folders]
        marker = self.required_files(None)[:1]
        return next((f for f in found if all((f / m).exists() for m in marker)), found[0])

    def required_files(self, folder: Path | None) -> list[str]:
        """What the dataset folder must hold (``folder`` is ``None`` while locating it)."""
        return [*self.files, *([self.box_file] if self.box_crop and self.box_file else [])]

    def parse(self, folder: Path) -> Splits:
        """Reads the dataset's own files in ``folder`` into its official lists and classes."""
        raise NotImplementedError
