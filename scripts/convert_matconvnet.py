#!/usr/bin/env python
"""Convert a MatConvNet model (.mat) into a bcnn backbone weights file.

Download the originals from https://www.vlfeat.org/matconvnet/pretrained/:
``imagenet-vgg-m.mat`` (VGG-M) and ``imagenet-vgg-verydeep-16.mat`` (VGG-D). Then::

    python scripts/convert_matconvnet.py imagenet-vgg-m.mat -o weights/vgg_m.safetensors
    python train.py backbone=vgg_m backbone.weights=weights/vgg_m.safetensors

The output (``.safetensors`` or ``.pt``) holds the convolutional layers up to relu5
(relu5_3) under our module's keys plus the network's input convention (mean colour,
0-255 RGB), which the backbone adopts. Supported layouts: see ``bcnn/models/matconvnet.py``.
"""

from __future__ import annotations

import argparse
import sys

from bcnn.models.matconvnet import ARCHS, convert_matconvnet, save_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mat", help="MatConvNet model file, e.g. imagenet-vgg-m.mat")
    parser.add_argument(
        "-o", "--output", required=True, help="output file: .safetensors or .pt/.pth"
    )
    parser.add_argument(
        "--arch",
        choices=("auto", *ARCHS),
        default="auto",
        help="target backbone (default: guessed from the first filters)",
    )
    args = parser.parse_args(argv)
    state, meta = convert_matconvnet(args.mat, arch=args.arch)
    out = save_weights(state, meta, args.output)
    spec = meta["input_spec"]
    print(
        f"{args.mat} ({meta['layout']}) -> {out}: {meta['arch']}, {len(state)} tensors, "
        f"input RGB x {spec['scale']:g} minus mean {[round(v, 3) for v in spec['mean']]}\n"
        f"use: backbone={meta['arch']} backbone.weights={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
