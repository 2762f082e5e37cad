"""What every backbone declares, and the weight-loading helpers they share: weights come
from ``pretrained=True`` (a download; offline, one :class:`WeightsUnavailableError` names
the URL and the path to fill), ``weights=<file>`` (:func:`load_weights`) or neither."""

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
        """Loads ``backbone.weights`` when set and adopts the input convention it records
        (a file that records none leaves ``input_spec`` as it is).

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


@contextlib.contextmanager
def torchvision_download(what: str, tv_weights: Any) -> Iterator[None]:
    """Re-raises a network error of the body (offline, no cached file) as one
    ``WeightsUnavailableError`` naming the URL of ``tv_weights`` (a torchvision
    ``WeightsEnum`` member) and where to put the file; ``what`` names the model."""
    try:
        yield
    except NETWORK_ERRORS as err:
        destination = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(tv_weights.url)
        raise WeightsUnavailableError(
            f"Could not download the pretrained weights of {what} ({type(err).__name__}: "
            f"{err}). Offline? On a machine with internet, fetch\n  {tv_weights.url}\nand put "
            f"the file at\n  {destination}\n(torch hub cache; TORCH_HOME moves it), or pass "
            "backbone.weights=<local state dict or .safetensors> with "
            "backbone.pretrained=false."
        ) from err


def input_spec_from_meta(meta: Mapping[str, Any]) -> InputSpec | None:
    """The ``InputSpec`` recorded in a weights file's metadata, or None if absent."""
    spec = meta.get("input_spec")
    spec = json.loads(spec) if isinstance(spec, str) else spec
    if spec is None:
        return None
    return InputSpec(
        mean=tuple(map(float, spec["mean"])),
        std=tuple(map(float, spec["std"])),
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
    """Reads a state dict and its metadata from a ``.safetensors`` file (metadata from its
    header) or a torch file read with ``weights_only=True``: a bare state dict,
    ``{"state_dict": ..., "meta": ...}`` (what ``scripts/convert_matconvnet.py`` writes) or a
    training checkpoint ``{"model": ...}``.

    Returns:
        ``(state_dict, meta)``; ``meta`` may hold ``input_spec``.

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
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


def _canonical(key: str) -> str:
    """A key without wrapper prefixes (a bcnn model's ``backbone.``, DataParallel's
    ``module.``, our timm wrapper's ``model.``) and with timm's feature-wrapper renaming
    (``stages_0`` for ``stages.0``) undone."""
    while key.startswith(("backbone.", "module.", "model.")):
        key = key.split(".", 1)[1]
    return key.replace("_", ".")


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Loads a local weights file into ``module``, strictly, with errors naming the file.

    Keys of parts the backbone drops (a classifier, a timm model's head or later stages:
    first component not a child of ``module``) are ignored, so the original checkpoint
    files load as they are; every other mismatch is an error.

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
    own = module.state_dict()
    names = {_canonical(k): k for k in own}
    state = {names.get(_canonical(k), k): v for k, v in (remap(state) if remap else state).items()}
    children = {name for name, _ in module.named_children()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if k.split(".", 1)[0] in children)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        problems = [
            f"{label}: {', '.join(items[:8])}"
            + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
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
    """Converts images from the ``src`` convention to ``dst`` exactly (per-channel affine):
    a two-stream backbone's second stream gets its own convention from the first's."""

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
