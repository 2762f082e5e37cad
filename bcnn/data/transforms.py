"""Train and test transforms, built from a dataset config's ``transform`` recipe.

Recipes (the ``recipe`` key), following the published B-CNN protocols:

* ``short_side``: resize the short side to ``size`` (aspect kept), then a random crop of
  ``size x size`` at train time or the centre crop at test time (CUB, NABirds, iNat).
* ``square``: resize to ``size x size`` (Cars, MIT Indoor, DTD, FMD).
* ``resize_crop``: resize to ``resize x resize`` (default ``size * 8 / 7``, 512 for 448),
  then a random / centre ``size`` crop (Aircraft).

``hflip: true`` adds a random horizontal flip at train time. Every recipe ends with a
float tensor normalized for the backbone's :class:`~bcnn.data.spec.InputSpec`: pixel
values in [0, 1] or [0, 255] (``scale``), channels swapped for ``BGR``, then
``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from bcnn.data.spec import InputSpec

RECIPES = ("short_side", "square", "resize_crop")
_KEYS = {"recipe", "size", "resize", "hflip"}


class ToNormalizedFloat:
    """Converts a uint8 image tensor to the backbone's float convention in one pass.

    ``(x * scale / 255 - mean) / std`` is computed as ``x * a + b`` with per-channel
    constants, after an optional RGB -> BGR swap done on the uint8 data: one float
    allocation instead of the three of ``ToDtype`` + ``Normalize`` (2.4 MB each at 448).
    Works on ``(3, H, W)`` images and on ``(N, 3, H, W)`` batches on any device, so a
    trainer can also load uint8 batches (``build_transforms(..., normalize=False)``) and
    normalize them on the GPU, which passes 4x fewer bytes from the DataLoader workers
    (see ``benchmarks/results/data_loading_cpu.md``). A class, not a lambda: DataLoader
    workers pickle it.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
        self.weight = spec.scale / 255.0 / std
        self.bias = -torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)  # plain tensor: no tv_tensor dispatch from here on
        if self.spec.color == "BGR":
            x = x.flip(-3)
        out = x.to(torch.float32)
        return out.mul_(self.weight.to(out.device)).add_(self.bias.to(out.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def build_transforms(
    recipe: Mapping[str, Any] | None, spec: InputSpec, train: bool, normalize: bool = True
) -> Callable[[Any], torch.Tensor]:
    """Builds the transform for one split.

    Args:
        recipe: The dataset config's ``transform`` mapping: ``recipe`` (one of
            ``RECIPES``), ``size`` (output side, default 448), ``resize`` (only
            ``resize_crop``) and ``hflip`` (default true). ``None`` converts and
            normalizes only, at the image's own size.
        spec: The backbone's input convention.
        train: Random crop and flip (train) or centre crop (evaluation).
        normalize: ``False`` returns the uint8 ``(3, H, W)`` tensor instead, for
            :class:`ToNormalizedFloat` to be applied to whole batches on the device.

    Returns:
        A picklable callable mapping a PIL image (or a uint8 ``(3, H, W)`` tensor) to a
        ``(3, size, size)`` float tensor.

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
        crop = v2.RandomCrop(size) if train else v2.CenterCrop(size)
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
        if train and recipe.get("hflip", True):
            steps.append(v2.RandomHorizontalFlip())
    steps.append(ToNormalizedFloat(spec) if normalize else v2.ToPureTensor())
    return v2.Compose(steps)


__all__ = ["RECIPES", "ToNormalizedFloat", "build_transforms"]
