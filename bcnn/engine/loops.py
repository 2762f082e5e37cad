"""One training epoch and one evaluation pass, as plain functions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bcnn.engine.metrics import ConfusionMeter

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``trainer.precision`` (``32`` disables it)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def _limited(loader: Iterable, limit: int | None) -> tuple[Iterable, int]:
    total = len(loader)  # type: ignore[arg-type]
    if limit is not None and limit < total:
        return (b for i, b in zip(range(limit), loader)), limit
    return loader, total


@dataclass
class EpochStats:
    """Sums over the batches of one training epoch (summable across processes)."""

    loss_sum: float
    correct: int
    seen: int

    @property
    def loss(self) -> float:
        """Mean loss per image (NaN when no image was seen)."""
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def acc(self) -> float:
        """Top-1 accuracy in percent (NaN when no image was seen)."""
        return 100.0 * self.correct / self.seen if self.seen else math.nan


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    precision: str = "32",
    grad_accum: int = 1,
    grad_clip: float | None = None,
    frozen_backbone: bool = False,
    limit: int | None = None,
    progress: bool = False,
    desc: str = "train",
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochStats:
    """Trains ``model`` for one pass over ``loader``.

    Args:
        model: A ``BilinearModel``; only parameters with ``requires_grad`` change.
        loader: Yields ``(images (B, 3, H, W), labels (B,))``.
        optimizer: Optimizer over the trainable parameters.
        scaler: Loss scaler (enabled for fp16 only).
        device: Where the model lives.
        precision: ``32``, ``bf16`` or ``fp16`` (autocast dtype).
        grad_accum: Micro-batches per optimizer step.
        grad_clip: Max global gradient norm, applied to unscaled gradients.
        frozen_backbone: Keep the backbone in eval mode (batch-norm statistics frozen).
        limit: Stop after this many batches.
        progress: Show a tqdm bar.
        desc: The bar's label.
        prepare: Applied to each batch on the device (e.g. uint8 -> normalized float).

    Returns:
        The epoch's summed loss, correct predictions and images seen.
    """
    model.train()
    if frozen_backbone:
        getattr(model, "module", model).backbone.eval()
    batches, total = _limited(loader, limit)
    loss_sum, correct, seen = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False)
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        sync = (step + 1) % grad_accum == 0 or step + 1 == total
        # Under DistributedDataParallel, gradients are all-reduced only on the last
        # micro-batch of an accumulation.
        with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
            scaler.scale(loss / grad_accum).backward()
        if sync:
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        n = labels.shape[0]
        loss_sum += loss.detach().item() * n
        correct += int((logits.detach().argmax(1) == labels).sum())
        seen += n
        if progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
    return EpochStats(loss_sum, correct, seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    device: torch.device,
    precision: str = "32",
    flip: bool = False,
    limit: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ConfusionMeter:
    """Evaluates ``model`` on ``loader``.

    Args:
        model: Maps images (B, 3, H, W) to logits (B, num_classes).
        loader: Yields ``(images, labels)``.
        num_classes: Size of the confusion matrix.
        device: Where the model lives.
        precision: Autocast setting, as in training.
        flip: Average the softmax of each image and its horizontal mirror.
        limit: Stop after this many batches.
        progress: Show a tqdm bar.
        desc: The bar's label.
        prepare: Applied to each batch on the device (e.g. uint8 -> normalized float).

    Returns:
        The accumulated confusion matrix.
    """
    model.eval()
    meter = ConfusionMeter(num_classes)
    batches, total = _limited(loader, limit)
    for images, labels in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        with autocast(device, precision):
            scores = model(images).float().softmax(dim=1)
            if flip:
                scores = (scores + model(images.flip(-1)).float().softmax(dim=1)) / 2
        meter.update(scores, labels)
    return meter
