"""The built-in synthetic dataset: texture classes told apart only by co-occurrences.

A class pairs ``K`` stripe orientations with ``K`` colours; every class has the same
orientation and colour histograms, so only which orientation co-occurs with which colour
in a cell tells the classes apart: what a bilinear (second-order) descriptor captures and
an average-pooled one mostly misses (docs/datasets.md). Images are generated as zero-mean
floats x, stored as uint8 ``round(255 (x / 8 + 1/2))`` like any decoded photograph.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch.utils.data import Dataset

from bcnn.data.base import Split
from bcnn.limits import Fraction, NonEmpty, Seed, checked


class SyntheticDataset(Dataset):
    """In-memory, seeded texture dataset; no download and nothing written to disk.

    Args:
        root: Ignored (accepted so every dataset takes the same arguments).
        split: ``train``, ``val``, ``trainval`` or ``test``. ``train`` and ``val`` are a
            deterministic partition of ``trainval``; ``test`` is drawn independently.
        transform: Ignored: images are generated at their final size.
        augment: Ignored: flips would change stripe orientations and hence labels.
        num_classes: Number of pairings (at most ``num_textons!``).
        num_textons: Orientations and colours in the palette (``K``).
        image_size: Side of the square images in pixels; a multiple of ``cell_size``.
        cell_size: Side of one cell in pixels.
        trainval_size: Images in ``trainval``.
        test_size: Images in ``test``.
        val_fraction: Part of ``trainval`` held out as ``val``.
        val_seed: Seed of the train/val partition.
        cell_noise: Probability that a cell's colour is drawn at random instead.
        pixel_noise: Standard deviation of the Gaussian noise added to every pixel.
        seed: Seed of the palette, the classes and the images.
        name: The dataset's name in results.

    Items are ``(image, label)`` with ``image`` a uint8 tensor (3, S, S).
    """

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """Enough texton pairings for the classes; whole cells in an image."""
        classes, textons = values["num_classes"], values["num_textons"]
        if classes > math.factorial(textons):
            return (
                "num_classes",
                f"at most num_textons! = {math.factorial(textons)} classes exist with "
                f"num_textons={textons}; got {classes} (raise dataset.num_textons)",
            )
        if values["image_size"] % values["cell_size"]:
            return "image_size", f"must be a multiple of cell_size={values['cell_size']}"
        return None

    @checked
    def __init__(
        self,
        root: str | None = None,
        split: Split = "train",
        transform: Any = None,
        augment: bool = False,
        num_classes: Annotated[int, Ge(2)] = 12,
        # num_textons! pairings are enumerated: 8! = 40320 is plenty.
        num_textons: Annotated[int, Interval(ge=2, le=8)] = 4,
        image_size: Annotated[int, Interval(ge=1, le=4096)] = 32,
        cell_size: Annotated[int, Interval(ge=1, le=4096)] = 8,
        trainval_size: Annotated[int, Interval(ge=2, le=10**7)] = 2400,
        test_size: Annotated[int, Interval(ge=1, le=10**7)] = 1200,
        val_fraction: Fraction = 0.2,
        val_seed: Seed = 0,
        cell_noise: Annotated[float, Interval(ge=0, le=1)] = 0.1,
        # The uint8 encoding holds x in [-4, 4]: more noise only saturates.
        pixel_noise: Annotated[float, Interval(ge=0, le=4)] = 0.3,
        seed: Seed = 0,
        name: NonEmpty = "synthetic",
    ) -> None:
        self.split, self.name = split, name
        self.image_size, self.cell_size = image_size, cell_size
        self.cell_noise, self.pixel_noise = cell_noise, pixel_noise
        self._make_textons(num_classes, num_textons, seed)
        if split == "test":
            images, labels = self._generate(test_size, seed * 1000 + 2)
        else:
            images, labels = self._generate(trainval_size, seed * 1000 + 1)
            if split != "trainval":  # train and val partition trainval
                gen = torch.Generator().manual_seed(val_seed)
                order = torch.randperm(trainval_size, generator=gen)
                n_val = round(val_fraction * trainval_size)
                keep = order[:n_val] if split == "val" else order[n_val:]
                images, labels = images[keep], labels[keep]
        self.images = images
        self.targets = labels.tolist()

    def _make_textons(self, num_classes: int, num_textons: int, seed: int) -> None:
        """Draws the class pairings and the palette; builds the stripe patterns."""
        gen = torch.Generator().manual_seed(seed)
        perms = list(itertools.permutations(range(num_textons)))
        chosen = torch.randperm(len(perms), generator=gen)[:num_classes]
        self.pairings = torch.tensor([perms[i] for i in chosen.tolist()])  # (classes, K)
        self.classes = ["pairing_" + "".join(map(str, p)) for p in self.pairings.tolist()]
        palette = torch.randn(num_textons, 3, generator=gen)
        palette = palette - palette.mean(0)  # the palette's mean colour is grey
        self.palette = palette / palette.norm(dim=1, keepdim=True)
        yy, xx = torch.meshgrid(
            torch.arange(self.cell_size, dtype=torch.float32),
            torch.arange(self.cell_size, dtype=torch.float32),
            indexing="ij",
        )
        angles = [math.pi * k / num_textons for k in range(num_textons)]
        self.stripes = torch.stack(
            [torch.cos(math.pi / 2 * (xx * math.cos(a) + yy * math.sin(a))) for a in angles]
        )  # (K, cell, cell), period of 4 pixels

    def _generate(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        size, cell = self.image_size, self.cell_size
        gen = torch.Generator().manual_seed(seed)
        k = self.palette.shape[0]
        grid = size // cell
        labels = torch.randint(len(self.classes), (n,), generator=gen)
        orient = torch.randint(k, (n, grid, grid), generator=gen)
        colour = self.pairings[labels][torch.arange(n)[:, None, None], orient]
        noisy = torch.rand(n, grid, grid, generator=gen) < self.cell_noise
        colour = torch.where(noisy, torch.randint(k, (n, grid, grid), generator=gen), colour)
        # (n, g, g, 1, cell, cell) + (n, g, g, 3, 1, 1) -> (n, 3, g*cell, g*cell)
        cells = self.stripes[orient][:, :, :, None] + self.palette[colour][..., None, None]
        images = cells.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, size, size)
        images = images + self.pixel_noise * torch.randn(images.shape, generator=gen)
        encoded = (images / 8 + 0.5).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return encoded.contiguous(), labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]

    def skipped(self) -> list[str]:
        """Nothing is ever skipped: the images are generated (the datasets' common API)."""
        return []
