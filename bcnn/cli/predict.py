"""Class probabilities for image files: ``bcnn-predict MODEL IMAGES... [--topk 5]``.

MODEL is a run directory, a ``.pt`` checkpoint, a folder written by ``bcnn-export`` or its
``model.onnx`` / ``model.torchscript.pt``; IMAGES are files or folders. Images are read
and transformed as the run evaluated them (docs/deploy.md). An unreadable file is reported
by name and the others are still predicted. Exit status: 0; 1 when an image could not be
read or on an error; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import v2

from bcnn.data.base import BadImageError, Record, RecordDataset
from bcnn.errors import run_command
from bcnn.export.runtime import Predictor, load_predictor

PROG = "bcnn-predict"
OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class Prediction:
    """The top-k classes of one image, or why it has none.

    Attributes:
        image: The file.
        classes: Class names, most probable first.
        indices: Their class indices.
        probabilities: Their probabilities.
        error: Why the image could not be read (then the lists are empty).
    """

    image: Path
    classes: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files below each folder (sorted, recursive).

    A file that does not exist stays in the list: like an unreadable one, it is reported
    by name when it is read, and the other images still get their predictions.

    Raises:
        ValueError: no image at all.
    """
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in extensions
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                logging.getLogger(__name__).warning("No image files in %s", path)
            files += found
        else:
            files.append(path)
    if not files:
        raise ValueError(f"no image files in {', '.join(map(str, inputs))}")
    return files


def read_image(path: Path) -> Image.Image:
    """Reads one image file as RGB, exactly as the training datasets do.

    Raises:
        BadImageError: the file is missing, truncated or not an image (naming it).
    """
    dataset = RecordDataset(path.parent, [Record(path.name, 0)], classes=["?"])
    return dataset.load_image(dataset.records[0])


def _batches(
    files: Sequence[Path], predictor: Predictor, batch_size: int, results: dict[Path, Prediction]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Readable images, transformed, in batches of equal size; unreadable ones go to
    ``results`` with their error."""
    resize = v2.Resize(predictor.fixed_size, antialias=True) if predictor.fixed_size else None
    pending: list[tuple[Path, torch.Tensor]] = []
    for path in files:
        try:
            image = predictor.transform(read_image(path))
        except BadImageError as err:
            results[path] = Prediction(path, error=str(err))
            print(f"{PROG}: {err}", file=sys.stderr)
            continue
        if resize is not None and tuple(image.shape[-2:]) != predictor.fixed_size:
            image = resize(image)
        if pending and (len(pending) == batch_size or pending[0][1].shape != image.shape):
            yield [p for p, _ in pending], torch.stack([t for _, t in pending])
            pending = []
        pending.append((path, image))
    if pending:
        yield [p for p, _ in pending], torch.stack([t for _, t in pending])


def predict(
    predictor: Predictor,
    files: Sequence[Path],
    topk: int = 5,
    batch_size: int = 32,
    flip: bool | None = None,
) -> list[Prediction]:
    """The top-k classes of every file, in the order of ``files``.

    Args:
        predictor: From ``bcnn.export.runtime.load_predictor``.
        files: Image files.
        topk: Classes kept per image (at most the number of classes).
        batch_size: Images per forward pass.
        flip: Override the predictor's flip averaging.

    Returns:
        One ``Prediction`` per file; unreadable files carry their ``error``.
    """
    k = min(topk, len(predictor.classes))
    results: dict[Path, Prediction] = {}
    for paths, images in _batches(files, predictor, batch_size, results):
        probs = predictor.probabilities(images, flip=flip)
        values, indices = probs.topk(k, dim=1)
        for path, p, i in zip(paths, values.tolist(), indices.tolist(), strict=True):
            results[path] = Prediction(path, [predictor.classes[j] for j in i], i, p)
    return [results[path] for path in files]


def table(predictions: Sequence[Prediction]) -> pd.DataFrame:
    """One row per image: the file and ``class (probability %)`` for each rank."""
    rows = []
    for pred in predictions:
        row: dict[str, str] = {"image": str(pred.image)}
        if pred.error:
            row["1"] = "unreadable image"
        for rank, (name, p) in enumerate(zip(pred.classes, pred.probabilities, strict=True), 1):
            row[str(rank)] = f"{name} ({100 * p:.1f}%)"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def write(predictions: Sequence[Prediction], out: Path) -> None:
    """Writes the predictions as CSV (one row per image and rank) or JSON (one object per
    image), by the suffix of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        records = [
            {
                "image": str(p.image),
                "predictions": [
                    {"rank": r, "class": c, "index": i, "probability": q}
                    for r, (c, i, q) in enumerate(
                        zip(p.classes, p.indices, p.probabilities, strict=True), 1
                    )
                ],
                "error": p.error,
            }
            for p in predictions
        ]
        out.write_text(json.dumps(records, indent=2) + "\n")
        return
    rows = [
        {"image": str(p.image), "rank": r, "class": c, "index": i, "probability": q, "error": ""}
        for p in predictions
        for r, (c, i, q) in enumerate(zip(p.classes, p.indices, p.probabilities, strict=True), 1)
    ]
    rows += [{"image": str(p.image), "error": p.error} for p in predictions if p.error]
    columns = ["image", "rank", "class", "index", "probability", "error"]
    # object: the ranks of a table with empty cells stay integers.
    pd.DataFrame(rows, columns=columns, dtype=object).to_csv(out, index=False)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Class probabilities for image files, from a training run, a checkpoint "
        "or an exported model (bcnn-export).",
        epilog="Exit status 1 when an image could not be read (the others are predicted).",
    )
    parser.add_argument(
        "model", help="run directory, .pt checkpoint, bcnn-export folder, .onnx or TorchScript file"
    )
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--out", type=Path, help="write every prediction to a .csv or .json file")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with the mirror image (default: as the run evaluated, trainer.test_flip)",
    )
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None and args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        parser.error(f"--out must end in .csv or .json, got {args.out}")
    return args


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    files = image_files(args.images)
    predictor = load_predictor(args.model, device=args.device)
    predictions = predict(predictor, files, args.topk, args.batch_size, args.flip)
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(table(predictions).to_string(index=False))
    if args.out is not None:
        write(predictions, args.out)
        print(f"predictions written to {args.out}")
    failed = sum(p.error is not None for p in predictions)
    if failed:
        print(f"{PROG}: {failed} of {len(predictions)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
