"""What a config builds, known before anything is allocated: shapes, sizes and memory
(``plan_model``: the model on the ``meta`` device, one image of fake tensors through it),
turned into one ``ConfigError`` or warnings before any work (docs/models.md, "The plan")."""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from bcnn.errors import ConfigError
from bcnn.models import build_model
from bcnn.models.shapes import FeatureShape

log = logging.getLogger(__name__)

MODEL_GROUPS = ("backbone", "pooling", "normalization", "classifier")
# A descriptor with more values than this many times its input image's is mostly
# redundant (a second-order one has rank at most the map's locations) and costly.
DESCRIPTOR_RATIO = 16
# The largest input side tried when looking for a backbone's minimum input size.
MAX_SIDE = 4096


class _TensorBytes(TorchDispatchMode):
    """Adds up the bytes of the tensors that operations create (not views, not in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view and all(t is not a for a in args):
                self.total, self.peak = self.total + t.nbytes, max(self.peak, t.nbytes)
        return out


@dataclass(frozen=True)
class Plan:
    """A model's shapes and sizes for one image (3, S, S).

    Attributes:
        map_shape: The backbone's map (C, H, W) (the first stream's of two).
        pooled, descriptor: Per-sample shapes of the pooling's output and the classifier's input.
        second_order: The pooling outputs more values than it has input channels.
        weights: Bytes of the parameters and buffers of each of ``MODEL_GROUPS``.
        activations, peak: Bytes of all tensors the forward pass creates; of the largest,
            and whether it is after the backbone.
    """

    size: int
    map_shape: tuple[int, int, int]
    pooled: FeatureShape
    descriptor: FeatureShape
    second_order: bool
    weights: dict[str, int]
    activations: int
    peak: tuple[int, bool]

    def __str__(self) -> str:
        c, h, w = self.map_shape
        return (
            f"{self.size} px -> map {h}x{w}x{c} ({h * w} locations) -> {self.pooled} -> "
            f"descriptor of {self.descriptor.numel:,} values; weights "
            f"{_gb(sum(self.weights.values()))}, activations {_gb(self.activations)} per image"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def input_size(dataset: DictConfig) -> tuple[int, str] | None:
    """The side of the dataset's square input images and the key that sets it, or None
    where images keep their own size."""
    if dataset.get("transform") and dataset.transform.get("size"):
        return int(dataset.transform.size), "dataset.transform.size"
    if dataset.get("image_size"):
        return int(dataset.image_size), "dataset.image_size"
    return None


def _no_weights(node: Any) -> Any:
    """A plain backbone node with every weight source off: shapes need no weights."""
    if not isinstance(node, dict):
        return node
    off = {"pretrained": False, "weights": None}
    return {k: off[k] if k in off else _no_weights(v) for k, v in node.items()}


def _minimum_size(backbone: nn.Module, size: int) -> int | None:
    """The smallest side above ``size`` that the (fake) backbone takes, None if none up to
    ``MAX_SIDE`` does (once a side works, every larger one does)."""

    def runs(side: int) -> bool:
        try:
            backbone(torch.empty(1, 3, side, side))
        except (RuntimeError, ValueError, AssertionError):
            return False
        return True

    sides = range(size + 1, MAX_SIDE + 1)
    first = bisect.bisect_left(sides, True, key=runs)
    return sides[first] if first < len(sides) else None


def plan_model(
    cfg: DictConfig, size: int, num_classes: int, size_key: str, precision: str = "32"
) -> Plan | None:
    """Builds the model of ``cfg`` without memory and traces one image (1, 3, S, S) through it.

    Args:
        cfg: A composed config; its ``MODEL_GROUPS`` nodes (weight sources ignored).
        size: The input side S; ``size_key`` sets it.
        num_classes: Classes of the classifier.
        size_key: The key that sets ``size``, for the message.
        precision: ``trainer.precision``; ``bf16``/``fp16`` trace under autocast.

    Returns:
        The plan; None where fake tensors run the backbone at no size (the run goes ahead).

    Raises:
        ConfigError: ``size`` is below the backbone's minimum input size, which it names.
    """
    nodes = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in MODEL_GROUPS}
    nodes["backbone"] = _no_weights(nodes["backbone"])
    with torch.device("meta"):
        model = build_model(OmegaConf.create(nodes), num_classes)
    parts = {g: model.get_submodule(g) for g in MODEL_GROUPS}
    weights = {g: sum(t.nbytes for t in [*m.parameters(), *m.buffers()]) for g, m in parts.items()}
    # Fake tensors log each shape error they raise; the search for a minimum raises some.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, quiet.disabled = quiet.disabled, True
    half = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), half:
            model = model.to_empty(device="cpu").eval()
            try:
                with _TensorBytes() as body:
                    fmap = model.backbone(model.normalize_input(torch.empty(1, 3, size, size)))
            except (RuntimeError, ValueError, AssertionError) as err:
                least = _minimum_size(model.backbone, size)
                if least is None:
                    log.info("The model runs unplanned: %s", str(err).strip().splitlines()[0])
                    return None
                raise ConfigError(
                    size_key,
                    f"{size} px is smaller than the {least} x {least} input that backbone "
                    f"{type(model.backbone).__name__} needs at least: set {size_key}={least} "
                    "or larger, or a backbone that downsamples less",
                ) from None
            pooled, descriptor = model.pooling.output_shape, model.descriptor_shape
            with _TensorBytes() as head:
                try:
                    model.classifier(model.head(fmap))
                except DataDependentOutputException:  # a value decides (an unfitted GMM)
                    head.total = head.peak = 4 * (pooled.numel + descriptor.numel)
    finally:
        quiet.disabled = was_disabled
    first = fmap[0] if isinstance(fmap, (tuple, list)) else fmap
    return Plan(
        size=size,
        map_shape=(int(first.shape[1]), int(first.shape[2]), int(first.shape[3])),
        pooled=pooled,
        descriptor=descriptor,
        second_order=pooled.numel > sum(model.pooling.channels),
        weights=weights,
        activations=body.total + head.total,
        peak=max((body.peak, False), (head.peak, True)),
    )


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    posix = hasattr(os, "sysconf")
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if posix else None


def _refuse(parts: list[tuple[str, int, list[str]]], have: int | None, where: str) -> None:
    """Raises, naming the largest part's first key, when the parts ``(what, bytes, keys)``
    need more than ``have`` bytes."""
    need = sum(b for _, b, _ in parts)
    if have is None or need <= have:
        return
    parts = sorted((p for p in parts if p[1] > need / 100), key=lambda p: -p[1])
    listed = "; ".join(f"{what} {_gb(b)} ({', '.join(keys)})" for what, b, keys in parts)
    raise ConfigError(
        parts[0][2][0].split("=")[0],
        f"the run needs at least {_gb(need)} of {where}, more than the {_gb(have)} this "
        f"machine has: {listed}. Lower the first setting named.",
    )


def check_plan(cfg: DictConfig, num_classes: int, device: torch.device) -> Plan | None:
    """Plans the model of ``cfg`` at its dataset's input size, before it is built.

    Logs the plan; warns of a 1 x 1 map under second-order pooling and of a descriptor over
    ``DESCRIPTOR_RATIO`` times the input image, naming the keys that fix them.

    Args:
        cfg: The composed, validated config.
        num_classes: Classes of the dataset.
        device: Where the run trains. Its memory must hold the weights and the largest
            tensor of a training batch; the host's, the weights (built there first).

    Returns:
        The plan; None where the config does not fix the input size.

    Raises:
        ConfigError: an input below the backbone's minimum, or a run beyond the memory.
    """
    found = input_size(cfg.dataset)
    if found is None:
        return None
    size, size_key = found
    plan = plan_model(cfg, size, num_classes, size_key, str(cfg.trainer.precision))
    if plan is None:
        return None
    log.info("Model plan: %s", plan)
    keys = ("proj_dim", "sketch.out_dim", "num_components")
    sized = [f"pooling.{k}={v}" for k in keys if (v := OmegaConf.select(cfg.pooling, k))]
    sized = sized or ["pooling.proj_dim"]
    if plan.second_order and plan.map_shape[1] * plan.map_shape[2] == 1:
        log.warning(
            "The backbone's map is 1 x 1 at %d px: second-order pooling of one location is "
            "a rank-one matrix. Raise the input size (%s) or use pooling=avg.", size, size_key
        )  # fmt: skip
    if plan.descriptor.numel > DESCRIPTOR_RATIO * 3 * size**2:
        fixes = sorted({k.split("=")[0] for k in sized} | {"pooling.proj_dim"})
        log.warning(
            "The descriptor has %s values, over %d times the %s of a %d px image: mostly "
            "redundant, and costly in the classifier and the cache. Reduce it (%s) or raise "
            "the input size (%s).", f"{plan.descriptor.numel:,}", DESCRIPTOR_RATIO,
            f"{3 * size**2:,}", size, ", ".join(fixes), size_key,
        )  # fmt: skip
    head = plan.weights["pooling"] + plan.weights["classifier"]
    weights = [("the backbone's weights", plan.weights["backbone"], ["backbone"])]
    weights.append((f"the head's weights ({num_classes} classes)", head, sized))
    stage = max(cfg.trainer.stages, key=lambda s: cfg.trainer[s].batch_size)
    batch = int(cfg.trainer[stage].batch_size)
    peak, in_head = plan.peak
    # What makes the largest tensor large: the descriptor's size where it is in the head.
    causes = [*(sized if in_head else []), f"{size_key}={size}"]
    causes.append(f"trainer.{stage}.batch_size={batch}")
    largest = [("the largest tensor of one batch", batch * peak, causes)]
    on_gpu = device.type == "cuda"
    if on_gpu:
        _refuse(weights, host_memory(), "host memory")
    total = torch.cuda.get_device_properties(device).total_memory if on_gpu else host_memory()
    _refuse(weights + largest, total, f"{device} memory" if on_gpu else "host memory")
    return plan


def check_dataset_memory(dataset: DictConfig) -> None:
    """Refuses a dataset generated in memory (a node with ``image_size``, ``trainval_size``
    and ``test_size``: the built-in one) beyond this machine's memory, with a ``ConfigError``
    that names the larger factor (values per image, or images) first."""
    if not all(k in dataset for k in ("image_size", "trainval_size", "test_size")):
        return
    n, m, pixels = dataset.trainval_size, dataset.test_size, 3 * dataset.image_size**2
    # uint8 images of every split (train, val and the cache's copy of train: about twice
    # trainval) and the float32 copies of the larger split while it is generated.
    need = pixels * (2 * n + m + 16 * max(n, m))
    sizes = {"image_size": pixels, "trainval_size": n, "test_size": m}
    keys = [f"dataset.{k}={dataset[k]}" for k in sorted(sizes, key=lambda k: -sizes[k])]
    _refuse([("the built-in dataset (in memory)", need, keys)], host_memory(), "host memory")
