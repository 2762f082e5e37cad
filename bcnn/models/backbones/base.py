"""What every backbone declares, and the weight-loading helpers they share.

Weights come from one of three places:

* ``pretrained=True``: ImageNet weights through torchvision's or timm's own download and
  cache. Offline without a cached file, :func:`download_hint` turns the network error into
  one :class:`WeightsUnavailableError` that names the URL and the cache path to fill.
* ``weights=<file>``: a local state dict (``.pt``/``.pth``, read with ``weights_only=True``)
  or ``.safetensors`` file, loaded by :func:`load_weights`. Files written by
  ``scripts/convert_matconvnet.py`` also carry the input convention of the original network
  (:func:`input_spec_from_meta`).
* neither: random initialization (tests, smoke runs).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from bcnn.errors import WeightsUnavailableError, show
from bcnn.io import safe_load
from bcnn.limits import Check
from bcnn.models.inputs import IMAGENET, InputSpec

# Network errors of urllib (URLError), requests/huggingface_hub (OSError subclasses) and
# httpx (not an OSError) when the weights are neither cached nor downloadable.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # pragma: no cover - depends on the installed huggingface_hub transport
    import httpx

    NETWORK_ERRORS = (OSError, httpx.TransportError)
except ImportError:  # pragma: no cover
    pass

# Key prefixes stripped from a weights file when every key carries them: DataParallel /
# DDP wrappers ("module.") and our own TimmBackbone wrapper ("model.").
_WRAPPER_PREFIXES = ("module.", "model.")
# Metadata key holding the input convention in .safetensors files (string values only).
SAFETENSORS_SPEC_KEY = "bcnn.input_spec"


def weights_file(value: Any) -> str | None:
    """A :class:`~bcnn.limits.Check`: a local file that looks like a torch or safetensors one."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        return f"no such file: {path} (pass a .pt/.pth state dict or a .safetensors file)"
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        # 8-byte little-endian header length, then a JSON header.
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= size <= path.stat().st_size - 8:
            return f"{path} is not a .safetensors file (its header is unreadable)"
        return None
    # torch.save writes a zip archive; files of torch < 1.6 start with a pickle opcode.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return (
            f"{path} is neither a torch file (.pt/.pth) nor a .safetensors file: pass the "
            "weights of this backbone (see docs/models.md)"
        )
    return None


WeightsFile = Annotated[str, Check(weights_file, files=True)]


class Backbone(nn.Module):
    """A feature extractor: image (B, 3, H, W) -> feature map (B, C, H', W').

    Subclasses set ``out_channels`` (C) and ``input_spec`` (the pixel convention the data
    transforms must produce). Two-stream backbones return a tuple of two maps and set
    ``out_channels`` to a tuple.
    """

    out_channels: int | tuple[int, int]
    input_spec: InputSpec = IMAGENET

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """``pretrained=true`` and ``weights=<file>`` together are ambiguous."""
        if values.get("pretrained") is True and values.get("weights"):
            return (
                "weights",
                "set either pretrained=true (download ImageNet weights) or weights=<file>, "
                f"not both (weights={show(values['weights'])})",
            )
        return None

    def load_weights_file(
        self,
        path: str | os.PathLike | None,
        *,
        module: nn.Module | None = None,
        remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Loads ``backbone.weights`` when set and adopts the input convention it records.

        A file that records no convention leaves ``input_spec`` as the backbone set it.

        Args:
            path: ``.pt``/``.pth`` state dict or ``.safetensors`` file (see
                :func:`load_weights`), or None / empty for no file.
            module: The part of the backbone the file fills (default: the whole backbone).
            remap: Optional rewrite of the file's keys.
        """
        if not path:
            return
        meta = load_weights(self if module is None else module, path, remap=remap)
        self.input_spec = input_spec_from_meta(meta) or self.input_spec


def hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``url``'s file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


@contextlib.contextmanager
def download_hint(what: str, url: str, destination: str | os.PathLike) -> Iterator[None]:
    """Re-raises a failed weights download as one actionable error.

    Args:
        what: The model, for the message (e.g. ``"VGG-16 (torchvision)"``).
        url: Where the weights are downloaded from.
        destination: Where the library looks for a cached copy.

    Raises:
        WeightsUnavailableError: the body raised a network error (no cached file, offline).
    """
    try:
        yield
    except NETWORK_ERRORS as err:
        raise WeightsUnavailableError(
            f"Could not download the pretrained weights of {what} ({type(err).__name__}: "
            f"{err}). Offline? On a machine with internet, fetch\n  {url}\nand put the file "
            f"at\n  {destination}\n(torch hub cache; TORCH_HOME moves it), or pass "
            "backbone.weights=<local state dict or .safetensors> with "
            "backbone.pretrained=false."
        ) from err


@contextlib.contextmanager
def torchvision_download(what: str, tv_weights: Any) -> Iterator[None]:
    """:func:`download_hint` for a torchvision weights entry (its URL and hub cache path).

    Args:
        what: The model, for the message (e.g. ``"VGG-16 (torchvision)"``).
        tv_weights: A torchvision ``WeightsEnum`` member (``VGG16_Weights.IMAGENET1K_V1``).
    """
    with download_hint(what, tv_weights.url, hub_cache_path(tv_weights.url)):
        yield


def input_spec_from_meta(meta: Mapping[str, Any]) -> InputSpec | None:
    """The ``InputSpec`` recorded in a weights file's metadata, or None if absent."""
    spec = meta.get("input_spec")
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = json.loads(spec)
    return InputSpec(
        mean=tuple(float(v) for v in spec["mean"]),
        std=tuple(float(v) for v in spec["std"]),
        color=str(spec.get("color", "RGB")),
        scale=float(spec.get("scale", 1.0)),
    )


def input_spec_to_meta(spec: InputSpec) -> dict[str, Any]:
    """Plain-type form of ``spec`` for a weights file's metadata."""
    return {
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "color": spec.color,
        "scale": float(spec.scale),
    }


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a state dict and its metadata from a local file.

    Accepts ``.safetensors`` (metadata from its header) and torch files read with
    ``weights_only=True``: a bare state dict, ``{"state_dict": ..., "meta": ...}`` (what
    ``scripts/convert_matconvnet.py`` writes) or a training checkpoint ``{"model": ...}``.

    Returns:
        ``(state_dict, meta)``; ``meta`` may hold ``input_spec`` (see
        :func:`input_spec_from_meta`).

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            state = load_file(str(path))
        except Exception as err:
            raise ValueError(
                f"backbone.weights={path}: not a readable .safetensors file "
                f"({type(err).__name__}: {err})"
            ) from None
        meta: dict[str, Any] = {}
        if SAFETENSORS_SPEC_KEY in header:
            meta["input_spec"] = json.loads(header[SAFETENSORS_SPEC_KEY])
        return state, meta
    # Imported here: bcnn.engine imports the models package.

    try:
        obj = safe_load(path)
    except Exception as err:
        raise ValueError(
            f"backbone.weights={path}: cannot read it as a state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass a .pt/.pth state dict or a "
            ".safetensors file"
        ) from None
    meta = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta = dict(obj.get("meta") or {})
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        # A bcnn training checkpoint records the input convention the model trained with
        # (e.g. a converted MatConvNet network's exact mean colour).
        if obj.get("input_spec"):
            meta = {"input_spec": obj["input_spec"]}
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"backbone.weights={path}: the file holds no state dict of tensors")
    return dict(obj), meta


