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
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import benchlib as bench
import numpy as np
import PIL
import torch
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

    def one_pass() -> None:
        for i in range(count):
            fn(i)

    seconds = bench.time_runs(one_pass, torch.device("cpu"), runs=repeats, warmup=0).median
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[list[dict[str, object]], float]:
    """The rows (one per pipeline and worker count) and the mean JPEG size in kB."""
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

    return rows, mean_kb


def report(
    args: argparse.Namespace, info: bench.RunInfo, rows: list[dict[str, object]], mean_kb: float
) -> None:
    """Writes ``data_loading_cpu.csv`` and ``.md`` and the README's "Data loading" section."""
    csv_path = bench.write_csv(args.out / "data_loading_cpu.csv", rows)
    meta = info.meta()

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
        f"- Device: {meta['device']}; {meta['versions']}.\n"
        f"- Date: {meta['date']}. Command: `{meta['command']}`.\n"
        f"- Load average (1/5/15 min) at start: {meta['load average at start (1/5/15 min)']}, "
        f"at end: {meta['load average at end (1/5/15 min)']} (a shared machine: compare rows "
        "of one run; DataLoader rows suffer most).\n"
    )
    setup = (
        f"- Input: {args.images} synthetic {500}x{375} JPEGs (quality 90, {mean_kb:.0f} kB mean), "
        f"median of {args.repeats} passes, Pillow {PIL.__version__}, one torch thread per "
        f"worker. Target: {args.target:.0f} images/s.\n"
    )
    md_path = bench.write_markdown(
        args.out / "data_loading_cpu.md",
        "Data loading throughput (CPU)",
        info,
        [
            setup,
            headline,
            "",
            *table,
            "",
            "`decode+augment` rows run `RecordDataset.__getitem__` (PIL decode, RGB convert, "
            "train transform to a 448x448 uint8 tensor) or `decode_jpeg` into the same "
            "transform. `DataLoader` rows time a real loader (batch 16) after its first batch; "
            "they cannot scale past the machine's free cores.",
        ],
    )
    section = (
        "## Data loading\n\n"
        f"{headline}\n\n{details}{setup}\n"
        "Tables: [data_loading_cpu.md](data_loading_cpu.md), raw numbers: "
        "[data_loading_cpu.csv](data_loading_cpu.csv). Reproduce with "
        "`python scripts/bench_data.py`.\n\n"
    )
    bench.update_readme_section(args.out / "README.md", "Data loading", section)
    print(
        f"\n{headline}\nwrote {csv_path}, {md_path} and the Data loading section of "
        f"{args.out / 'README.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    info = bench.RunInfo.start(__file__, argv, torch.device("cpu"))
    rows, mean_kb = measure(args)
    report(args, info.finish(), rows, mean_kb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
