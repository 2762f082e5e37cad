"""Texture patches cut from the photographs scikit-image ships: the real tier's dataset.

One class per photograph, cut into ``STRIPS`` vertical strips (a ``GAP`` between them) that
alternate between training and test, so that no test pixel was ever seen in training while
both splits cover the whole photograph (one half each side would test on other content
than it trains on: the cat's head against its back). A patch is a square of random side
(``SCALES`` of the photograph's height, capped by the strip's width) at a random place in a
random strip of its split, resized to ``SIZE`` and randomly mirrored. The folder is
``dataset=folder``'s layout, ``<root>/{train,test}/<class>/<i>.png``, written once;
``python -m tests.real.photos <root>`` writes it for the commands of docs/reproduce.md.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Class -> skimage.data function (grayscale photographs are replicated to RGB).
PHOTOS = {
    "brick": "brick",
    "cat_fur": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "hubble": "hubble_deep_field",
    "ihc": "immunohistochemistry",
    "moon": "moon",
    "retina": "retina",
}
SIZE = 112
TRAIN_PER_CLASS = 16
TEST_PER_CLASS = 30
STRIPS = 4  # even strips train, odd ones test
GAP = 16
SCALES = (0.25, 0.6)
VERSION = 3  # part of the folder name: a change above writes a new folder


def photograph(name: str) -> np.ndarray:
    """skimage.data's photograph ``name`` as (H, W, 3) uint8."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]


def cut_patches(
    image: np.ndarray, n: int, strips: list[tuple[int, int]], seed: int
) -> list[Image.Image]:
    """``n`` patches from the column ranges ``strips`` of ``image`` (module docstring)."""
    rng = np.random.default_rng(seed)
    height = image.shape[0]
    patches = []
    for _ in range(n):
        left, right = strips[int(rng.integers(len(strips)))]
        side = int(min(right - left, height * rng.uniform(*SCALES)))
        y = int(rng.integers(0, height - side + 1))
        x = int(rng.integers(left, right - side + 1))
        patch = Image.fromarray(image[y : y + side, x : x + side]).resize(
            (SIZE, SIZE), Image.Resampling.BICUBIC
        )
        patches.append(
            patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else patch
        )
    return patches


def write_patches(root: Path) -> Path:
    """Writes the dataset under ``root`` unless it is complete; returns ``root``."""
    done = root / ".complete"
    if done.exists():
        return root
    for c, (label, name) in enumerate(sorted(PHOTOS.items())):
        image = photograph(name)
        edges = np.linspace(0, image.shape[1], STRIPS + 1).astype(int)
        strips = [(int(a) + GAP // 2, int(b) - GAP // 2) for a, b in itertools.pairwise(edges)]
        regions = {
            "train": (strips[0::2], TRAIN_PER_CLASS),
            "test": (strips[1::2], TEST_PER_CLASS),
        }
        for s, (split, (split_strips, n)) in enumerate(regions.items()):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i, patch in enumerate(cut_patches(image, n, split_strips, seed=100 * c + s)):
                patch.save(folder / f"{i:03d}.png")
    done.touch()
    return root


if __name__ == "__main__":
    print(write_patches(Path(sys.argv[1])))
