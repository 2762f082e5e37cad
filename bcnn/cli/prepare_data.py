"""``bcnn-prepare-data dataset=<name> [verify=true]`` (= ``python scripts/prepare_data.py``):
download, install and verify the benchmark datasets (``configs/prepare_data.yaml``,
docs/datasets.md). Without ``dataset=`` it lists them, their sources and layouts.

Exit status 1: files missing or unreadable, a failed download or checksum, or a dataset
with no public download (its manual steps are printed).
"""

from __future__ import annotations

import functools
import sys
import textwrap
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import hydra
import yaml
from hydra.utils import get_class
from omegaconf import DictConfig
from tqdm import tqdm

from bcnn.cli.overrides import check_overrides
from bcnn.config import instantiate
from bcnn.data.base import FileDataset, Record
from bcnn.data.download import DATA_ENV, install_local, mirror_url, prepare
from bcnn.data.source import DatasetSource
from bcnn.errors import BadImageError, user_errors

PROG = "bcnn-prepare-data"


@functools.cache
def loaders() -> dict[str, type[FileDataset]]:
    """Config name -> loader class, for every dataset config whose target reads files."""
    found = {}
    folder = resources.files("bcnn.configs").joinpath("dataset")
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        target = yaml.safe_load(path.read_text(encoding="utf-8")).get("_target_")
        cls = get_class(target) if target else None
        if isinstance(cls, type) and issubclass(cls, FileDataset):
            found[path.name.removesuffix(".yaml")] = cls
    return found


def sources() -> dict[str, DatasetSource]:
    """Config name -> source, for the datasets whose files can be downloaded or installed."""
    return {n: c.source for n, c in loaders().items() if c.source.downloadable}


def dataset_help() -> str:
    """Per dataset: where to get it, where to put it, the layout."""
    blocks = []
    for name, source in sources().items():
        if source.variants:
            files = "\n".join(
                f"    [{variant}] {a.url}" + (f"  md5 {a.md5}" if a.md5 else "  (no published md5)")
                for variant, archives in source.variants.items()
                for a in archives
            )
            get = f"  get: automatic download (default variant: {source.default_variant})\n{files}"
        else:
            known = "\n".join(f"    {a.filename}  md5 {a.md5}" for a in source.known_files)
            get = f"  get: manual, {source.manual.strip()}\n  files with known checksums:\n{known}"
        layout = textwrap.indent(source.layout, "    ")
        blocks.append(
            f"{name}: {source.title}  <{source.homepage}>\n{get}\n"
            f"  put: ${DATA_ENV}/{name} (default data/{name}); layout:\n{layout}"
        )
    return "\n\n".join(blocks)


def _problem(dataset: FileDataset, record: Record) -> tuple[str, str] | None:
    """``(path, "missing" | "unreadable (...)")`` for a bad image, None for a good one."""
    path = dataset.root / record.path
    if not path.is_file():
        return str(path), "missing"
    try:
        dataset.load_image(record)
    except BadImageError as err:
        return str(path), f"unreadable ({err.__cause__ or err})"
    return None


def verify(cfg: DictConfig) -> tuple[int, list[tuple[str, str]]]:
    """Parses a prepared dataset as training would and decodes every image of its official
    splits, in ``cfg.workers`` threads (PIL releases the GIL).

    Returns:
        ``(number of images checked, [(path, problem), ...])``.

    Raises:
        FileNotFoundError: A list or annotation file is missing (see the loaders).
    """
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for split in ("trainval", "test"):
        dataset = instantiate(
            cfg.dataset, root=str(cfg.root), split=split, augment=False, on_bad_image="fail"
        )
        # Splits may share images (DTD partitions do not, but be safe): check each once.
        records = [r for r in dataset.records if r.path not in seen]
        seen.update(r.path for r in records)
        with ThreadPoolExecutor(max_workers=int(cfg.workers)) as pool:
            found = pool.map(functools.partial(_problem, dataset), records)
            bar = tqdm(found, total=len(records), desc="verify", disable=not cfg.progress)
            problems += [p for p in bar if p]
    return len(seen), problems


def _download(cfg: DictConfig, source: DatasetSource, root: Path) -> int:
    """Downloads the dataset's files; an unreachable server names them and ``archive=``."""
    if not source.variants:
        print(f"{source.title}: {source.manual.strip()}")
        print(f"Then: {PROG} dataset={source.name} root={root} verify=true")
        return 1
    try:
        fetched = prepare(source, root, cfg.variant, cfg.base_url, cfg.keep_archives, cfg.progress)
    except urllib.error.URLError as err:
        files = source.variants.get(cfg.variant or source.default_variant, ())
        urls = " ".join(mirror_url(a, source.name, cfg.base_url) for a in files)
        raise OSError(
            f"could not download {source.title} ({err}): fetch {urls} on a machine that "
            f"can, then install it here with {PROG} dataset={source.name} root={root} "
            "archive=<file> (archive=[<file>,<file>] for several)"
        ) from err
    print(f"{source.title} ready in {root}; fetched: {', '.join(fetched) or 'nothing'}")
    return 0


def prepare_data(cfg: DictConfig) -> int:
    """Installs ``cfg.archive`` files, else downloads, and verifies with ``verify=true``.

    Returns:
        The exit status (module docstring).

    Raises:
        ValueError: no dataset with files to prepare is selected.
        OSError: a download, checksum or extraction failed (naming the file).
    """
    if cfg.get("dataset") is None:
        print(f"{PROG} dataset=<name> [root=<folder>] [verify=true] ...\n\n{dataset_help()}")
        return 0
    cls = get_class(cfg.dataset._target_)
    if not (issubclass(cls, FileDataset) and cls.source.downloadable):
        raise ValueError(
            f"dataset: {cfg.dataset.name} has no files to prepare; choose one of "
            f"{', '.join(sources())}"
        )
    source, root = cls.source, Path(cfg.root).expanduser()
    archives = [cfg.archive] if isinstance(cfg.archive, str) else list(cfg.archive or ())
    for archive in archives:
        known = install_local(source, Path(archive).expanduser(), root, cfg.progress)
        print(f"installed {archive} ({'md5 ok' if known and known.md5 else 'not checksummed'})")
    if not archives and not cfg.verify and _download(cfg, source, root):
        return 1
    if not cfg.verify:
        return 0
    count, problems = verify(cfg)
    for path, problem in problems:
        print(f"{path}: {problem}")
    missing = sum(p == "missing" for _, p in problems)
    summary = f"{count} images, {missing} missing, {len(problems) - missing} unreadable"
    print(f"{source.title} in {root}: {summary}")
    return 1 if problems else 0


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="prepare_data")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors(PROG):
        status = prepare_data(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    """``bcnn-prepare-data``: prepares a dataset."""
    check_overrides(PROG, "prepare_data")
    _hydra_main()
