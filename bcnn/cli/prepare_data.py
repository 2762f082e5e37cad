"""Download, install and verify the benchmark datasets.

Installed as ``bcnn-prepare-data``; ``python scripts/prepare_data.py`` runs the same.

Examples:
    bcnn-prepare-data dataset=cub                  # download into data/cub
    bcnn-prepare-data --dataset dtd --root /data/dtd --verify
    bcnn-prepare-data dataset=inat variant=2021_mini
    bcnn-prepare-data dataset=nabirds --archive ~/Downloads/nabirds.tar.gz
    bcnn-prepare-data dataset=inat --verify version=2021 mini=true

Exit status: 0 on success; 1 when files are missing or unreadable, a download or
checksum failed, or a dataset has no public download (its manual steps are printed);
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import textwrap
import urllib.error
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_class
from tqdm import tqdm

from bcnn.data.base import BadImageError, FileDataset, Record
from bcnn.data.download import (
    DATA_ENV,
    MIRROR_ENV,
    ChecksumError,
    ExtractionError,
    install_local,
    prepare,
)
from bcnn.data.source import DatasetSource
from bcnn.errors import run_command


# ---- datasets, found through their configs' _target_ -----------------------------------
def dataset_config(name: str) -> dict[str, Any]:
    """The raw (unresolved) ``configs/dataset/<name>.yaml``; ``{}`` when there is none."""
    path = resources.files("bcnn.configs") / "dataset" / f"{name}.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


@functools.cache
def loaders() -> dict[str, type[FileDataset]]:
    """Config name -> loader class, for every dataset config whose target reads files."""
    found = {}
    for path in sorted(resources.files("bcnn.configs").joinpath("dataset").iterdir()):
        name = path.name.removesuffix(".yaml")
        target = dataset_config(name).get("_target_") if path.name.endswith(".yaml") else None
        cls = get_class(target) if target else None
        if isinstance(cls, type) and issubclass(cls, FileDataset):
            found[name] = cls
    return found


def sources() -> dict[str, DatasetSource]:
    """Config name -> source, for the datasets whose files can be downloaded or installed."""
    return {n: c.source for n, c in loaders().items() if c.source.downloadable}


def dataset_options(name: str) -> dict[str, Any]:
    """The dataset options of its config (no target, name, root, transform or defaults).

    ``--verify`` checks exactly the images a training run with that config would read.
    (``defaults`` is the config's Hydra defaults list, the recipe it selects.)
    """
    skip = ("_target_", "name", "root", "transform", "defaults")
    return {k: v for k, v in dataset_config(name).items() if k not in skip}


# ---- verification -----------------------------------------------------------------------
def scan_images(
    dataset: FileDataset, workers: int = 8, progress: bool = True
) -> list[tuple[str, str]]:
    """Decodes every image of a dataset.

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
        bar = tqdm(results, total=len(dataset), desc="verify", disable=not progress)
        return [r for r in bar if r]


def verify(
    name: str, root: str | os.PathLike, workers: int = 8, progress: bool = True, **options: Any
) -> tuple[int, list[tuple[str, str]]]:
    """Parses a prepared dataset and decodes every image of its official splits.

    Args:
        name: The dataset's config name.
        root: Its root folder.
        workers: Decoding threads.
        progress: Show a tqdm bar.
        **options: Dataset options (``version``, ``partition``...).

    Returns:
        ``(number of images checked, [(path, problem), ...])``.

    Raises:
        FileNotFoundError: A list or annotation file is missing (see the loaders).
    """
    cls = loaders()[name]
    options = {**options, "on_bad_image": "fail", "transform": None}
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for split in ("trainval", "test"):
        dataset = cls(str(root), split, **options)
        # Splits may share images (DTD partitions do not, but be safe): check each once.
        dataset.records = [r for r in dataset.records if r.path not in seen]
        seen.update(r.path for r in dataset.records)
        problems += scan_images(dataset, workers, progress)
    return len(seen), problems


# ---- command line -----------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    """The flags; ``key=value`` pairs are collected as ``overrides``."""
    parser = argparse.ArgumentParser(
        prog="bcnn-prepare-data",
        description="Download, install and verify the datasets (see docs/datasets.md). "
        "Arguments may also be given Hydra-style: dataset=NAME root=DIR variant=V; other "
        "key=value pairs are dataset options for --verify (e.g. version=2021 partition=3).",
        epilog=dataset_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(loaders()), help="dataset to prepare")
    parser.add_argument(
        "--root", help=f"dataset folder (default ${DATA_ENV}/<dataset> or data/<dataset>)"
    )
    parser.add_argument(
        "--variant", help="file set to download (iNat: 2017, 2018, 2021, 2021_mini)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="check that every image exists and decodes"
    )
    parser.add_argument(
        "--archive",
        nargs="+",
        default=[],
        metavar="FILE",
        help="install files obtained by hand (checksummed)",
    )
    parser.add_argument(
        "--base-url", help=f"download from a mirror <url>/<dataset>/<file> (or ${MIRROR_ENV})"
    )
    parser.add_argument(
        "--keep-archives", action="store_true", help="keep archives after extraction"
    )
    parser.add_argument("--workers", type=int, default=8, help="decoding threads for --verify")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dataset=, root=, variant=, options"
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parses flags and ``key=value`` pairs; returns the arguments and the dataset options."""
    parser = build_parser()
    # Intermixed: key=value pairs may come after --flags (dataset=inat --verify version=2021).
    args = parser.parse_intermixed_args(argv)

    options: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"expected key=value, got {item!r}")
        if key in ("dataset", "root", "variant"):
            setattr(args, key, value)
        else:
            options[key] = yaml.safe_load(value)  # "2021" -> 2021, "true" -> True
    if args.dataset is None:
        parser.error("no dataset given (--dataset NAME or dataset=NAME)")
    if args.dataset not in loaders():
        parser.error(f"unknown dataset {args.dataset!r}; choose from {sorted(loaders())}")
    if args.root is None:
        args.root = str(Path(os.environ.get(DATA_ENV, "data")) / args.dataset)
    return args, options


def main(argv: list[str] | None = None) -> int:
    """Runs the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    return run_command("bcnn-prepare-data", _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, options = parse_args(None if argv is None else list(argv))
    name, root, progress = args.dataset, Path(args.root), not args.no_progress
    source = loaders()[name].source
    try:
        for archive in args.archive:
            known = install_local(source, archive, root, progress)
            checked = "md5 ok" if known and known.md5 else "not checksummed"
            print(f"installed {archive} ({checked})")
        if not args.archive and not args.verify:
            if not source.variants:
                print(f"{source.title}: {source.manual.strip()}")
                print(f"Then: bcnn-prepare-data --dataset {name} --root {root} --verify")
                return 1
            fetched = prepare(
                source, root, args.variant, args.base_url, args.keep_archives, progress
            )
            print(f"{source.title} ready in {root}; fetched: {', '.join(fetched) or 'nothing'}")
    except (ChecksumError, ExtractionError, urllib.error.URLError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    if args.verify:
        options = {**dataset_options(name), **options}
        try:
            count, problems = verify(name, root, args.workers, progress, **options)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for path, problem in problems:
            print(f"{path}: {problem}")
        missing = sum(p == "missing" for _, p in problems)
        summary = f"{count} images, {missing} missing, {len(problems) - missing} unreadable"
        print(f"{source.title} in {root}: {summary}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
