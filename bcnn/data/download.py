"""Fetching a dataset's files: what no library does for us.

torchvision downloads and checksums; ``tarfile``'s ``"data"`` filter (and ``zipfile``
itself) keeps every member inside the target folder. This module adds all-or-nothing
downloads and extraction (a failure leaves nothing behind, not even the folders it
created), mirrors (``<base_url>/<dataset>/<file>``) and files obtained by hand, checked
against their published MD5 by file name. What to fetch is each loader's ``source``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchvision.datasets.utils import calculate_md5, download_url
from tqdm import tqdm

from bcnn.data.source import Archive, DatasetSource

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


def check_md5(path: str | os.PathLike, md5: str | None, what: str) -> None:
    """Raises :class:`ChecksumError` naming ``what`` unless ``path`` has the MD5 ``md5``.

    ``md5=None`` (no published checksum) passes with a warning.
    """
    if md5 is None:
        logger.warning("No published checksum for %s: using it unverified", what)
    elif (actual := calculate_md5(path)) != md5.lower():
        raise ChecksumError(f"MD5 of {what} is {actual}, expected {md5}: file corrupt or changed")


def download(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Downloads ``url`` to ``dest`` with torchvision, then checks its MD5.

    The file is written into a temporary folder beside ``dest`` and moved to ``dest`` only
    once complete and verified; on any failure nothing is left behind.

    Raises:
        ChecksumError: The file's MD5 differs from ``md5``.
        urllib.error.URLError: The server cannot be reached or answers with an error.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        download_url(url, str(tmp), dest.name, max_redirect_hops=10)
        check_md5(tmp / dest.name, md5, url)
        os.replace(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_into(archive: Path, folder: Path, progress: bool) -> None:
    """Unpacks a tar or zip archive (told apart by content, not by name) into ``folder``."""
    bar = {"unit": " files", "desc": f"extract {archive.name}", "disable": not progress}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            # zipfile drops absolute prefixes and ".." from member names itself.
            zf.extractall(folder, members=tqdm(zf.infolist(), **bar))
    elif tarfile.is_tarfile(archive):
        if not hasattr(tarfile, "data_filter"):
            raise ExtractionError(
                "safe tar extraction needs tarfile filters (Python >= 3.10.12 or 3.11.4)"
            )
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(folder, members=tqdm(tar, **bar), filter="data")
            except tarfile.FilterError as err:
                raise UnsafeArchiveError(f"{archive.name}: {err}") from err
    else:
        raise ExtractionError(f"{archive} is neither a tar nor a zip archive (corrupt download?)")


def safe_extract(
    archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True
) -> list[str]:
    """Extracts a tar (any compression) or zip archive into ``dest``, all or nothing.

    Members are unpacked into a temporary folder inside ``dest`` (created if missing) and
    moved into it only when the whole archive was read; existing entries are never
    overwritten. Returns the names of the top-level entries created.

    Raises:
        UnsafeArchiveError: A tar member would land outside the folder (``..``, a link
            leaving it) or is a device or fifo. Nothing is written to ``dest``.
        ExtractionError: The archive is corrupt or truncated. Nothing is written.
        FileExistsError: A top-level entry of the archive already exists in ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=dest))
    try:
        try:
            _extract_into(archive, tmp, progress)
        except ExtractionError:
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
        progress: Show a progress bar while extracting.

    Returns:
        ``False`` when ``archive.creates`` already existed and nothing was done.

    Raises:
        ChecksumError, ExtractionError, UnsafeArchiveError, urllib.error.URLError: The
            download or extraction failed; what this call created is removed.
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
        path = target / archive.filename
        if not (path.is_file() and archive.md5 and calculate_md5(path) == archive.md5):
            download(mirror_url(archive, dataset, base_url), path, archive.md5)
        if not archive.extract:
            return True
        try:
            safe_extract(path, target, progress)
        finally:
            if not keep_archive:
                path.unlink(missing_ok=True)
    return True


def prepare(
    source: DatasetSource,
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
        ValueError: The dataset has no public download (see ``source.manual``) or the
            variant is unknown.
    """
    if not source.variants:
        raise ValueError(f"{source.title} has no public download: {source.manual}")
    variant = variant or source.default_variant
    if variant not in source.variants:
        raise ValueError(
            f"{source.name} variant must be one of {sorted(source.variants)}, got {variant!r}"
        )
    return [
        archive.filename
        for archive in source.variants[variant]
        if fetch(archive, root, source.name, base_url, keep_archives, progress)
    ]


def install_local(
    source: DatasetSource, path: str | os.PathLike, root: str | os.PathLike, progress: bool = True
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
    archive = {a.filename: a for a in source.all_files()}.get(path.name)
    if archive is None:
        logger.warning(
            "%s is not a known %s file: extracting it without checksum", path.name, source.name
        )
    else:
        check_md5(path, archive.md5, str(path))
    target = root / (archive.subdir if archive else "")
    with _removed_if_failed(target):
        target.mkdir(parents=True, exist_ok=True)
        if archive is not None and not archive.extract:
            shutil.copyfile(path, target / path.name)
        else:
            safe_extract(path, target, progress)
    return archive
