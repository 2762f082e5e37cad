"""Texture patches cut from the photographs scikit-image ships: the real tier's dataset.

One class per photograph. Training patches come from the left part of each photograph and
test patches from its right part (``SPLIT`` of the width, with a gap), so that no test pixel
was ever seen in training. A patch is a square of random side (``SCALES`` of the region's
height, capped by its width) at a random place, resized to ``SIZE`` and randomly mirrored.
The folder is ``dataset=folder``'s layout, ``<root>/{train,test}/<class>/<i>.png``, written
once; ``python -m tests.real.photos <root>`` writes it for the commands of
docs/reproduce.md.
"""

from __future__ import annotations

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
TRAIN_PER_CLASS = 20
TEST_PER_CLASS = 15
SPLIT = 0.5  # training region: x < SPLIT * W - GAP / 2; test region: x >= SPLIT * W + GAP / 2
GAP = 16
SCALES = (0.25, 0.6)
VERSION = 1  # part of the folder name: a change above writes a new folder


def photograph(name: str) -> np.ndarray:
    """skimage.data's photograph ``name`` as (H, W, 3) uint8."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]


def cut_patches(image: np.ndarray, n: int, left: int, right: int, seed: int) -> list[Image.Image]:
    """``n`` patches from columns ``left:right`` of ``image`` (module docstring)."""
    rng = np.random.default_rng(seed)
    height = image.shape[0]
    patches = []
    for _ in range(n):
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
        middle = int(image.shape[1] * SPLIT)
        regions = {
            "train": (0, middle - GAP // 2, TRAIN_PER_CLASS),
            "test": (middle + GAP // 2, image.shape[1], TEST_PER_CLASS),
        }
        for s, (split, (left, right, n)) in enumerate(regions.items()):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i, patch in enumerate(cut_patches(image, n, left, right, seed=100 * c + s)):
                patch.save(folder / f"{i:03d}.png")
    done.touch()
    return root


if __name__ == "__main__":
    print(write_patches(Path(sys.argv[1])))
