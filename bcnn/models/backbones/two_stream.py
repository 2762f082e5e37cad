"""Two-stream (asymmetric) backbones: B-CNN [D, M] and any other pair."""

from __future__ import annotations

import torch

from bcnn.models.backbones.base import Backbone, InputAdapter


def _nearest_indices(big: int, small: int, device: torch.device) -> torch.Tensor:
    """0-based ``round(linspace(1, big, small)) - 1`` with MATLAB's round-half-up, in
    integers: ``torch.round`` rounds half to even, and 28 -> 27 has a half-way case."""
    if small == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    k = torch.arange(small, device=device)
    return (2 * k * (big - 1) + (small - 1)) // (2 * (small - 1))


def align_maps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsamples the larger of two maps to the other's spatial size, as the B-CNN code does
    (``vl_nnbilinearclpool`` keeps rows/columns ``round(linspace(1, H, h))``: VGG-D's 28x28
    against VGG-M's 27x27 loses the 14th row and column).

    Args:
        a: (B, Ca, Ha, Wa).
        b: (B, Cb, Hb, Wb).

    Returns:
        Both maps at (min(Ha, Hb), min(Wa, Wb)).
    """
    for dim in (2, 3):
        na, nb = a.shape[dim], b.shape[dim]
        if na > nb:
            a = a.index_select(dim, _nearest_indices(na, nb, a.device))
        elif nb > na:
            b = b.index_select(dim, _nearest_indices(nb, na, b.device))
    return a, b


class TwoStream(Backbone):
    """Two backbones on the same image; returns both maps aligned to one spatial size.

    The images come in ``stream_a``'s input convention; ``stream_b``'s is converted from it
    exactly (``InputAdapter``).

    Args:
        stream_a: First backbone (its ``input_spec`` is this backbone's).
        stream_b: Second backbone.
    """

    def __init__(self, stream_a: Backbone, stream_b: Backbone) -> None:
        super().__init__()
        ca, cb = stream_a.out_channels, stream_b.out_channels
        if isinstance(ca, tuple) or isinstance(cb, tuple):
            raise ValueError("TwoStream: each stream must give a single feature map")
        self.stream_a = stream_a
        self.stream_b = stream_b
        self.adapt_b = InputAdapter(stream_a.input_spec, stream_b.input_spec)
        self.out_channels = (int(ca), int(cb))
        self.input_spec = stream_a.input_spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> ((B, Ca, h, w), (B, Cb, h, w)); 448: 28x28 and 27x27 -> 27x27."""
        return align_maps(self.stream_a(x), self.stream_b(self.adapt_b(x)))
