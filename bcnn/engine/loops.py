"""One training epoch and one evaluation pass, as plain functions (the model owns its input
convention and its frozen parts), and the sums they return. The sums stay on the device: the
host reads them once per epoch, and every ``check_every`` steps to stop a diverged epoch
early. The loss is float32, so under fp16 a non-finite loss is real divergence, never a
GradScaler's skipped step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bcnn.engine import distributed as D

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``trainer.precision`` (``32`` disables it)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def _batches(loader: Iterable, max_batches: int | None, desc: str | None) -> tuple[Iterable, int]:
    total = len(loader)  # type: ignore[arg-type]
    if max_batches is not None and max_batches < total:
        loader, total = (b for _, b in zip(range(max_batches), loader)), max_batches
    return tqdm(loader, total=total, desc=desc, disable=desc is None, leave=False), total


@dataclass
class EpochStats:
    """Sums over the batches of one training epoch; ``nonfinite`` counts the processes whose
    loss was not finite at some step (this process's first: ``first_nonfinite_step``)."""

    loss_sum: float
    correct: int
    seen: int
    nonfinite: int = 0
    first_nonfinite_step: int | None = None

    @property
    def diverged(self) -> bool:
        """Whether some step's loss was not finite (in any process)."""
        return self.nonfinite > 0

    @property
    def loss(self) -> float:
        """Mean loss per image (NaN when no image was seen)."""
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def acc(self) -> float:
        """Top-1 accuracy in percent (NaN when no image was seen)."""
        return 100.0 * self.correct / self.seen if self.seen else math.nan

    def all_reduce(self) -> EpochStats:
        """The sums over the processes of a distributed run."""
        values = [self.loss_sum, self.correct, self.seen, self.nonfinite]
        loss, correct, seen, bad = D.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return EpochStats(float(loss), int(correct), int(seen), int(bad), self.first_nonfinite_step)


class ConfusionMeter:
    """A confusion matrix accumulated on ``device`` (updates cost no host synchronisation);
    gives top-1 and mean per-class accuracy."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch: scores (B, num_classes), integer targets (B,)."""
        pred = scores.argmax(dim=1).to(self.matrix.device)
        idx = targets.to(self.matrix.device) * self.num_classes + pred
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view_as(self.matrix)

    def all_reduce(self) -> ConfusionMeter:
        """Sums the matrix over the processes of a distributed run (in place)."""
        self.matrix = D.all_reduce_sum(self.matrix)
        return self

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return int(self.matrix.sum())

    def accuracy(self) -> float:
        """Top-1 accuracy in percent (NaN before any update)."""
        n = self.count
        return float(self.matrix.diag().sum()) * 100.0 / n if n else float("nan")

    def mean_class_accuracy(self) -> float:
        """Mean over the classes present of per-class accuracy, in percent (NaN: none)."""
        per_class = self.matrix.sum(dim=1)
        present = per_class > 0
        return float((self.matrix.diag()[present].double() / per_class[present]).mean()) * 100.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    precision: str = "32",
    grad_accum: int = 1,
    grad_clip: float | None = None,
    max_batches: int | None = None,
    desc: str | None = None,
    check_every: int = 50,
    label_smoothing: float = 0.0,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> EpochStats:
    """Trains ``model`` for one pass over ``loader``.

    The optimizer steps every ``grad_accum`` batches on the mean of their losses: with
    batches of B / k images, ``grad_accum=k`` takes the step one batch of B images would.

    Args:
        model: Maps images (B, 3, H, W) to logits (B, C); may be a DDP wrapper.
        loader: Yields ``(images, labels (B,))``.
        scaler: Loss scaler (fp16), if any.
        precision: ``32``, ``bf16`` or ``fp16`` (autocast dtype).
        grad_clip: Max global gradient norm, applied to unscaled gradients.
        desc: Label of a progress bar; ``None`` shows none.
        check_every: Steps between looks (by all processes together) for a non-finite loss.
        label_smoothing: Weight of the uniform distribution in the targets.
        mix: Maps a batch and its labels (B,) to mixed images and soft targets (B, C)
            (mixup, cutmix); accuracy still counts against the labels.
        after_step: Called with the micro-batch loss after each optimizer step.

    Returns:
        This process's sums, with the first step whose loss was not finite.
    """
    model.train()
    # A disabled scaler steps the optimizer as it is.
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    batches, total = _batches(loader, max_batches, desc)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    # First step whose loss was not finite (-1: none yet), kept on the device.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images, targets = mix(images, labels) if mix is not None else (images, labels)
        with autocast(device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        sync = (step + 1) % grad_accum == 0 or step + 1 == total
        # Under DDP, gradients are all-reduced only on an accumulation's last micro-batch.
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if sync or no_sync is None else no_sync():
            scaler.scale(loss / grad_accum).backward()
        if sync:
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(loss.detach())
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        # Every check_every steps all processes look (together, so they stop together).
        look = check_every and (step + 1) % check_every == 0 and step + 1 < total
        if look and int(D.all_reduce_sum((bad_step >= 0).long().cpu())) > 0:
            break
    first = int(bad_step)
    return EpochStats(
        float(loss_sum), int(correct), seen, int(first >= 0), first if first >= 0 else None
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    device: torch.device,
    *,
    precision: str = "32",
    flip: bool = False,
    max_batches: int | None = None,
    desc: str | None = None,
) -> ConfusionMeter:
    """Evaluates ``model`` (images (B, 3, H, W) -> logits (B, num_classes)) on at most
    ``max_batches`` of ``loader``, averaging the softmax of each image and of its mirror
    image with ``flip`` (a progress bar labelled ``desc`` unless None).

    Returns:
        The confusion matrix of this process's batches (on ``device``).
    """
    model.eval()
    meter = ConfusionMeter(num_classes, device)
    batches, _ = _batches(loader, max_batches, desc)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        with autocast(device, precision):
            scores = model(images).float().softmax(dim=1)
            if flip:
                scores = (scores + model(images.flip(-1)).float().softmax(dim=1)) / 2
        meter.update(scores, labels.to(device, non_blocking=True))
    return meter
