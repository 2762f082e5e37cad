"""Train and test transforms, built from a dataset config's ``transform`` recipe.

The recipes follow the published B-CNN protocols (table in docs/datasets.md). Every recipe
ends with a uint8 ``(3, H, W)`` tensor: DataLoader workers hand over 4x fewer bytes than
float32, and the model normalizes whole batches on its device
(``BilinearModel.normalize_input``), so no dataset depends on the backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from annotated_types import Interval
from torchvision.transforms import v2

from bcnn.limits import Fields, problem

Side = Annotated[int, Interval(ge=1, le=8192)]


@dataclass(frozen=True)
class Recipe:
    """A dataset config's ``transform`` mapping.

    Attributes:
        recipe: ``short_side`` (short side to ``size``, then a random or centre ``size``
            crop), ``square`` (resize to ``size x size``) or ``resize_crop`` (resize to
            ``resize x resize``, then the crop).
        size: Output side.
        resize: ``resize_crop`` only; default ``size * 8 / 7`` (512 for 448).
        hflip: A random horizontal flip at train time.
        auto_augment: torchvision's RandAugment or TrivialAugmentWide at train time.
    """

    recipe: Literal["short_side", "square", "resize_crop"] = "short_side"
    size: Side = 448
    resize: Side | None = None
    hflip: bool = True
    auto_augment: Literal["randaugment", "trivialaugment"] | None = None

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """A crop must fit in the resized image."""
        resize, size = values.get("resize"), values.get("size", 448)
        if resize is not None and resize < size:
            return "resize", f"must be >= size for resize_crop, got resize={resize} size={size}"
        return None


# The ``transform`` argument of a dataset: a recipe, or any callable on PIL images.
RecipeMapping = Annotated[Mapping[str, Any], Fields(Recipe)]
AUTO_AUGMENT = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}


def build_transforms(
    recipe: Mapping[str, Any] | None, augment: bool
) -> Callable[[Any], torch.Tensor]:
    """Builds the transform for one split.

    Args:
        recipe: The dataset config's ``transform`` mapping (the fields of :class:`Recipe`);
            ``None`` converts to a tensor only, at the image's own size.
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