def _strip_prefixes(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Maps the keys of a whole-model or wrapped checkpoint onto ``module``'s keys."""
    own = set(module.state_dict())
    # A bcnn model checkpoint: keep the backbone part.
    if not own & set(state) and any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    for prefix in _WRAPPER_PREFIXES:
        if not own & set(state) and state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Loads a local weights file into ``module``, strictly, with errors naming the file.

    Keys of parts of the original network that the backbone drops (the classifier of
    VGG/DenseNet, the head or later stages of a timm model: any key whose first component
    is not a child of ``module``) are ignored, so the original ImageNet checkpoint files
    load as they are. Every other mismatch is an error.

    Args:
        module: The module to fill (the backbone's network).
        path: ``.pt``/``.pth`` state dict or ``.safetensors`` file.
        remap: Optional rewrite of the file's keys (e.g. legacy DenseNet names).

    Returns:
        The file's metadata (see :func:`read_weights`).

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: missing keys, unexpected keys or shape mismatches, listed.
    """
    state, meta = read_weights(path)
    state = _strip_prefixes(remap(state) if remap else state, module)
    own = module.state_dict()
    children = {name for name, _ in module.named_children()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if k.split(".", 1)[0] in children)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        problems = [
            f"{label}: {head(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise RuntimeError(
            f"backbone.weights={path} does not fit {type(module).__name__}: "
            + "; ".join(problems)
            + ". Is it the file of this backbone (see docs/models.md)?"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return meta


class InputAdapter(nn.Module):
    """Converts images from one ``InputSpec`` convention to another (per-channel affine).

    Used by two-stream backbones whose streams were trained with different conventions
    (torchvision VGG-D: [0, 1] standardized; MatConvNet VGG-M: mean-subtracted 0-255): the
    data pipeline produces the first stream's convention and the second stream's input is
    derived from it exactly.

    Args:
        src: The convention of the incoming images.
        dst: The convention to produce.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, src: InputSpec, dst: InputSpec) -> None:
        super().__init__()
        self.identity = src == dst
        # Pixel value v in [0, 1], RGB: src x = (v * s_scale - s_mean) / s_std in src order.
        # dst channel c reads src channel perm[c]: y_c = a_c x_perm[c] + b_c.
        perm = [0, 1, 2] if src.color == dst.color else [2, 1, 0]
        s_mean = torch.tensor(src.mean, dtype=torch.float64)[perm]
        s_std = torch.tensor(src.std, dtype=torch.float64)[perm]
        d_mean = torch.tensor(dst.mean, dtype=torch.float64)
        d_std = torch.tensor(dst.std, dtype=torch.float64)
        ratio = dst.scale / src.scale
        a = s_std * ratio / d_std
        b = (s_mean * ratio - d_mean) / d_std
        self.perm = perm
        self.register_buffer("weight", a.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bias", b.float().view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in ``src`` convention -> (B, 3, H, W) in ``dst`` convention."""
        if self.identity:
            return x
        if self.perm != [0, 1, 2]:
            x = x[:, self.perm]
        return x * self.weight.to(x.dtype) + self.bias.to(x.dtype)
