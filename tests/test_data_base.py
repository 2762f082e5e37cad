"""The shared dataset base: splits, image decoding, bad images, crops, sample lists."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fixtures.datasets import BOX_COLOR, make_cub, make_dtd, nearest_label, write_image
from PIL import Image

from bcnn.data.base import (
    VERIFY_COMMAND,
    BadImageError,
    Record,
    RecordDataset,
    require_files,
    select_split,
    split_train_val,
)
from bcnn.data.cub import CUB200
from bcnn.data.dtd import DTD
from bcnn.data.source import DatasetSource


def _records(per_class: dict[int, int]) -> list[Record]:
    return [
        Record(f"c{label}/img{k:03d}.jpg", label)
        for label, n in per_class.items()
        for k in range(n)
    ]


def test_split_train_val_is_stratified_disjoint_and_complete() -> None:
    records = _records({0: 30, 1: 10, 2: 3, 3: 1})
    train, val = split_train_val(records, 0.1, seed=0)
    assert set(train) | set(val) == set(records)
    assert not set(train) & set(val)
    assert Counter(r.label for r in val) == {0: 3, 1: 1, 2: 1}  # one-image class stays in train
    assert Counter(r.label for r in train) == {0: 27, 1: 9, 2: 2, 3: 1}
    # Both keep the input order.
    assert train == [r for r in records if r in set(train)]


def test_split_train_val_is_deterministic_and_seeded() -> None:
    records = _records({0: 40, 1: 40})
    assert split_train_val(records, 0.25, 0) == split_train_val(records, 0.25, 0)
    assert set(split_train_val(records, 0.25, 0)[1]) != set(split_train_val(records, 0.25, 1)[1])
    # The choice depends on the set of paths, not on the order they come in.
    shuffled = records[::-1]
    assert set(split_train_val(shuffled, 0.25, 0)[1]) == set(split_train_val(records, 0.25, 0)[1])


def test_split_train_val_fraction_zero_and_bounds() -> None:
    records = _records({0: 5})
    assert split_train_val(records, 0.0, 0) == (records, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(records, 1.0, 0)


def test_select_split_with_and_without_official_val() -> None:
    train, val, test = _records({0: 10}), [Record("v.jpg", 0)], [Record("t.jpg", 0)]
    assert select_split("test", train=train, test=test) == test
    assert select_split("trainval", train=train, test=test) == train
    carved = select_split("train", train=train, test=test, val_fraction=0.2)
    held = select_split("val", train=train, test=test, val_fraction=0.2)
    assert len(held) == 2 and sorted(carved + held) == sorted(train)
    assert select_split("val", train=train, val=val, test=test, val_fraction=0.5) == val
    assert select_split("trainval", train=train, val=val, test=test) == train + val
    with pytest.raises(ValueError, match="split"):
        select_split("dev", train=train, test=test)


def test_require_files_names_the_missing_file_layout_and_source(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    toy = DatasetSource(name="toy", title="Toy", layout="<root>/b.txt", manual="run prepare")
    with pytest.raises(FileNotFoundError) as info:
        require_files(tmp_path, ["a.txt", "b.txt", "c.txt"], toy)
    message = str(info.value)
    assert message.startswith(f"Toy: missing {tmp_path / 'b.txt'}") and "1 more" in message
    assert "<root>/b.txt" in message and "How to obtain it: run prepare" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        require_files(tmp_path / "nope", ["a.txt"], toy)
    with pytest.raises(FileNotFoundError, match="no dataset root"):
        require_files(None, ["a.txt"], toy)
    assert require_files(tmp_path, ["a.txt"], toy) == tmp_path


def test_odd_image_formats_are_converted_to_rgb(tmp_path: Path) -> None:
    truth = make_cub(tmp_path, special=True)
    kinds = {v: k for k, v in truth.special.items()}
    assert set(kinds) == {"gray", "cmyk", "png"}
    ds = CUB200(tmp_path, "trainval")
    by_path = {r.path: i for i, r in enumerate(ds.records)}
    for kind, rel in kinds.items():
        image, label = ds[by_path[rel]]
        assert image.mode == "RGB" and image.size == (32, 24)
        if kind != "gray":  # gray loses the hue; the others keep the class colour
            assert nearest_label(image.getpixel((1, 1)), 4) == label
    with Image.open(ds.root / kinds["png"]) as raw:
        assert raw.format == "PNG"  # really a PNG behind the .jpg name


def test_truncated_image_fails_with_its_path_and_the_fixes(tmp_path: Path) -> None:
    truth = make_cub(tmp_path, special=False, truncated=True)
    (bad,) = truth.special
    ds = CUB200(tmp_path, "trainval")
    index = [r.path for r in ds.records].index(bad)
    with pytest.raises(BadImageError, match=bad.split("/")[-1]) as info:
        ds[index]
    verify = VERIFY_COMMAND.format(name="cub", root=ds.root)
    assert "set dataset.on_bad_image=skip" in str(info.value) and verify in str(info.value)


def test_an_image_in_two_official_splits_is_refused(tmp_path: Path) -> None:
    truth = make_dtd(tmp_path)
    leaked = truth.train[0][0].removeprefix("images/")
    with open(tmp_path / "dtd" / "labels" / "test1.txt", "a", encoding="utf-8") as f:
        f.write(f"{leaked}\n")
    with pytest.raises(ValueError, match=rf"dtd/images/{leaked} is listed in both train and test"):
        DTD(tmp_path, "trainval")
    assert len(DTD(tmp_path, "test", partition=2)) == len(truth.test)  # other lists are fine


def test_skip_replaces_bad_images_deterministically_and_logs(tmp_path: Path, caplog) -> None:
    truth = make_cub(tmp_path, special=False, truncated=True)
    (bad,) = truth.special
    ds = CUB200(tmp_path, "trainval", on_bad_image="skip")
    index = [r.path for r in ds.records].index(bad)
    with caplog.at_level(logging.WARNING, logger="bcnn.data.base"):
        image, label = ds[index]
        again = ds[index]
    # The next record takes its place, image and label together.
    expected = ds.records[index + 1]
    assert label == expected.label == again[1]
    assert nearest_label(image.getpixel((1, 1)), 4) == expected.label
    assert ds.num_skipped == 1
    assert sum(bad.split("/")[-1] in m for m in caplog.messages) == 1  # logged once
    # Missing files are bad images too.
    (ds.root / ds.records[index + 5].path).unlink()
    assert ds[index + 5][1] == ds.records[index + 6].label and ds.num_skipped == 2


def test_box_crop_is_clipped_to_the_image(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", 0, box=(8, 4, 24, 16))
    records = [Record("a.jpg", 0, (8, 4, 24, 16)), Record("a.jpg", 0, (-5, -5, 100, 100))]
    ds = RecordDataset(tmp_path, records, ["x"], box_crop=True)
    inner, _ = ds[0]
    assert inner.size == (16, 12)
    # Only the box is left: every pixel has the box colour, none the class colour.
    assert (abs(np.asarray(inner, dtype=int) - BOX_COLOR) < 40).all()
    assert ds[1][0].size == (32, 24)
    assert RecordDataset(tmp_path, records, ["x"])[0][0].size == (32, 24)  # off by default


def test_dataset_rejects_bad_labels_and_boxless_crops(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        RecordDataset(tmp_path, [Record("a.jpg", 3)], ["x"])
    with pytest.raises(ValueError, match="no box"):
        RecordDataset(tmp_path, [Record("a.jpg", 0)], ["x"], box_crop=True)
    with pytest.raises(ValueError, match="on_bad_image"):
        RecordDataset(tmp_path, [], ["x"], on_bad_image="ignore")


def test_write_samples_and_imagefolder_style_attributes(tmp_path: Path) -> None:
    records = [Record("a b/c.jpg", 1), Record("d.jpg", 0)]
    ds = RecordDataset(tmp_path, records, ["zero", "one"], transform=lambda im: im.size)
    ds.write_samples(tmp_path / "run" / "splits" / "train.txt")
    lines = (tmp_path / "run" / "splits" / "train.txt").read_text().splitlines()
    assert lines == ["a b/c.jpg 1", "d.jpg 0"]
    assert [tuple(line.rsplit(" ", 1)) for line in lines] == [("a b/c.jpg", "1"), ("d.jpg", "0")]
    assert ds.samples == [(str(tmp_path / "a b/c.jpg"), 1), (str(tmp_path / "d.jpg"), 0)]
    assert ds.targets == [1, 0] and len(ds) == 2
    write_image(tmp_path / "d.jpg", 0)
    assert ds[1] == ((32, 24), 0)  # the transform gets the PIL image
    assert ds[-1] == ((32, 24), 0)
    with pytest.raises(IndexError):
        ds[2]
