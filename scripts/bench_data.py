"""Data-loading throughput on the CPU: JPEG decoding plus augmentation at 448.

Measures images per second for one DataLoader worker (one thread, as PyTorch sets in
its workers) on synthetic ~500x375 JPEGs, the size of CUB and NABirds photos:

* decoding alone, PIL (``Image.open().convert("RGB")``, what the datasets use) versus
  ``torchvision.io.decode_jpeg``;
* decoding plus each train recipe of ``bcnn.data.transforms`` at 448, through the real
  ``RecordDataset`` (PIL) and through ``decode_jpeg`` feeding the same transform;
* a real ``DataLoader`` with 1..N workers, to check that workers scale.

From the per-worker rate it derives the workers needed to feed ``--target`` images/s
(500 by default, about what one GPU trains a VGG-16 B-CNN at 448 with). Writes
``<out>/data_loading_cpu.csv`` and ``.md`` and the "Data loading" section of
``<out>/README.md``.

Usage:
    python scripts/bench_data.py [--images 48] [--repeats 3] [--target 500]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg, read_file

from bcnn.data.base import Record, RecordDataset
from bcnn.data.transforms import build_transforms

RECIPES = {
    "short_side": {"recipe": "short_side", "size": 448, "hflip": True},
    "square": {"recipe": "square", "size": 448, "hflip": True},
    "resize_crop": {"recipe": "resize_crop", "resize": 512, "size": 448, "hflip": True},
}


def make_jpegs(
    folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0
) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields plus fine noise, saved at quality 90."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def rate(fn: Callable[[int], object], count: int, repeats: int) -> tuple[float, float]:
    """Runs ``fn(i)`` for ``i < count``, ``repeats`` times; returns (median seconds, images/s)."""
    fn(0)  # warm-up: first-call allocations and lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return seconds, count / seconds


def pil_decode(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def loader_rate(dataset: RecordDataset, workers: int, passes: int) -> float:
    """Images/s of a DataLoader after its first batch (worker start-up excluded)."""
    sampler = list(range(len(dataset))) * passes
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    first = next(iterator)
    start = time.perf_counter()
    seen = sum(len(batch[1]) for batch in iterator)
    del first
    return seen / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def write_readme_section(readme: Path, section: str) -> None:
    """Replaces (or appends) the ``## Data loading`` section, leaving the others alone."""
    text = readme.read_text() if readme.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Data loading\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="synthetic JPEGs to generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (median)")
    parser.add_argument("--target", type=float, default=500.0, help="images/s the loader must feed")
    parser.add_argument(
        "--max-workers", type=int, default=os.cpu_count() or 1, help="DataLoader check"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # what a DataLoader worker runs with
    load_before = os.getloadavg()[0]
    rows: list[dict[str, object]] = []

    def add(
        pipeline: str, decoder: str, recipe: str, seconds: float, per_s: float, workers: int = 1
    ) -> None:
        rows.append(
            {
                "pipeline": pipeline,
                "decoder": decoder,
                "recipe": recipe,
                "workers": workers,
                "images": args.images,
                "seconds": round(seconds, 4),
                "images_per_s": round(per_s, 1),
                "per_worker_images_per_s": round(per_s / workers, 1),
                "workers_for_target": math.ceil(args.target / (per_s / workers)),
            }
        )
        print(
            f"{pipeline:<22} {decoder:<12} {recipe:<12} workers={workers:<2} {per_s:8.1f} images/s",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        blobs = [read_file(str(p)) for p in paths]

        add("decode", "PIL", "-", *rate(lambda i: pil_decode(paths[i]), len(paths), args.repeats))
        add(
            "decode",
            "decode_jpeg",
            "-",
            *rate(lambda i: decode_jpeg(read_file(str(paths[i]))), len(paths), args.repeats),
        )
        add(
            "decode (in memory)",
            "decode_jpeg",
            "-",
            *rate(lambda i: decode_jpeg(blobs[i]), len(paths), args.repeats),
        )

        records = [Record(p.name, 0) for p in paths]
        for name, recipe in RECIPES.items():
            transform = build_transforms(recipe, augment=True)
            dataset = RecordDataset(tmp, records, ["x"], transform=transform)
            add(
                "decode+augment",
                "PIL",
                name,
                *rate(lambda i, d=dataset: d[i], len(paths), args.repeats),
            )
            add(
                "decode+augment",
                "decode_jpeg",
                name,
                *rate(
                    lambda i, t=transform: t(decode_jpeg(read_file(str(paths[i])))),
                    len(paths),
                    args.repeats,
                ),
            )
        eval_transform = build_transforms(RECIPES["short_side"], augment=False)
        dataset = RecordDataset(tmp, records, ["x"], transform=eval_transform)
        add(
            "decode+eval",
            "PIL",
            "short_side",
            *rate(lambda i: dataset[i], len(paths), args.repeats),
        )

        short_side = build_transforms(RECIPES["short_side"], augment=True)
        train_set = RecordDataset(tmp, records, ["x"], transform=short_side)
        for workers in sorted({1, 2, args.max_workers}):
            per_s = loader_rate(train_set, workers, passes=max(2, 128 * workers // len(paths)))
            add("DataLoader", "PIL", "short_side", float("nan"), per_s, workers)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "data_loading_cpu.csv", args.out / "data_loading_cpu.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    command = "python " + " ".join(
        shlex.quote(a) for a in ["scripts/bench_data.py", *(argv or sys.argv[1:])]
    )
    device = f"{cpu_name()}, {os.cpu_count()} logical cores"
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    versions += f", Pillow {PIL.__version__}"

    def row(
        pipeline: str, decoder: str = "PIL", recipe: str = "short_side", workers: int = 1
    ) -> dict:
        return next(
            r
            for r in rows
            if (r["pipeline"], r["decoder"], r["recipe"], r["workers"])
            == (pipeline, decoder, recipe, workers)
        )

    ours, loader = row("decode+augment"), row("DataLoader")
    aircraft = row("decode+augment", recipe="resize_crop")
    pil, tv = row("decode", recipe="-"), row("decode", "decode_jpeg", "-")
    headline = (
        f"One worker decodes and augments {ours['images_per_s']} images/s (CUB recipe, PIL, "
        f"448 uint8 output; the model normalizes batches on its device): at least "
        f"{ours['workers_for_target']} workers for {args.target:.0f} images/s "
        f"({aircraft['workers_for_target']} for Aircraft's resize_crop). Through a real "
        f"DataLoader, which also moves the tensors to the main process, one worker delivered "
        f"{loader['images_per_s']} images/s: {loader['workers_for_target']} workers. "
        f"Decoding alone: PIL {pil['images_per_s']} vs `torchvision.io.decode_jpeg` "
        f"{tv['images_per_s']} images/s."
    )
    table = [
        "| pipeline | decoder | recipe | workers | images/s | per worker | workers for target |"
    ]
    table.append("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        table.append(
            f"| {r['pipeline']} | {r['decoder']} | {r['recipe']} | {r['workers']} "
            f"| {r['images_per_s']} "
            f"| {r['per_worker_images_per_s']} | {r['workers_for_target']} |"
        )
    details = (
        f"- Device: {device}; {versions}; one torch thread per worker.\n"
        f"- Date: {date}. Command: `{command}`.\n"
        f"- Load average (1 min) at start / end: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(a shared machine: compare rows of one run; DataLoader rows suffer most).\n"
        f"- Input: {args.images} synthetic {500}x{375} JPEGs (quality 90, {mean_kb:.0f} kB mean), "
        f"median of {args.repeats} passes. Target: {args.target:.0f} images/s.\n"
    )
    md_path.write_text(
        "# Data loading throughput (CPU)\n\n"
        f"{headline}\n\n{details}\n" + "\n".join(table) + "\n\n"
        "`decode+augment` rows run `RecordDataset.__getitem__` (PIL decode, RGB convert, train "
        "transform to a normalized 448x448 float tensor) or `decode_jpeg` into the same transform. "
        "`DataLoader` rows time a real loader (batch 16) after its first batch; they cannot scale "
        "past the machine's free cores.\n"
    )
    section = (
        "## Data loading\n\n"
        f"{headline}\n\n{details}\n"
        "Tables: [data_loading_cpu.md](data_loading_cpu.md), raw numbers: "
        "[data_loading_cpu.csv](data_loading_cpu.csv). Reproduce with "
        "`python scripts/bench_data.py`.\n\n"
    )
    write_readme_section(args.out / "README.md", section)
    print(
        f"\n{headline}\nwrote {csv_path}, {md_path} and the Data loading section of "
        f"{args.out / 'README.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
