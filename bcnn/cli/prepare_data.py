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
import logging
import os
import sys
import textwrap
import urllib.error
from pathlib import Path
from typing import Any

import yaml

from bcnn.data import DATASETS
from bcnn.data.download import (
    DATA_ENV,
    MIRROR_ENV,
    SOURCES,
    ChecksumError,
    ExtractionError,
    dataset_options,
    install_local,
    prepare,
    verify,
)


def dataset_help() -> str:
    """Per dataset: where to get it, where to put it, the layout."""
    blocks = []
    for name, source in SOURCES.items():
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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parses flags and ``key=value`` pairs; returns the arguments and the dataset options."""
    parser = argparse.ArgumentParser(
        prog="bcnn-prepare-data",
        description="Download, install and verify the datasets (see docs/datasets.md). "
        "Arguments may also be given Hydra-style: dataset=NAME root=DIR variant=V; other "
        "key=value pairs are dataset options for --verify (e.g. version=2021 partition=3).",
        epilog=dataset_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(SOURCES), help="dataset to prepare")
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
    if args.dataset not in SOURCES or args.dataset not in DATASETS:
        parser.error(f"unknown dataset {args.dataset!r}; choose from {sorted(SOURCES)}")
    if args.root is None:
        args.root = str(Path(os.environ.get(DATA_ENV, "data")) / args.dataset)
    return args, options


def main(argv: list[str] | None = None) -> int:
    """Runs the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, options = parse_args(argv)
    name, root, progress = args.dataset, Path(args.root), not args.no_progress
    source = SOURCES[name]
    try:
        for archive in args.archive:
            known = install_local(name, archive, root, progress)
            checked = "md5 ok" if known and known.md5 else "not checksummed"
            print(f"installed {archive} ({checked})")
        if not args.archive and not args.verify:
            if not source.variants:
                print(f"{source.title} has no public download. Manual steps:")
                print(f"  {source.manual.strip()}")
                print(f"Then: bcnn-prepare-data --dataset {name} --root {root} --verify")
                return 1
            fetched = prepare(name, root, args.variant, args.base_url, args.keep_archives, progress)
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
