"""Train and test transforms, built from a dataset config's ``transform`` recipe.

Recipes (the ``recipe`` key), following the published B-CNN protocols:

* ``short_side``: resize the short side to ``size`` (aspect kept), then a random crop of
  ``size x size`` at train time or the centre crop at test time (CUB, NABirds, iNat).
* ``square``: resize to ``size x size`` (Cars, MIT Indoor, DTD, FMD).
* ``resize_crop``: resize to ``resize x resize`` (default ``size * 8 / 7``, 512 for 448),
  then a random / centre ``size`` crop (Aircraft).

``hflip: true`` adds a random horizontal flip at train time (``augment``), and
``auto_augment`` (``randaugment`` or ``trivialaugment``, off by default) torchvision's
RandAugment or TrivialAugmentWide after it, on the uint8 image. Every recipe
ends with a uint8 ``(3, H, W)`` tensor: DataLoader workers hand over 4x fewer bytes than
float32, and the model converts and normalizes whole batches on its device
(``BilinearModel.normalize_input``), so no dataset depends on the backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2

RECIPES = ("short_side", "square", "resize_crop")
AUTO_AUGMENT = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
_KEYS = {"recipe", "size", "resize", "hflip", "auto_augment"}


def build_transforms(
    recipe: Mapping[str, Any] | None, augment: bool
) -> Callable[[Any], torch.Tensor]:
    """Builds the transform for one split.

    Args:
        recipe: The dataset config's ``transform`` mapping: ``recipe`` (one of
            ``RECIPES``), ``size`` (output side, default 448), ``resize`` (only
            ``resize_crop``), ``hflip`` (default true) and ``auto_augment`` (a key of
            ``AUTO_AUGMENT``, default none). ``None`` converts and normalizes only, at the
            image's own size.
        augment: Random crop and flip (training) or centre crop (evaluation).

    Returns:
        A picklable callable mapping a PIL image (or a uint8 ``(3, H, W)`` tensor) to a
        uint8 ``(3, size, size)`` tensor.

    Raises:
        ValueError: Unknown recipe or key, or ``resize < size``.
    """
    steps: list[Callable[[Any], Any]] = [v2.ToImage()]
    if recipe is not None:
        recipe = dict(recipe)
        if unknown := set(recipe) - _KEYS:
            raise ValueError(
                f"unknown transform keys {sorted(unknown)}; valid keys: {sorted(_KEYS)}"
            )
        name = recipe.get("recipe", "short_side")
        size = int(recipe.get("size", 448))
        crop = v2.RandomCrop(size) if augment else v2.CenterCrop(size)
        if name == "short_side":
            steps += [v2.Resize(size, antialias=True), crop]
        elif name == "square":
            steps.append(v2.Resize((size, size), antialias=True))
        elif name == "resize_crop":
            resize = int(recipe.get("resize") or round(size * 8 / 7))
            if resize < size:
                raise ValueError(
                    f"resize_crop needs resize >= size, got resize={resize} size={size}"
                )
            steps += [v2.Resize((resize, resize), antialias=True), crop]
        else:
            raise ValueError(f"unknown transform recipe {name!r}; choose one of {RECIPES}")
        if augment and recipe.get("hflip", True):
            steps.append(v2.RandomHorizontalFlip())
        if augment and recipe.get("auto_augment"):
            if recipe["auto_augment"] not in AUTO_AUGMENT:
                raise ValueError(f"auto_augment must be one of {sorted(AUTO_AUGMENT)} or null")
            steps.append(AUTO_AUGMENT[recipe["auto_augment"]]())
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


__all__ = ["RECIPES", "build_transforms"]
