"""Where each dataset comes from, and safe download, checksum and extraction.

``SOURCES`` is the one table of download URLs, MD5s, expected layouts and manual steps:
the loaders quote it in their missing-file errors, ``scripts/prepare_data.py`` uses it to
download and to print its ``--help``, and ``docs/datasets.md`` mirrors it.

Extraction is safe by construction: every member of a tar or zip archive is checked
before anything is written (no absolute paths, no ``..``, no links leaving the folder, no
device files), the archive is unpacked into a temporary folder next to its target, and
only a complete extraction is moved into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from bcnn.data.base import BadImageError, Record, RecordDataset

logger = logging.getLogger(__name__)

# Set to an http(s) base URL to download from a mirror laid out as <base>/<dataset>/<file>.
MIRROR_ENV = "BCNN_DATA_MIRROR"
DATA_ENV = "BCNN_DATA"


class ChecksumError(ValueError):
    """A downloaded or given file does not have the published MD5."""


class ExtractionError(RuntimeError):
    """An archive is corrupt or cannot be unpacked."""


class UnsafeArchiveError(ExtractionError):
    """An archive member would be written outside the target folder, or is not a plain file."""


@dataclass(frozen=True)
class Archive:
    """One downloadable file of a dataset.

    Attributes:
        url: Official URL.
        md5: Published MD5, or ``None`` where the host publishes none.
        subdir: Folder below the dataset root it is extracted (or copied) into.
        creates: Path below the dataset root that exists once this file is in place;
            :func:`fetch` skips the file when it exists.
        extract: ``False`` for plain files (list files, ``.mat``) copied as they are.
    """

    url: str
    md5: str | None
    subdir: str = ""
    creates: str = ""
    extract: bool = True

    @property
    def filename(self) -> str:
        """The file name of the URL, without its query string."""
        return self.url.split("?", 1)[0].rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSource:
    """How to obtain one dataset and how it must sit on disk.

    Attributes:
        name: Registry key (``cub``, ``aircraft``, ...), also the folder name below
            ``$BCNN_DATA``.
        title: Human-readable name.
        homepage: The dataset's page.
        layout: The folder tree the loader expects, relative to ``dataset.root``.
        variants: Downloadable file sets by variant name; empty when there is no public
            download and ``manual`` applies.
        default_variant: The variant :func:`prepare` downloads by default.
        manual: Manual steps (gated or dead hosts).
        known_files: Further files with known MD5s that users obtain by hand and pass
            to :func:`install_local`.
    """

    name: str
    title: str
    homepage: str
    layout: str
    variants: Mapping[str, tuple[Archive, ...]] = field(default_factory=dict)
    default_variant: str = "default"
    manual: str = ""
    known_files: tuple[Archive, ...] = ()

    def how_to_obtain(self) -> str:
        """One paragraph for error messages: the command to run or the manual steps."""
        if not self.variants:
            return f"no public download; {self.manual.strip()}"
        urls = ", ".join(a.url for a in self.variants[self.default_variant])
        return (
            f"run `python scripts/prepare_data.py --dataset {self.name} --root <root>` "
            f"(downloads {urls}), or download from {self.homepage} and extract into the root."
        )

    def all_files(self) -> tuple[Archive, ...]:
        """Every file with a known name and checksum, downloadable or not."""
        files = [a for archives in self.variants.values() for a in archives]
        return tuple(dict.fromkeys([*files, *self.known_files]))


_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com"
# The 2021 validation images and annotations, shared by the full and the mini train sets.
_INAT_2021_VAL = (
    Archive(
        f"{_INAT}/2021/val.tar.gz",
        "f6f6e0e242e3d4c9569ba56400938afc",
        subdir="2021",
        creates="2021/val",
    ),
    Archive(
        f"{_INAT}/2021/val.json.tar.gz",
        "4d761e0f6a86cc63e8f7afc91f6a8f0b",
        subdir="2021",
        creates="2021/val.json",
    ),
)
_CARS = "http://ai.stanford.edu/~jkrause"

SOURCES: dict[str, DatasetSource] = {
    s.name: s
    for s in [
        DatasetSource(
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
        ),
        DatasetSource(
            name="aircraft",
            title="FGVC-Aircraft 2013b",
            homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
            layout="""\
