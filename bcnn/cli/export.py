"""Export a trained model: ``bcnn-export RUN --format onnx|torchscript|safetensors --out DIR``.

RUN is a run directory (its selected epoch) or a ``.pt`` checkpoint; the folder receives
the model, ``bcnn_export.json``, ``config.yaml`` and a model card, and the written model is
checked against the eager one (docs/deploy.md). Exit status: 0; 1 on an error; 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bcnn.engine.runs import load_trained
from bcnn.errors import run_command
from bcnn.export.writer import FORMATS, INPUT_DTYPES, export_trained

PROG = "bcnn-export"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained model with its classes, input convention and a model "
        "card (see docs/deploy.md).",
    )
    parser.add_argument("run", help="run directory or .pt checkpoint written by bcnn-train")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="default: onnx")
    parser.add_argument(
        "--out", type=Path, help="export folder (default: <run dir>/export/<format>)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="side of the trace and check images (default: the run's evaluation size)",
    )
    parser.add_argument(
        "--input",
        choices=INPUT_DTYPES,
        default="uint8",
        help="what the graph takes: uint8 0-255 images (default) or float [0, 1]",
    )
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    trained = load_trained(args.run)
    out = args.out or trained.run_dir / "export" / args.format
    result = export_trained(
        trained, args.format, out, image_size=args.image_size, input_dtype=args.input
    )
    meta = result.metadata
    size = result.model_file.stat().st_size / 2**20
    print(f"{args.format} model: {result.model_file} ({size:.1f} MiB)")
    print(f"model card: {result.folder / 'README.md'}")
    print(f"classes: {len(meta['classes'])}; input: {meta['input']['dtype']} (B, 3, H, W) RGB")
    parity = meta["parity"]
    if parity.get("checked"):
        # Rows that ran; a graph of fixed size skips the other size, missing data the test images.
        rows = [parity[k] for k in ("at_size", "other_size", "test_images")]
        for row in (r for r in rows if "exported_vs_float64" in r):
            h, w = row["size"]
            print(
                f"logits at {h}x{w} ({row['images']}): max |exported - eager (float64)| "
                f"{row['exported_vs_float64']:.2e} (eager float32: "
                f"{row['eager_float32_vs_float64']:.2e})"
            )
    else:
        print(f"not checked after export: {parity.get('reason')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
