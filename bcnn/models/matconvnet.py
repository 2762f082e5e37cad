"""Conversion of MatConvNet ``.mat`` models (VGG-M, VGG-D) to bcnn backbone state dicts.

The original B-CNN networks are MatConvNet files from
https://www.vlfeat.org/matconvnet/pretrained/ (``imagenet-vgg-m.mat``,
``imagenet-vgg-verydeep-16.mat``). Supported layouts (MAT-file v5/v7, what
``scipy.io.loadmat`` reads; v7.3/HDF5 files must be re-saved with ``-v7`` first):

* **simplenn, legacy fields** (MatConvNet < 1.0-beta8): ``layers{i}`` structs with
  ``filters`` / ``biases``; LRN layers of type ``normalize``; ``normalization`` at the top.
* **simplenn** (MatConvNet >= 1.0-beta8, the files on the download page):
  ``layers{i}.weights = {W, b}``; LRN type ``lrn`` (or ``normalize``); normalization in
  ``meta.normalization`` or at the top level.
* **DagNN**: ``layers(i)`` with ``type = 'dagnn.Conv' | 'dagnn.ReLU' | 'dagnn.LRN' |
  'dagnn.Pooling'``, hyper-parameters in ``block`` and parameter names in ``params``,
  values in the top-level ``params(j).name / .value``; layers taken in file order.

The variables may sit at the top level (``save(f, '-struct', 'net')``, the official
files) or inside one ``net`` struct.

Conversion walks our backbone's ``features`` (an ``nn.Sequential``) and the ``.mat`` layers
side by side, checking every hyper-parameter (kernel, stride, padding, LRN constants,
pooling window), and stops after our last module (relu5 / relu5_3): pool5 and the fully
connected layers are not converted. Filters go from MatConvNet's H x W x C_in x C_out
(rows first, cross-correlation like torch) to torch's C_out x C_in x H x W. The average
image (H x W x 3 or 1 x 1 x 3) becomes the mean colour of an ``InputSpec`` with
``scale=255``, ``std=1``, RGB (MatConvNet's importers reorder Caffe's BGR filters to RGB).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bcnn.models.backbones.base import SAFETENSORS_SPEC_KEY, input_spec_to_meta
from bcnn.models.inputs import InputSpec

ARCHS = ("vgg_m", "vgg_d")


@dataclass
class MatLayer:
    """One MatConvNet layer in a layout-independent form.

    Attributes:
        name: Layer name (``conv1``, ``relu1``, ...).
        kind: ``conv``, ``relu``, ``lrn``, ``pool`` or the original type for others.
        weight: Conv filters, H x W x C_in x C_out (float32), or None.
        bias: Conv biases (C_out,), or None.
        stride: (sy, sx).
        pad: (top, bottom, left, right).
        pool: Pooling window (h, w).
        method: Pooling method (``max`` / ``avg``).
        lrn: LRN ``[N, kappa, alpha, beta]``.
    """

    name: str
    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    pool: tuple[int, int] = (1, 1)
    method: str = "max"
    lrn: tuple[float, ...] = ()


@dataclass
class MatNet:
    """A parsed MatConvNet file: its layers, input normalization and layout name."""

    layers: list[MatLayer]
    average_colour: tuple[float, float, float] | None
    layout: str
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the .mat file


def _plain(x: Any) -> Any:
    """scipy.io.loadmat objects -> dicts, lists, str and numeric ndarrays."""
    from scipy.io.matlab import mat_struct

    if isinstance(x, mat_struct):
        return {name: _plain(getattr(x, name)) for name in x._fieldnames}
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            return [_plain(e) for e in x.ravel(order="F")]
        if x.dtype.kind == "U":
            return "".join(x.ravel(order="F").tolist())
        return x
    return x


def _one(x: Any) -> Any:
    """Unwraps single-element lists (1x1 cells and structs)."""
    while isinstance(x, list) and len(x) == 1:
        x = x[0]
    return x


def _ints(x: Any, n: int) -> tuple[int, ...]:
    """A MatConvNet size/stride/pad field as n ints (a scalar is repeated)."""
    v = np.asarray(_one(x), dtype=np.float64).ravel()
    if v.size == 1:
        v = np.repeat(v, n)
    if v.size != n:
        raise ValueError(f"expected {n} values, got {v.tolist()}")
    return tuple(round(float(e)) for e in v)


def _pad4(x: Any) -> tuple[int, int, int, int]:
    v = np.asarray(_one(x) if x is not None else 0, dtype=np.float64).ravel()
    if v.size == 1:
        v = np.repeat(v, 4)
    elif v.size == 2:  # [pad_y pad_x]
        v = np.array([v[0], v[0], v[1], v[1]])
    a, b, c, d = (round(float(e)) for e in v)
    return a, b, c, d


def _array(x: Any) -> np.ndarray | None:
    x = _one(x)
    if x is None or (isinstance(x, np.ndarray) and x.size == 0) or isinstance(x, list):
        return None
    return np.asarray(x, dtype=np.float32)


def _conv_weight(w: np.ndarray) -> np.ndarray:
    # Trailing singleton dimensions vanish in MATLAB (a 1-output filter bank is
    # H x W x C_in); restore the 4-D layout.
    return w.reshape(*w.shape, *([1] * (4 - w.ndim))) if w.ndim < 4 else w


_SIMPLENN_KINDS = {"conv": "conv", "relu": "relu", "lrn": "lrn", "normalize": "lrn", "pool": "pool"}
_DAGNN_KINDS = {
    "dagnn.Conv": "conv",
    "dagnn.ReLU": "relu",
    "dagnn.LRN": "lrn",
    "dagnn.Pooling": "pool",
}


def _hyper_parameters(out: MatLayer, fields: dict[str, Any], pool_key: str) -> MatLayer:
    """Fill the stride, padding, pooling and LRN fields of ``out`` by its kind.

    Args:
        out: The layer, its ``kind`` already set.
        fields: Where the hyper-parameters sit: a simplenn layer or a DagNN ``block``.
        pool_key: The pooling window's field (``pool`` in simplenn, ``poolSize`` in DagNN).

    Returns:
        ``out``, filled in.
    """
    if out.kind == "pool":
        out.pool = _ints(fields[pool_key], 2)  # type: ignore[assignment]
        out.method = str(_one(fields.get("method", "max")))
    if out.kind in ("conv", "pool"):
        out.stride = _ints(fields.get("stride", 1), 2)  # type: ignore[assignment]
        out.pad = _pad4(fields.get("pad", 0))
    elif out.kind == "lrn":
        out.lrn = tuple(float(v) for v in np.asarray(_one(fields["param"])).ravel())
    return out


def _simplenn_layer(layer: dict[str, Any]) -> tuple[MatLayer, bool]:
    ltype = str(_one(layer.get("type", "")))
    out = MatLayer(name=str(_one(layer.get("name", ""))), kind=_SIMPLENN_KINDS.get(ltype, ltype))
    legacy = False
    if out.kind == "conv":
        if "weights" in layer:
            w = layer["weights"]
            w = w if isinstance(w, list) else [w]
            out.weight = _array(w[0])
            out.bias = _array(w[1]) if len(w) > 1 else None
        else:
            legacy = True
            out.weight = _array(layer.get("filters"))
            out.bias = _array(layer.get("biases"))
        if out.weight is None:
            raise ValueError(f"conv layer {out.name!r} has no filters")
        out.weight = _conv_weight(out.weight)
    return _hyper_parameters(out, layer, "pool"), legacy


def _dagnn_layer(layer: dict[str, Any], params: dict[str, np.ndarray]) -> MatLayer:
    ltype = str(_one(layer.get("type", "")))
    block = _one(layer.get("block", {})) or {}
    out = MatLayer(name=str(_one(layer.get("name", ""))), kind=_DAGNN_KINDS.get(ltype, ltype))
    if out.kind == "conv":
        names = layer.get("params", [])
        names = [str(_one(n)) for n in (names if isinstance(names, list) else [names])]
        out.weight = _conv_weight(np.asarray(params[names[0]], dtype=np.float32))
        out.bias = np.asarray(params[names[1]], dtype=np.float32) if len(names) > 1 else None
    return _hyper_parameters(out, block, "poolSize")


def _average_colour(norm: Any) -> tuple[float, float, float] | None:
    norm = _one(norm)
    if not isinstance(norm, dict) or "averageImage" not in norm:
        return None
    avg = _array(norm["averageImage"])
    if avg is None:
        return None
    # H x W x 3 mean image (Caffe imports) or 1 x 1 x 3 / 3 x 1 colour: the B-CNN code
    # uses the mean colour, mean(mean(averageImage, 1), 2).
    colour = avg.reshape(-1, 3).mean(axis=0)
    return float(colour[0]), float(colour[1]), float(colour[2])


def read_matconvnet(path: str | os.PathLike) -> MatNet:
    """Parses a MatConvNet model file (see the module docstring for the layouts).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a v7.3 (HDF5) file or an unrecognized structure.
    """
    from scipy.io import loadmat

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
    raw = loadmat(str(path), struct_as_record=False, squeeze_me=False)
    top = {k: _plain(v) for k, v in raw.items() if not k.startswith("__")}
    if "layers" not in top and "net" in top:
        top = _one(top["net"])
    if not isinstance(top, dict) or "layers" not in top:
        raise ValueError(f"{path}: no 'layers' variable; not a MatConvNet model?")
    layers = top["layers"]
    layers = [_one(entry) for entry in (layers if isinstance(layers, list) else [layers])]
    meta = _one(top.get("meta")) if "meta" in top else None
    norm = top.get("normalization")
    if norm is None and isinstance(meta, dict):
        norm = meta.get("normalization")
    if layers and str(_one(layers[0].get("type", ""))).startswith("dagnn."):
        params_raw = top.get("params", [])
        params_raw = params_raw if isinstance(params_raw, list) else [params_raw]
        params = {str(_one(p["name"])): np.asarray(_one(p["value"])) for p in map(_one, params_raw)}
        parsed = [_dagnn_layer(layer, params) for layer in layers]
        layout = "dagnn"
    else:
        parsed, legacy = [], False
        for layer in layers:
            mat_layer, is_legacy = _simplenn_layer(layer)
            parsed.append(mat_layer)
            legacy = legacy or is_legacy
        layout = "simplenn-legacy" if legacy else "simplenn"
    return MatNet(layers=parsed, average_colour=_average_colour(norm), layout=layout)


# ---------------------------------------------------------------- mapping onto torch


def _check(ok: bool, layer: MatLayer, module_name: str, what: str) -> None:
    if not ok:
        raise ValueError(
            f"MatConvNet layer {layer.name!r} ({layer.kind}) does not match our module "
            f"{module_name!r}: {what}"
        )


def _match_pool(layer: MatLayer, name: str, m: nn.MaxPool2d) -> None:
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
    s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
    p = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
    _check(layer.method == "max", layer, name, f"method {layer.method} is not max")
    _check(layer.pool == tuple(k), layer, name, f"window {layer.pool} vs {tuple(k)}")
    _check(layer.stride == tuple(s), layer, name, f"stride {layer.stride} vs {tuple(s)}")
    t, b, left, r = layer.pad
    # MatConvNet's asymmetric [0 s-1 0 s-1] pad equals torch's ceil_mode for every input
    # size: floor((H - k + s - 1) / s) = ceil((H - k) / s), the extra window clipped.
    extra = (b - t, r - left)
    want = (s[0] - 1, s[1] - 1) if m.ceil_mode else (0, 0)
    _check(
        (t, left) == tuple(p) and extra == want,
        layer,
        name,
        f"pad {layer.pad} vs padding {tuple(p)} with ceil_mode={m.ceil_mode}",
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


def convert_layers(
    net: MatNet, stacks: Sequence[tuple[str, nn.Sequential]]
) -> dict[str, torch.Tensor]:
    """Maps MatConvNet layers onto the modules of our layer stacks, in order.

    Args:
        net: The parsed file.
        stacks: ``(key prefix, layers)`` of the backbone, in network order (e.g.
            ``("features.", backbone.features)``); layers are Conv2d, ReLU,
            LocalResponseNorm, MaxPool2d and Dropout (which, like the file's dropout
            layers, carries nothing to convert).

    Returns:
        A state dict for the stacks (keys with their prefixes), float32 tensors.

    Raises:
        ValueError: the layer sequences or a hyper-parameter differ.
    """
    state: dict[str, torch.Tensor] = {}
    layers = iter([layer for layer in net.layers if layer.kind != "dropout"])
    for prefix, stack in stacks:
        for name, module in stack.named_children():
            if isinstance(module, nn.Dropout):
                continue
            kind = {
                nn.Conv2d: "conv",
                nn.ReLU: "relu",
                nn.LocalResponseNorm: "lrn",
                nn.MaxPool2d: "pool",
            }.get(type(module))
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


def _convert_conv(
    layer: MatLayer, name: str, module: nn.Conv2d, prefix: str
) -> dict[str, torch.Tensor]:
    assert layer.weight is not None
    weight = torch.from_numpy(np.ascontiguousarray(layer.weight.transpose(3, 2, 0, 1)))
    _check(
        weight.shape == module.weight.shape,
        layer,
        name,
        f"filters {layer.weight.shape} (H W Cin Cout) vs {tuple(module.weight.shape)}",
    )
    _check(layer.stride == module.stride, layer, name, f"stride {layer.stride}")
    p = module.padding
    _check(layer.pad == (p[0], p[0], p[1], p[1]), layer, name, f"pad {layer.pad} vs {p}")
    out = {f"{prefix}{name}.weight": weight}
    if module.bias is not None:
        bias = np.zeros(weight.shape[0], np.float32) if layer.bias is None else layer.bias
        out[f"{prefix}{name}.bias"] = torch.from_numpy(bias.ravel().copy())
    return out


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
    return int(fc6.shape[3]) if fc6.shape[:2] == (window, window) else None


def build_target(arch: str, **kwargs: Any) -> nn.Module:
    """Our backbone for ``arch`` (``vgg_m`` or ``vgg_d``) through fc7, on the meta device.

    Only the layer structure and shapes are needed to map the file onto it: the meta
    device spares allocating and initializing fc6 (100M weights for VGG-D).
    """
    from bcnn.models.backbones import VGG16FC7, VGGMFC7

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    with torch.device("meta"):
        return (VGGMFC7 if arch == "vgg_m" else VGG16FC7)(**kwargs)


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
    kwargs: dict[str, Any] = {"lrn": lrn} if lrn is not None and arch == "vgg_m" else {}
    fc_dim = _fc_width(net, arch)
    target = build_target(arch, **kwargs, fc_dim=fc_dim or 4096)
    stacks = [("features.", target.features)]
    if fc_dim is not None:  # fc6 and fc7 too: the file serves vgg_*_fc7 as well
        stacks.append(("fc.", target.fc))
    state = convert_layers(net, stacks)
    own = {f"{prefix}{k}" for prefix, stack in stacks for k in stack.state_dict()}
    missing = own - set(state)
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
        from safetensors.torch import save_file

        header = {f"bcnn.{k}": v for k, v in meta.items() if k != "input_spec"}
        header[SAFETENSORS_SPEC_KEY] = json.dumps(meta["input_spec"])
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=header)
    else:
        torch.save({"state_dict": state, "meta": meta}, out)
    return out
