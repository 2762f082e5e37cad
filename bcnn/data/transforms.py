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
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from annotated_types import Interval
from torchvision.transforms import v2

from bcnn.limits import Fields, problem

Side = Annotated[int, Interval(ge=1, le=8192)]
RecipeName = Literal["short_side", "square", "resize_crop"]


@dataclass(frozen=True)
class Recipe:
    """A dataset config's ``transform`` mapping (see the module docstring)."""

    recipe: RecipeName = "short_side"
    size: Side = 448
    resize: Side | None = None  # resize_crop only; default size * 8 / 7
    hflip: bool = True
    # A random augmentation policy of torchvision on the training images (off: None).
    auto_augment: Literal["randaugment", "trivialaugment"] | None = None

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """A crop must fit in the resized image."""
        resize, size = values.get("resize"), values.get("size", 448)
        if resize is not None and resize < size:
            return "resize", f"must be >= size for resize_crop, got resize={resize} size={size}"
        return None


RECIPES: tuple[str, ...] = get_args(RecipeName)
# The ``transform`` argument of a dataset: a recipe, or any callable on PIL images.
RecipeMapping = Annotated[Mapping[str, Any], Fields(Recipe)]
AUTO_AUGMENT = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}


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
        ValueError: a recipe that breaks :class:`Recipe`'s declarations.
    """
    steps: list[Callable[[Any], Any]] = [v2.ToImage()]
    if recipe is not None:
        found = problem(recipe, RecipeMapping)
        if found:
            raise ValueError(f"transform: {found}")
        r = Recipe(**recipe)
        crop = v2.RandomCrop(r.size) if augment else v2.CenterCrop(r.size)
        if r.recipe == "short_side":
            steps += [v2.Resize(r.size, antialias=True), crop]
        elif r.recipe == "square":
            steps.append(v2.Resize((r.size, r.size), antialias=True))
        else:  # resize_crop
            resize = r.resize or round(r.size * 8 / 7)
            steps += [v2.Resize((resize, resize), antialias=True), crop]
        if augment and r.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment and r.auto_augment:
            steps.append(AUTO_AUGMENT[r.auto_augment]())
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


__all__ = ["RECIPES", "Recipe", "RecipeMapping", "build_transforms"]
