"""Classification metrics accumulated over batches."""

from __future__ import annotations

import torch

from bcnn.engine import distributed as D


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
        """Mean over the classes present of per-class accuracy, in percent."""
        per_class = self.matrix.sum(dim=1)
        present = per_class > 0
        if not present.any():
            return float("nan")
        acc = self.matrix.diag()[present].double() / per_class[present].double()
        return float(acc.mean()) * 100.0
