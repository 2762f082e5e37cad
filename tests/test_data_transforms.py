"""Transform recipes: output sizes, crops, flips and the backbone's input convention."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bcnn.data.spec import IMAGENET, InputSpec
from bcnn.data.transforms import ToNormalizedFloat, build_transforms


def halves(width: int = 64, height: int = 48) -> Image.Image:
    """Left half red, right half blue: a flip swaps them."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize("recipe", ["short_side", "square", "resize_crop"])
@pytest.mark.parametrize("train", [True, False])
def test_recipes_give_square_outputs(recipe: str, train: bool) -> None:
    transform = build_transforms({"recipe": recipe, "size": 32}, IMAGENET, train=train)
    out = transform(halves(80, 40))
    assert isinstance(out, torch.Tensor) and type(out) is torch.Tensor
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_short_side_keeps_aspect_and_centre_crops() -> None:
    # 64x32 -> short side 16 gives 32x16; the centre crop of a red|blue image is red|blue.
    transform = build_transforms(
        {"recipe": "short_side", "size": 16, "hflip": False}, IMAGENET, train=False
    )
    out = transform(halves(64, 32))
    assert out.shape == (3, 16, 16)
    assert (
        out[0, :, :6].mean() > out[2, :, :6].mean()
        and out[2, :, -6:].mean() > out[0, :, -6:].mean()
    )
    # square squashes instead: the whole width survives.
    square = build_transforms({"recipe": "square", "size": 16}, IMAGENET, train=False)(
        halves(64, 32)
    )
    assert square.shape == (3, 16, 16)


def test_resize_crop_default_and_validation() -> None:
    out = build_transforms({"recipe": "resize_crop", "size": 28}, IMAGENET, train=True)(halves())
    assert out.shape == (3, 28, 28)
    with pytest.raises(ValueError, match="resize >= size"):
        build_transforms({"recipe": "resize_crop", "size": 64, "resize": 32}, IMAGENET, train=True)
    with pytest.raises(ValueError, match="unknown transform recipe"):
        build_transforms({"recipe": "random_resized"}, IMAGENET, train=True)
    with pytest.raises(ValueError, match="unknown transform keys"):
        build_transforms({"recipe": "square", "szie": 3}, IMAGENET, train=True)


def test_hflip_only_at_train_time_and_when_asked() -> None:
    torch.manual_seed(0)

    def left_is_red(recipe: dict, train: bool) -> set[bool]:
        transform = build_transforms(recipe, IMAGENET, train=train)
        return {bool(transform(halves())[0, :, :8].mean() > 0) for _ in range(24)}

    square = {"recipe": "square", "size": 32}
    assert left_is_red({**square, "hflip": True}, train=True) == {True, False}
    assert left_is_red({**square, "hflip": False}, train=True) == {True}
    assert left_is_red({**square, "hflip": True}, train=False) == {True}


def test_normalization_follows_the_input_spec() -> None:
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    out = build_transforms(None, IMAGENET, train=False)(image)  # no recipe: own size
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), IMAGENET.mean, IMAGENET.std)]
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    # MatConvNet-style: BGR order, values in 0..255, mean given in BGR order.
    caffe = InputSpec(mean=(10.0, 20.0, 30.0), std=(1.0, 1.0, 2.0), color="BGR", scale=255.0)
    out = build_transforms({"recipe": "square", "size": 4}, caffe, train=False)(image)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor([40.0, 80.0, 85.0]), atol=1e-3)


def test_accepts_omegaconf_and_pickles() -> None:
    recipe = OmegaConf.create({"recipe": "short_side", "size": 24, "hflip": True})
    caffe = InputSpec(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0), color="BGR", scale=255.0)
    transform = build_transforms(recipe, caffe, train=True)
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers may spawn
    torch.manual_seed(3)
    a = transform(halves())
    torch.manual_seed(3)
    assert torch.equal(a, clone(halves()))


def test_uint8_output_normalized_later_in_batches_matches() -> None:
    caffe = InputSpec(mean=(10.0, 20.0, 30.0), std=(1.0, 1.0, 2.0), color="BGR", scale=255.0)
    recipe = {"recipe": "short_side", "size": 24}
    raw = build_transforms(recipe, caffe, train=False, normalize=False)(halves())
    assert raw.dtype == torch.uint8 and raw.shape == (3, 24, 24) and type(raw) is torch.Tensor
    batch = ToNormalizedFloat(caffe)(torch.stack([raw, raw]))  # what a trainer does on the GPU
    direct = build_transforms(recipe, caffe, train=False)(halves())
    assert batch.shape == (2, 3, 24, 24)
    assert torch.allclose(batch[1], direct, atol=1e-4)
