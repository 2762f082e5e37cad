"""Transform recipes: output sizes, crops and flips, uint8 out."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bcnn.data.transforms import build_transforms


def halves(width: int = 64, height: int = 48) -> Image.Image:
    """Left half red, right half blue: a flip swaps them."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize("recipe", ["short_side", "square", "resize_crop"])
@pytest.mark.parametrize("train", [True, False])
def test_recipes_give_square_outputs(recipe: str, train: bool) -> None:
    transform = build_transforms({"recipe": recipe, "size": 32}, augment=train)
    out = transform(halves(80, 40))
    assert isinstance(out, torch.Tensor) and type(out) is torch.Tensor
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_short_side_keeps_aspect_and_centre_crops() -> None:
    # 64x32 -> short side 16 gives 32x16; the centre crop of a red|blue image is red|blue.
    transform = build_transforms({"recipe": "short_side", "size": 16, "hflip": False}, False)
    out = transform(halves(64, 32))
    assert out.shape == (3, 16, 16)
    assert (
        out[0, :, :6].float().mean() > out[2, :, :6].float().mean()
        and out[2, :, -6:].float().mean() > out[0, :, -6:].float().mean()
    )
    # square squashes instead: the whole width survives.
    square = build_transforms({"recipe": "square", "size": 16}, augment=False)(halves(64, 32))
    assert square.shape == (3, 16, 16)


def test_resize_crop_default_and_validation() -> None:
    out = build_transforms({"recipe": "resize_crop", "size": 28}, augment=True)(halves())
    assert out.shape == (3, 28, 28)
    with pytest.raises(ValueError, match="resize must be >= size"):
        build_transforms({"recipe": "resize_crop", "size": 64, "resize": 32}, augment=True)
    with pytest.raises(ValueError, match="recipe must be one of short_side, square, resize_crop"):
        build_transforms({"recipe": "random_resized"}, augment=True)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['szie'\]"):
        build_transforms({"recipe": "square", "szie": 3}, augment=True)


def test_hflip_only_at_train_time_and_when_asked() -> None:
    torch.manual_seed(0)

    def left_is_red(recipe: dict, train: bool) -> set[bool]:
        transform = build_transforms(recipe, augment=train)
        return {bool(transform(halves())[0, :, :8].float().mean() > 127) for _ in range(24)}

    square = {"recipe": "square", "size": 32}
    assert left_is_red({**square, "hflip": True}, train=True) == {True, False}
    assert left_is_red({**square, "hflip": False}, train=True) == {True}
    assert left_is_red({**square, "hflip": True}, train=False) == {True}


def test_no_recipe_keeps_the_image_size_and_pixels() -> None:
    image = Image.new("RGB", (8, 6), (200, 100, 50))
    out = build_transforms(None, augment=False)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 8)
    assert out[:, 0, 0].tolist() == [200, 100, 50]


def test_accepts_omegaconf_and_pickles() -> None:
    recipe = OmegaConf.create({"recipe": "short_side", "size": 24, "hflip": True})
    transform = build_transforms(recipe, augment=True)
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers may spawn
    torch.manual_seed(3)
    a = transform(halves())
    torch.manual_seed(3)
    assert torch.equal(a, clone(halves()))
