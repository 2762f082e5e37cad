"""gamma-democratic aggregation in Tensor Sketch space (ECCV 2018, Tables 2-5): 2048 ResNet-101
channels make a 4.2M-entry matrix, so the paper aggregates in an 8192-dimensional sketch
(tsungyu/o2dp ``run_experiments_sketcho2dp_resnet.m``)."""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor, nn

from bcnn.limits import Seed, checked
from bcnn.ops import TensorSketch, democratic_weights
from bcnn.ops.compact import SketchDim


class DemocraticSketch(nn.Module):
    """Tensor Sketch of the gamma-democratic second-order matrix: (B, n, C) -> (B, D).

    A ``sketch`` for ``pooling=compact``. A sketch is linear in the outer product, so the
    sketch of sum_i alpha_i x_i x_i^T / sum_i alpha_i is ``TensorSketch`` of the features
    scaled by sqrt(n alpha_i / sum alpha) (gamma = 1: plain ``TensorSketch``). The weights
    come from the exact kernel (x_i^T x_j)^2 of the raw features, which the sketches' inner
    products estimate; the authors' code runs Sinkhorn on the sketched features.

    Args:
        in_dim: Channels C.
        out_dim: Sketch dimension D (8192 in the paper).
        seed: Seed of the sketch's hashes and signs.
        gamma: 1 = sum pooling (plain Tensor Sketch), 0 = fully democratic.
        tau: Damping of the Sinkhorn updates (0.5, o2dp ``'reg'``).
        iters: Sinkhorn iterations (10, o2dp ``'iter'``).
        in_dim2: Must be None or C: democratic aggregation has one stream.
    """

    @checked
    def __init__(
        self,
        in_dim: int,
        out_dim: SketchDim = 8192,
        seed: Seed = 0,
        gamma: Annotated[float, Interval(ge=0, le=1)] = 0.5,
        tau: Annotated[float, Interval(gt=0, le=1)] = 0.5,
        iters: Annotated[int, Interval(ge=1, le=1000)] = 10,
        in_dim2: int | None = None,
    ) -> None:
        super().__init__()
        if in_dim2 not in (None, in_dim):
            raise ValueError(
                "pooling.sketch=DemocraticSketch aggregates one stream; use a one-stream "
                f"backbone (got channels {in_dim} and {in_dim2})"
            )
        self.sketch = TensorSketch(in_dim, out_dim=out_dim, seed=seed)
        self.out_dim = int(out_dim)
        self.gamma, self.tau, self.iters = float(gamma), float(tau), int(iters)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Sketch of sum_i alpha_i x_i x_i^T / sum_i alpha_i of ``x`` ``(B, n, C)`` (channels
        last; ``y`` must be None): ``(B, D)``, float32 or float64 for float64 input."""
        if y is not None:
            raise ValueError("DemocraticSketch aggregates one stream: got a second input")
        alpha = democratic_weights(x, gamma=self.gamma, tau=self.tau, iters=self.iters, detach=True)
        # n alpha_i / sum alpha: TensorSketch averages over locations.
        w = alpha * (alpha.shape[-1] / alpha.sum(-1, keepdim=True))
        return self.sketch(x.to(w.dtype) * torch.sqrt(w)[..., None])

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, tau={self.tau}, iters={self.iters}"
