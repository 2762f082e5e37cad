"""The built-in dataset: deterministic, split correctly, first-order statistics shared."""

from __future__ import annotations

import pytest
import torch
from fixtures.datasets import build

from bcnn.data.synthetic import SyntheticDataset


def test_deterministic_and_split_sizes() -> None:
    a = build("synthetic", split="train", trainval_size=200, test_size=50)
    b = build("synthetic", split="train", trainval_size=200, test_size=50)
    val = build("synthetic", split="val", trainval_size=200, test_size=50)
    trainval = build("synthetic", split="trainval", trainval_size=200, test_size=50)
    test = build("synthetic", split="test", trainval_size=200, test_size=50)
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    assert (len(a), len(val), len(trainval), len(test)) == (160, 40, 200, 50)
    # train and val partition trainval: every trainval image is in exactly one of them.
    flat = lambda ds: {tuple(x.flatten()[:16].tolist()) for x in ds.images}  # noqa: E731
    assert flat(a).isdisjoint(flat(val))
    assert flat(a) | flat(val) == flat(trainval)
    assert flat(test).isdisjoint(flat(trainval))
    image, label = a[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert 0 <= label < len(a.classes) == 12


def test_other_seed_gives_other_images() -> None:
    a = SyntheticDataset(split="test", test_size=20, seed=0)
    b = SyntheticDataset(split="test", test_size=20, seed=1)
    assert not torch.equal(a.images, b.images)


def test_classes_share_first_order_statistics() -> None:
    # Per-class mean colour and mean stripe energy agree across classes (they differ
    # only in which stripe orientation carries which colour).
    ds = SyntheticDataset(split="trainval", trainval_size=2400, pixel_noise=0.0, cell_noise=0.0)
    labels = torch.tensor(ds.targets)
    images = ds.images.float() / 255 * 8 - 4  # the generated values (see the encoding)
    means = torch.stack([images[labels == c].mean(dim=(0, 2, 3)) for c in range(12)])
    assert (means - means.mean(0)).abs().max() < 0.05
    # ... while the per-class colour covariance, a second-order statistic, differs.
    covs = []
    for c in range(12):
        x = images[labels == c].permute(1, 0, 2, 3).flatten(1)
        covs.append(torch.cov(x))
    spread = torch.stack(covs).std(dim=0).max()
    assert spread > 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 30}, "num_textons"),
        ({"image_size": 30}, "multiple of cell_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticDataset(split="train", **kwargs)
