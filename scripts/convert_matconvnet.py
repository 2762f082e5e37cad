#!/usr/bin/env python
"""Convert a MatConvNet model (.mat) into a bcnn backbone weights file.

Download the originals from https://www.vlfeat.org/matconvnet/pretrained/:
``imagenet-vgg-m.mat`` (VGG-M) and ``imagenet-vgg-verydeep-16.mat`` (VGG-D). Then::

    python scripts/convert_matconvnet.py imagenet-vgg-m.mat -o weights/vgg_m.safetensors
    python train.py backbone=vgg_m backbone.weights=weights/vgg_m.safetensors

The output (``.safetensors`` or ``.pt``) holds the layers up to relu5 (relu5_3), and fc6/fc7
when the file has them, under our modules' keys, plus the network's input convention (mean
colour, 0-255 RGB), which the backbone adopts.

Reads MAT-file v5/v7 (``scipy.io.loadmat``; v7.3/HDF5 files must be re-saved with ``-v7``)
in three layouts: simplenn with legacy ``filters``/``biases`` fields (MatConvNet <
1.0-beta8), simplenn with ``weights = {W, b}`` (the files on the download page), and DagNN
(``dagnn.*`` layers, values in the top-level ``params``); the variables at the top level or
inside a ``net`` struct. Our backbone's modules and the file's layers are walked side by
side, every hyper-parameter checked (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.io import loadmat
from torch import nn

from bcnn.models.backbones import VGG16FC7, VGGMFC7
from bcnn.models.backbones.base import SAFETENSORS_SPEC_KEY, input_spec_to_meta
from bcnn.models.inputs import InputSpec

ARCHS = ("vgg_m", "vgg_d")

# Layer types of both layouts (simplenn's LRN was "normalize" before 1.0-beta8).
_KINDS = {
    "normalize": "lrn",
    "dagnn.Conv": "conv",
    "dagnn.ReLU": "relu",
    "dagnn.LRN": "lrn",
    "dagnn.Pooling": "pool",
}


@dataclass
class MatLayer:
    """One MatConvNet layer in a layout-independent form.

    Attributes:
        kind: ``conv``, ``relu``, ``lrn``, ``pool`` or the original type for others.
        weight: Conv filters H x W x C_in x C_out, float32, without the unit dimensions
            that ``loadmat`` drops (a 1x1 filter bank is C_in x C_out), or None.
        stride, pad, pool: (sy, sx), (top, bottom, left, right), the pooling window (h, w).
        lrn: LRN ``[N, kappa, alpha, beta]``.
    """

    name: str
    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = (1, 1)
    pad: tuple[int, ...] = (0, 0, 0, 0)
    pool: tuple[int, ...] = (1, 1)
    method: str = "max"
    lrn: tuple[float, ...] = ()


@dataclass
class MatNet:
    """A parsed MatConvNet file: its layers, mean input colour and layout name."""

    layers: list[MatLayer]
    average_colour: tuple[float, float, float] | None
    layout: str


def _ints(x: Any, n: int) -> tuple[int, ...]:
    """A size/stride/pad field as n ints: a scalar is repeated, a [y x] pad is [y y x x]."""
    v = np.asarray(x, dtype=np.float64).ravel()
    if v.size == 1 or (n == 4 and v.size == 2):
        v = v.repeat(n // v.size)
    if v.size != n:
        raise ValueError(f"expected {n} values, got {v.tolist()}")
    return tuple(round(float(e)) for e in v)


def _array(x: Any) -> np.ndarray | None:
    """A numeric field as float32, None when absent or empty."""
    return None if x is None or np.size(x) == 0 else np.asarray(x, dtype=np.float32)


def _as_list(x: Any) -> list[Any]:
    """A struct array or cell as a list (``loadmat`` gives a lone element as itself)."""
    if isinstance(x, list) or (isinstance(x, np.ndarray) and x.dtype == object):
        return list(x)
    return [x]


def _parse_layer(layer: dict[str, Any], params: dict[str, Any]) -> MatLayer:
    """A simplenn layer, or a DagNN one (hyper-parameters in ``block``, parameter names in
    ``params``, their values in the file's ``params``)."""
    kind = str(layer.get("type", ""))
    out = MatLayer(name=str(layer.get("name", "")), kind=_KINDS.get(kind, kind))
    fields = layer["block"] if isinstance(layer.get("block"), dict) else layer
    if out.kind == "conv":
        if "block" in layer:
            values = [params[str(name)] for name in _as_list(layer.get("params", []))]
        else:  # weights = {W, b}, or the legacy fields
            values = _as_list(layer.get("weights", [layer.get("filters"), layer.get("biases")]))
        out.weight = _array(values[0])
        out.bias = _array(values[1]) if len(values) > 1 else None
        if out.weight is None:
            raise ValueError(f"conv layer {out.name!r} has no filters")
    if out.kind == "pool":
        out.pool = _ints(fields.get("pool", fields.get("poolSize")), 2)
        out.method = str(fields.get("method", "max"))
    if out.kind in ("conv", "pool"):
        out.stride = _ints(fields.get("stride", 1), 2)
        out.pad = _ints(fields.get("pad", 0), 4)
    elif out.kind == "lrn":
        out.lrn = tuple(float(v) for v in np.ravel(fields["param"]))
    return out


def read_matconvnet(path: str | os.PathLike) -> MatNet:
    """Parses a MatConvNet model file (see the module docstring for the layouts).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a v7.3 (HDF5) file or an unrecognized structure.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (MatConvNet models: https://www.vlfeat.org/matconvnet/pretrained/)"
        )
    with open(path, "rb") as f:
        head = f.read(128)
    if b"MATLAB 7.3" in head:
        raise ValueError(
            f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read: re-save it in "
            "MATLAB with `net = load(f); save(f2, '-struct', 'net', '-v7')`"
        )
    top = loadmat(str(path), simplify_cells=True)
    if "layers" not in top and isinstance(top.get("net"), dict):
        top = top["net"]
    if "layers" not in top:
        raise ValueError(f"{path}: no 'layers' variable; not a MatConvNet model?")
    params = {str(p["name"]): p["value"] for p in _as_list(top.get("params", []))}
    raw = _as_list(top["layers"])
    layers = [_parse_layer(layer, params) for layer in raw]
    if raw and str(raw[0].get("type", "")).startswith("dagnn."):
        layout = "dagnn"
    elif any("filters" in layer for layer in raw):
        layout = "simplenn-legacy"
    else:
        layout = "simplenn"
    norm = top.get("normalization") or (top.get("meta") or {}).get("normalization") or {}
    avg = _array(norm.get("averageImage"))
    colour = None
    if avg is not None:  # an H x W x 3 image (Caffe imports) or a colour: the B-CNN code
        c = avg.reshape(-1, 3).mean(axis=0)  # uses the mean colour
        colour = (float(c[0]), float(c[1]), float(c[2]))
    return MatNet(layers=layers, average_colour=colour, layout=layout)


def _check(ok: bool, layer: MatLayer, module_name: str, what: str) -> None:
    if not ok:
        raise ValueError(
            f"MatConvNet layer {layer.name!r} ({layer.kind}) does not match our module "
            f"{module_name!r}: {what}"
        )


def _match_pool(layer: MatLayer, name: str, m: nn.MaxPool2d) -> None:
    k, s, p = (
        (v, v) if isinstance(v, int) else tuple(v) for v in (m.kernel_size, m.stride, m.padding)
    )
    _check(layer.method == "max", layer, name, f"method {layer.method} is not max")
    _check(layer.pool == k, layer, name, f"window {layer.pool} vs {k}")
    _check(layer.stride == s, layer, name, f"stride {layer.stride} vs {s}")
    t, b, left, r = layer.pad
    # MatConvNet's asymmetric [0 s-1 0 s-1] pad equals torch's ceil_mode for every input
    # size: floor((H - k + s - 1) / s) = ceil((H - k) / s), the extra window clipped.
    want = (s[0] - 1, s[1] - 1) if m.ceil_mode else (0, 0)
    _check(
        (t, left) == p and (b - t, r - left) == want,
        layer,
        name,
        f"pad {layer.pad} vs padding {p} with ceil_mode={m.ceil_mode}",
    )


def _match_lrn(layer: MatLayer, name: str, m: nn.LocalResponseNorm) -> None:
    n, kappa, alpha, beta = layer.lrn
    ours = (m.size, m.k, m.alpha / m.size, m.beta)
    _check(
        np.allclose((n, kappa, alpha, beta), ours, rtol=1e-5, atol=0),
        layer,
        name,
        f"param [N kappa alpha beta] = {list(layer.lrn)} vs ours {list(ours)}; set "
        f"backbone.lrn=[{int(n)},{kappa},{alpha},{beta}]",
    )


def _convert_conv(
    layer: MatLayer, name: str, module: nn.Conv2d, prefix: str
) -> dict[str, torch.Tensor]:
    """MatConvNet's H x W x C_in x C_out filters (cross-correlation, like torch) -> torch's
    C_out x C_in x H x W."""
    assert layer.weight is not None
    c_out, c_in, kh, kw = module.weight.shape
    full = (kh, kw, c_in, c_out)
    _check(
        [d for d in layer.weight.shape if d != 1] == [d for d in full if d != 1],
        layer,
        name,
        f"filters {layer.weight.shape} (H W Cin Cout) vs {full}",
    )
    weight = np.ascontiguousarray(layer.weight.reshape(full).transpose(3, 2, 0, 1))
    _check(layer.stride == module.stride, layer, name, f"stride {layer.stride}")
    p = module.padding
    _check(layer.pad == (p[0], p[0], p[1], p[1]), layer, name, f"pad {layer.pad} vs {p}")
    out = {f"{prefix}{name}.weight": torch.from_numpy(weight)}
    if module.bias is not None:
        bias = np.zeros(c_out, np.float32) if layer.bias is None else layer.bias.ravel()
        out[f"{prefix}{name}.bias"] = torch.from_numpy(bias.copy())
    return out


def convert_layers(
    net: MatNet, stacks: Sequence[tuple[str, nn.Sequential]]
) -> dict[str, torch.Tensor]:
    """Maps MatConvNet layers onto the modules of our layer stacks, in order.

    Args:
        net: The parsed file.
        stacks: ``(key prefix, layers)`` in network order (``("features.",
            backbone.features)``) of Conv2d, ReLU, LocalResponseNorm, MaxPool2d and Dropout
            (skipped, as the file's dropout layers).

    Returns:
        A state dict for the stacks (keys with their prefixes), float32 tensors.

    Raises:
        ValueError: the layer sequences or a hyper-parameter differ.
    """
    kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.LocalResponseNorm: "lrn", nn.MaxPool2d: "pool"}
    state: dict[str, torch.Tensor] = {}
    layers = iter([layer for layer in net.layers if layer.kind != "dropout"])
    for prefix, stack in stacks:
        for name, module in stack.named_children():
            if isinstance(module, nn.Dropout):
                continue
            kind = kinds.get(type(module))
            if kind is None:
                raise TypeError(
                    f"cannot convert into module {name!r} of type {type(module).__name__}"
                )
            layer = next(layers, None)
            if layer is None:
                raise ValueError(f"the .mat file ends before our module {name!r} ({kind})")
            _check(layer.kind == kind, layer, name, f"expected a {kind} layer")
            if isinstance(module, nn.Conv2d):
                state.update(_convert_conv(layer, name, module, prefix))
            elif isinstance(module, nn.MaxPool2d):
                _match_pool(layer, name, module)
            elif isinstance(module, nn.LocalResponseNorm):
                _match_lrn(layer, name, module)
    return state


# Convolutions before fc6, and fc6's window, per architecture.
_FEATURE_CONVS = {"vgg_m": (5, 6), "vgg_d": (13, 7)}


def _fc_width(net: MatNet, arch: str) -> int | None:
    """fc6's output width when the file holds fc6 and fc7 (real models do; small test files
    may stop earlier), else None."""
    convs = [layer for layer in net.layers if layer.kind == "conv"]
    n, window = _FEATURE_CONVS[arch]
    if len(convs) < n + 2 or convs[n].weight is None:
        return None
    fc6 = convs[n].weight
    return int(fc6.shape[3]) if fc6.ndim == 4 and fc6.shape[:2] == (window, window) else None


def guess_arch(net: MatNet) -> str:
    """``vgg_m`` (first filters 7x7x3x96) or ``vgg_d`` (3x3x3x64)."""
    first = next((layer for layer in net.layers if layer.kind == "conv"), None)
    shape = None if first is None or first.weight is None else first.weight.shape
    if shape == (7, 7, 3, 96):
        return "vgg_m"
    if shape == (3, 3, 3, 64):
        return "vgg_d"
    raise ValueError(f"cannot tell the architecture from the first filters {shape}; pass arch")


def convert_matconvnet(
    path: str | os.PathLike, arch: str = "auto", lrn: tuple[float, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Converts a MatConvNet file into a state dict of our ``arch`` backbone.

    The layers up to relu5 (relu5_3) fill ``features``; fc6 and fc7, when the file holds
    them, fill ``fc`` (read by ``vgg_*_fc7``); the mean colour becomes the input convention
    (RGB, 0-255, std 1).

    Args:
        path: ``imagenet-vgg-m.mat`` or ``imagenet-vgg-verydeep-16.mat`` (or a file with
            the same structure).
        arch: ``vgg_m``, ``vgg_d`` or ``auto`` (from the first filters).
        lrn: VGG-M LRN parameters to build the target with (default: the module's).

    Returns:
        ``(state_dict, meta)``: the state dict loads into ``VGGM`` / ``VGG16`` strictly;
        ``meta`` holds ``input_spec`` (dict), ``arch``, ``source`` and ``layout``.
    """
    net = read_matconvnet(path)
    arch = guess_arch(net) if arch == "auto" else arch
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    kwargs: dict[str, Any] = {"lrn": lrn} if lrn is not None and arch == "vgg_m" else {}
    fc_dim = _fc_width(net, arch)
    # On the meta device: the mapping needs shapes only (VGG-D's fc6 is 100M weights).
    with torch.device("meta"):
        target = (VGGMFC7 if arch == "vgg_m" else VGG16FC7)(**kwargs, fc_dim=fc_dim or 4096)
    stacks = [("features.", target.features)]
    if fc_dim is not None:
        stacks.append(("fc.", target.fc))
    state = convert_layers(net, stacks)
    missing = {f"{prefix}{k}" for prefix, stack in stacks for k in stack.state_dict()} - set(state)
    if missing:
        raise ValueError(f"conversion left keys unset: {sorted(missing)}")
    colour = net.average_colour or target.input_spec.mean
    spec = InputSpec(mean=tuple(colour), std=(1.0, 1.0, 1.0), color="RGB", scale=255.0)
    meta = {
        "input_spec": input_spec_to_meta(spec),
        "arch": arch,
        "source": Path(path).name,
        "layout": net.layout,
    }
    return state, meta


def save_weights(
    state: dict[str, torch.Tensor], meta: dict[str, Any], out: str | os.PathLike
) -> Path:
    """Writes ``state`` with ``meta`` as ``.safetensors`` (header metadata) or torch file.

    The torch file is ``{"state_dict": ..., "meta": ...}`` of plain types, readable with
    ``torch.load(weights_only=True)``; both load with ``backbone.weights=<file>``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        header = {f"bcnn.{k}": v for k, v in meta.items() if k != "input_spec"}
        header[SAFETENSORS_SPEC_KEY] = json.dumps(meta["input_spec"])
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=header)
    else:
        torch.save({"state_dict": state, "meta": meta}, out)
    return out


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