<root>/                        e.g. data/aircraft (root may also be .../data itself)
  fgvc-aircraft-2013b/data/
    images/<7-digit id>.jpg
    variants.txt  families.txt  manufacturers.txt
    images_{variant,family,manufacturer}_{train,val,test}.txt
    images_box.txt             (used by bbox_crop)""",
            variants={
                "default": (
                    Archive(
                        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                        "d4acdd33327262359767eeaa97a4f732",
                        creates="fgvc-aircraft-2013b/data/variants.txt",
                    ),
                )
            },
        ),
        DatasetSource(
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
the original host ai.stanford.edu/~jkrause is offline (torchvision issue #7545).
  1. Images: Kaggle dataset jessicali9530/stanford-cars-dataset (cars_train/, cars_test/),
     or car_ims.tgz + cars_annos.mat from an archive mirror (layout B).
  2. Devkit: car_devkit.tgz, re-hosted at
     https://github.com/pytorch/vision/files/11644847/car_devkit.tgz
  3. Test labels: cars_test_annos_withlabels.mat (e.g. a Kaggle mirror); put it in the
     root or in devkit/.
  4. Install each file with checksum verification where its MD5 is known:
     python scripts/prepare_data.py --dataset cars --root data/cars --archive FILE ...""",
            known_files=(
                Archive(
                    f"{_CARS}/cars/car_devkit.tgz",
                    "c3b158d763b6e2245038c8ad08e45376",
                    creates="devkit",
                ),
                Archive(
                    f"{_CARS}/car196/cars_train.tgz",
                    "065e5b463ae28d29e77c1b4b166cfe61",
                    creates="cars_train",
                ),
                Archive(
                    f"{_CARS}/car196/cars_test.tgz",
                    "4ce7ebf6a94d07f1952d94dd34c4d501",
                    creates="cars_test",
                ),
                Archive(
                    f"{_CARS}/car196/cars_test_annos_withlabels.mat",
                    "b0a2b23655a3edd16d84508592a98d10",
                    creates="cars_test_annos_withlabels.mat",
                    extract=False,
                ),
                Archive(
                    f"{_CARS}/car196/car_ims.tgz",
                    "d5c8f0aa497503f355e17dc7886c3f14",
                    creates="car_ims",
                ),
                Archive(
                    f"{_CARS}/car196/cars_annos.mat",
                    "b407c6086d669747186bd1d764ff9dbc",
                    creates="cars_annos.mat",
                    extract=False,
                ),
            ),
        ),
        DatasetSource(
            name="nabirds",
            title="NABirds",
            homepage="https://dl.allaboutbirds.org/nabirds",
            layout="""\
<root>/                        e.g. data/nabirds (root may also be nabirds/ itself)
  nabirds/
    images/<4-digit class id>/<uuid>.jpg
    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt  hierarchy.txt
    bounding_boxes.txt         (used by bbox_crop)""",
            manual="""\
access is gated: fill in the form at https://dl.allaboutbirds.org/nabirds to get the
  link to nabirds.tar.gz, then install it with checksum verification:
     python scripts/prepare_data.py --dataset nabirds --root data/nabirds \\
         --archive nabirds.tar.gz""",
            known_files=(
                Archive(
                    "https://dl.allaboutbirds.org/nabirds/nabirds.tar.gz",
                    "df21a9e4db349a14e2b08adfd45873bd",
                    creates="nabirds/images.txt",
                ),
            ),
        ),
        DatasetSource(
            name="inat",
            title="iNaturalist 2017 / 2018 / 2021",
            homepage="https://github.com/visipedia/inat_comp",
            layout="""\
<root>/                        e.g. data/inat; one folder per version:
  2017/  train2017.json  val2017.json   train_val_images/<Super>/<species>/<md5>.jpg
  2018/  train2018.json  val2018.json  [categories.json: real names]
         train_val2018/<Super>/<category id>/<md5>.jpg
  2021/  train.json or train_mini.json  val.json
         train/ or train_mini/<NNNNN_Kingdom_..._species>/<uuid>.jpg   val/...""",
            default_variant="2018",
            variants={
                "2017": (
                    Archive(
                        f"{_INAT}/2017/train_val_images.tar.gz",
                        "7c784ea5e424efaec655bd392f87301f",
                        subdir="2017",
                        creates="2017/train_val_images",
                    ),
                    Archive(
                        f"{_INAT}/2017/train_val2017.zip",
                        None,
                        subdir="2017",
                        creates="2017/train2017.json",
                    ),
                ),
                "2018": (
                    Archive(
                        f"{_INAT}/2018/train_val2018.tar.gz",
                        "b1c6952ce38f31868cc50ea72d066cc3",
                        subdir="2018",
                        creates="2018/train_val2018",
                    ),
                    Archive(
                        f"{_INAT}/2018/train2018.json.tar.gz",
                        "bfa29d89d629cbf04d826a720c0a68b0",
                        subdir="2018",
                        creates="2018/train2018.json",
                    ),
                    Archive(
                        f"{_INAT}/2018/val2018.json.tar.gz",
                        "f2ed8bfe3e9901cdefceb4e53cd3775d",
                        subdir="2018",
                        creates="2018/val2018.json",
                    ),
                    Archive(
                        f"{_INAT}/2018/categories.json.tar.gz",
                        None,
                        subdir="2018",
                        creates="2018/categories.json",
                    ),
                ),
                "2021": (
                    Archive(
                        f"{_INAT}/2021/train.tar.gz",
                        "e0526d53c7f7b2e3167b2b43bb2690ed",
                        subdir="2021",
                        creates="2021/train",
                    ),
                    Archive(
                        f"{_INAT}/2021/train.json.tar.gz",
                        "38a7bb733f7a09214d44293460ec0021",
                        subdir="2021",
                        creates="2021/train.json",
                    ),
                    *_INAT_2021_VAL,
                ),
                "2021_mini": (
                    Archive(
                        f"{_INAT}/2021/train_mini.tar.gz",
                        "db6ed8330e634445efc8fec83ae81442",
                        subdir="2021",
                        creates="2021/train_mini",
                    ),
                    Archive(
                        f"{_INAT}/2021/train_mini.json.tar.gz",
                        "395a35be3651d86dc3b0d365b8ea5f92",
                        subdir="2021",
                        creates="2021/train_mini.json",
                    ),
                    *_INAT_2021_VAL,
                ),
            },
        ),
        DatasetSource(
            name="dtd",
            title="Describable Textures Dataset (DTD)",
            homepage="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
            layout="""\
<root>/                        e.g. data/dtd (root may also be dtd/ itself)
  dtd/
    images/<class>/<class>_<NNNN>.jpg
    labels/{train,val,test}{1..10}.txt""",
            variants={
                "default": (
                    Archive(
                        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                        "fff73e5086ae6bdbea199a49dfb8a4c1",
                        creates="dtd/labels/train1.txt",
                    ),
                )
            },
        ),
        DatasetSource(
            name="fmd",
            title="Flickr Material Database (FMD)",
            homepage="https://people.csail.mit.edu/celiu/CVPR2010/FMD/",
            layout="""\
<root>/                        e.g. data/fmd (the zip has no top folder)
  image/<material>/<material>_<moderate|object|final>_<NNN>_new.jpg
  mask/...                     (not used)""",
            variants={
                "default": (
                    Archive(
                        "http://people.csail.mit.edu/celiu/CVPR2010/FMD/FMD.zip",
                        "0721ba72cd981aa9599a81bbfaaebd75",
                        creates="image",
                    ),
                )
            },
        ),
        DatasetSource(
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
                    Archive(
                        "http://web.mit.edu/torralba/www/TrainImages.txt",
                        None,
                        creates="TrainImages.txt",
                        extract=False,
                    ),
                    Archive(
                        "http://web.mit.edu/torralba/www/TestImages.txt",
                        None,
                        creates="TestImages.txt",
                        extract=False,
                    ),
                )
            },
        ),
    ]
}


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Downloads ``url`` to ``dest``, checking its MD5 on the fly.

    The data goes to ``<dest>.part`` and is renamed only once complete and verified;
    on any failure the partial file is deleted.

    Raises:
        ChecksumError: The file's MD5 differs from ``md5``.
        urllib.error.URLError: The server cannot be reached or answers with an error.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    if md5 is None:
        logger.warning("No published checksum for %s: downloading it unverified", url)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "bcnn-prepare-data"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise ChecksumError(
                f"MD5 of {url} is {digest.hexdigest()}, expected {md5}: download corrupt or changed"
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def _check_member_path(name: str) -> None:
    """Rejects absolute names and any ``..`` component."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(
            f"archive member {name!r} would be written outside the target folder"
        )


def _escapes(target: str) -> bool:
    return target.startswith("/") or target == ".." or target.startswith("../")


def _checked_tar_members(tar: tarfile.TarFile, bar: tqdm) -> Iterator[tarfile.TarInfo]:
    """Yields the members of ``tar`` after checking each, raising on the first unsafe one."""
    for member in tar:
        _check_member_path(member.name)
        if member.issym():
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(member.name), member.linkname)
            )
            if member.linkname.startswith("/") or _escapes(target):
                raise UnsafeArchiveError(
                    f"symlink {member.name!r} -> {member.linkname!r} leaves the target folder"
                )
        elif member.islnk():
            if _escapes(posixpath.normpath(member.linkname)):
                raise UnsafeArchiveError(
                    f"hard link {member.name!r} -> {member.linkname!r} leaves the target folder"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a device or fifo")
        bar.update(1)
        yield member


def _extract_into(archive: Path, folder: Path, progress: bool) -> None:
    with tqdm(unit=" files", desc=f"extract {archive.name}", disable=not progress) as bar:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    _check_member_path(info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise UnsafeArchiveError(f"zip member {info.filename!r} is a symlink")
                bar.total = len(infos)
                for info in infos:
                    zf.extract(info, folder)
                    bar.update(1)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                # The "data" filter (Python >= 3.11.4 / 3.10.12) re-checks what we checked,
                # and also drops setuid bits and ownership.
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(folder, members=_checked_tar_members(tar, bar), **extra)
        else:
            raise ExtractionError(
                f"{archive} is neither a tar nor a zip archive (corrupt download?)"
            )


def safe_extract(
    archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True
) -> list[str]:
    """Extracts a tar (any compression) or zip archive into ``dest``, all or nothing.

    Members are unpacked into a temporary folder inside ``dest`` and moved into ``dest``
    only when the whole archive was read without error. Existing entries are never
    overwritten.

    Args:
        archive: The archive file.
        dest: The target folder (created if missing).
        progress: Show a tqdm bar.

    Returns:
        The names of the top-level entries created in ``dest``.

    Raises:
        UnsafeArchiveError: A member has an absolute path, ``..``, a link leaving the
            folder, or is a device/fifo. Nothing is written to ``dest``.
        ExtractionError: The archive is corrupt or truncated. Nothing is written.
        FileExistsError: A top-level entry of the archive already exists in ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=dest))
    try:
        try:
            _extract_into(archive, tmp, progress)
        except UnsafeArchiveError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
            raise ExtractionError(f"cannot extract {archive}: {err}") from err
        entries = sorted(os.listdir(tmp))
        clashes = [e for e in entries if (dest / e).exists() or (dest / e).is_symlink()]
        if clashes:
            raise FileExistsError(
                f"{dest / clashes[0]} already exists; remove it to extract {archive.name} again"
            )
        for entry in entries:
            os.replace(tmp / entry, dest / entry)
        return entries
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _removed_if_failed(folder: Path) -> Iterator[None]:
    """Removes the folders this block creates on the way to ``folder`` if it raises."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
        raise


def mirror_url(archive: Archive, dataset: str, base_url: str | None) -> str:
    """The URL to fetch: the official one, or ``<base_url>/<dataset>/<file>`` for a mirror."""
    base_url = base_url or os.environ.get(MIRROR_ENV)
    return f"{base_url.rstrip('/')}/{dataset}/{archive.filename}" if base_url else archive.url


def fetch(
    archive: Archive,
    root: str | os.PathLike,
    dataset: str,
    base_url: str | None = None,
    keep_archive: bool = False,
    progress: bool = True,
) -> bool:
    """Downloads one file, verifies it and extracts (or places) it below ``root``.

    Args:
        archive: The file to fetch.
        root: The dataset root (``data/<dataset>``).
        dataset: Dataset name, used for the mirror URL.
        base_url: Mirror base URL; defaults to ``$BCNN_DATA_MIRROR``, else the official URL.
        keep_archive: Keep the downloaded archive after extraction.
        progress: Show tqdm bars.

    Returns:
        ``False`` when ``archive.creates`` already existed and nothing was done.

    Raises:
        ChecksumError, ExtractionError, UnsafeArchiveError, urllib.error.URLError: The
            download or extraction failed; partial files and folders created by this
            call are removed.
    """
    root = Path(root)
    if archive.creates and (root / archive.creates).exists():
        logger.info(
            "%s: %s already present, skipping %s", dataset, archive.creates, archive.filename
        )
        return False
    target = root / archive.subdir
    with _removed_if_failed(target):
        target.mkdir(parents=True, exist_ok=True)
        url = mirror_url(archive, dataset, base_url)
        if not archive.extract:
            download(url, target / archive.filename, archive.md5, progress)
            return True
        path = target / archive.filename
        if not (path.is_file() and archive.md5 and md5sum(path) == archive.md5):
            download(url, path, archive.md5, progress)
        try:
            safe_extract(path, target, progress)
        finally:
            if not keep_archive:
                path.unlink(missing_ok=True)
    return True


def prepare(
    name: str,
    root: str | os.PathLike,
    variant: str | None = None,
    base_url: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> list[str]:
    """Downloads, verifies and extracts every file of a dataset variant into ``root``.

    Returns:
        File names fetched (already present files are left out).

    Raises:
        ValueError: The dataset has no public download (see ``SOURCES[name].manual``) or
            the variant is unknown.
    """
    source = SOURCES[name]
    if not source.variants:
        raise ValueError(f"{source.title} has no public download: {source.manual}")
    variant = variant or source.default_variant
    if variant not in source.variants:
        raise ValueError(
            f"{name} variant must be one of {sorted(source.variants)}, got {variant!r}"
        )
    fetched = []
    for archive in source.variants[variant]:
        if fetch(archive, root, name, base_url, keep_archives, progress):
            fetched.append(archive.filename)
    return fetched


def install_local(
    name: str, path: str | os.PathLike, root: str | os.PathLike, progress: bool = True
) -> Archive | None:
    """Installs a file obtained by hand (gated or offline hosts) into a dataset root.

    A file whose name matches a known file of the dataset is checked against its MD5
    and placed where that file belongs; an unknown archive is extracted into ``root``
    unverified (a warning is logged).

    Returns:
        The matching known file, or ``None`` for an unknown one.

    Raises:
        ChecksumError: The MD5 differs from the published one.
    """
    path, root = Path(path), Path(root)
    known = {a.filename: a for a in SOURCES[name].all_files()}
    archive = known.get(path.name)
    if archive is None:
        logger.warning("%s is not a known %s file: extracting it without checksum", path.name, name)
    elif archive.md5 and (actual := md5sum(path)) != archive.md5:
        raise ChecksumError(f"MD5 of {path} is {actual}, expected {archive.md5}")
    target = root / (archive.subdir if archive else "")
    with _removed_if_failed(target):
        target.mkdir(parents=True, exist_ok=True)
        if archive is not None and not archive.extract:
            shutil.copyfile(path, target / path.name)
        else:
            safe_extract(path, target, progress)
    return archive


def scan_images(
    dataset: RecordDataset, workers: int = 8, progress: bool = True
) -> list[tuple[str, str]]:
    """Decodes every image of a :class:`~bcnn.data.base.RecordDataset`.

    Args:
        dataset: The dataset whose records to check.
        workers: Decoding threads (PIL releases the GIL while decoding).
        progress: Show a tqdm bar.

    Returns:
        ``(path, problem)`` for each missing or unreadable file, in record order.
    """

    def check(record: Record) -> tuple[str, str] | None:
        path = dataset.root / record.path
        if not path.is_file():
            return str(path), "missing"
        try:
            dataset.load_image(record)
        except BadImageError as err:
            return str(path), f"unreadable ({err.__cause__ or err})"
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, dataset.records)
        return [
            r for r in tqdm(results, total=len(dataset), desc="verify", disable=not progress) if r
        ]


def dataset_options(name: str) -> dict[str, Any]:
    """The dataset options of ``configs/dataset/<name>.yaml`` (no target, root or transform).

    ``--verify`` checks exactly the images a training run with that config would read.
    """
    from omegaconf import OmegaConf

    path = resources.files("bcnn.configs") / "dataset" / f"{name}.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.to_container(OmegaConf.create(path.read_text(encoding="utf-8")), resolve=False)
    return {k: v for k, v in cfg.items() if k not in ("_target_", "name", "root", "transform")}


def verify(
    name: str, root: str | os.PathLike, workers: int = 8, progress: bool = True, **options: Any
) -> tuple[int, list[tuple[str, str]]]:
    """Parses a prepared dataset and decodes every image of its official splits.

    Args:
        name: Registry key of the dataset.
        root: Its root folder.
        workers: Decoding threads.
        progress: Show a tqdm bar.
        **options: Dataset options (``version``, ``partition``...).

    Returns:
        ``(number of images checked, [(path, problem), ...])``.

    Raises:
        FileNotFoundError: A list or annotation file is missing (see the loaders).
    """
    from bcnn.data import build_dataset

    options = {**options, "on_bad_image": "fail", "transform": None}
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for split in ("trainval", "test"):
        dataset = build_dataset(name, root=str(root), split=split, **options)
        # Splits may share images (DTD partitions do not, but be safe): check each once.
        dataset.records = [r for r in dataset.records if r.path not in seen]
        seen.update(r.path for r in dataset.records)
        problems += scan_images(dataset, workers, progress)
    return len(seen), problems


__all__ = [
    "DATA_ENV",
    "MIRROR_ENV",
    "SOURCES",
    "Archive",
    "ChecksumError",
    "DatasetSource",
    "ExtractionError",
    "UnsafeArchiveError",
    "dataset_options",
    "download",
    "fetch",
    "install_local",
    "md5sum",
    "mirror_url",
    "prepare",
    "safe_extract",
    "scan_images",
    "verify",
]
