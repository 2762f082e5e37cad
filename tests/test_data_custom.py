"""Your own data: dataset=folder and dataset=csv against tiny fixtures."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures.datasets import (
    CONFIGS,
    OWN_CLASSES,
    OWN_MAKERS,
    PALETTE,
    make_csv,
    make_folder,
    nearest_label,
    write_image,
    write_lines,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bcnn.data.custom import CSVDataset, FolderDataset


def pairs(ds) -> list[tuple[str, int]]:
    return sorted((r.path, r.label) for r in ds.records)


def splits(cls, root: Path, **options) -> dict:
    return {s: cls(root, s, **options) for s in ("train", "val", "trainval", "test")}


def assert_pixels_match_labels(ds) -> None:
    for i, record in enumerate(ds.records):
        image, label = ds[i]
        assert nearest_label(image.getpixel((1, 1)), len(PALETTE)) == label == record.label


# ---------------------------------------------------------------------------- folder
def test_folder_with_split_folders(tmp_path: Path) -> None:
    truth = make_folder(tmp_path, "split")
    parts = splits(FolderDataset, tmp_path)
    assert parts["train"].classes == OWN_CLASSES == parts["test"].classes  # sorted names
    assert pairs(parts["train"]) == sorted(truth.train)  # nested and .PNG in, junk out
    assert pairs(parts["val"]) == sorted(truth.val)
    assert pairs(parts["test"]) == sorted(truth.test)
    assert pairs(parts["trainval"]) == sorted(truth.train + truth.val)
    assert len(parts["train"]) == 15 and parts["test"].name == "folder"
    assert_pixels_match_labels(parts["trainval"])
    assert_pixels_match_labels(parts["test"])


def test_folder_single_tree_is_split_by_seeded_stratified_fractions(tmp_path: Path) -> None:
    truth = make_folder(tmp_path, "tree", per_class=(6, 2, 2))  # 10 images per class
    parts = splits(FolderDataset, tmp_path, test_fraction=0.2, val_fraction=0.25)
    test, trainval = pairs(parts["test"]), pairs(parts["trainval"])
    assert sorted(test + trainval) == sorted(truth.train) and not set(test) & set(trainval)
    assert Counter(label for _, label in test) == {0: 2, 1: 2, 2: 2}
    assert Counter(label for _, label in pairs(parts["val"])) == {0: 2, 1: 2, 2: 2}  # of 8
    assert sorted(pairs(parts["train"]) + pairs(parts["val"])) == trainval
    assert pairs(FolderDataset(tmp_path, "test", test_fraction=0.2)) == test  # deterministic
    other = pairs(FolderDataset(tmp_path, "test", test_fraction=0.2, split_seed=1))
    assert other != test and len(other) == len(test)
    assert_pixels_match_labels(parts["test"])


def test_folder_without_test_or_val_folders_carves_them(tmp_path: Path) -> None:
    truth = make_folder(tmp_path, "split")
    shutil.rmtree(tmp_path / "test")
    parts = splits(FolderDataset, tmp_path)
    assert pairs(parts["val"]) == sorted(truth.val)  # official val kept
    assert sorted(pairs(parts["test"]) + pairs(parts["train"])) == sorted(truth.train)
    shutil.rmtree(tmp_path / "val")
    carved = FolderDataset(tmp_path, "val", val_fraction=0.25)
    assert len(carved) == 3 and set(pairs(carved)) <= set(truth.train)


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    make_folder(tmp_path, "split")
    (tmp_path / "train" / "heron").mkdir()
    (tmp_path / "train" / "heron" / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match=r"train/heron holds no images"):
        FolderDataset(tmp_path, "train")
    shutil.rmtree(tmp_path / "train" / "heron")
    write_image(tmp_path / "test" / "heron" / "h.jpg", 0)
    with pytest.raises(ValueError, match=r"test/heron is not a class of .*train"):
        FolderDataset(tmp_path, "train")
    shutil.rmtree(tmp_path / "train")
    with pytest.raises(ValueError, match="no train/ folder"):
        FolderDataset(tmp_path, "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no class folders"):
        FolderDataset(empty, "train")
    with pytest.raises(FileNotFoundError, match=r"absent does not exist[\s\S]*train/<class>"):
        FolderDataset(tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match="no dataset root"):
        FolderDataset(None, "train")
    with pytest.raises(ValueError, match="test_fraction"):
        FolderDataset(tmp_path, "train", test_fraction=1.0)
    with pytest.raises(ValueError, match="no object boxes"):
        FolderDataset(tmp_path, "train", bbox_crop=True)


def test_folder_bad_images_follow_the_policy(tmp_path: Path) -> None:
    make_folder(tmp_path, "split")
    broken = tmp_path / "train" / "crow" / "img_00.jpg"
    broken.write_bytes(broken.read_bytes()[:60])
    ds = FolderDataset(tmp_path, "trainval", on_bad_image="skip")
    index = [r.path for r in ds.records].index("train/crow/img_00.jpg")
    assert ds[index][1] == 1 and ds.skipped() == [str(broken)]
    with pytest.raises(OSError, match=r"img_00\.jpg"):
        FolderDataset(tmp_path, "trainval")[index]


def test_folder_lists_each_file_once_through_a_link_loop(tmp_path: Path) -> None:
    truth = make_folder(tmp_path, "tree", per_class=(6, 2, 2))
    os.symlink(".", tmp_path / "crow" / "again")  # crow/again/again/... without end
    os.symlink(tmp_path / "crow" / "img_03.jpg", tmp_path / "crow" / "twin.jpg")
    parts = splits(FolderDataset, tmp_path)
    listed = pairs(parts["trainval"]) + pairs(parts["test"])
    assert sorted(listed) == sorted(truth.train)  # 30 files, each once; no link path
    assert not set(pairs(parts["test"])) & set(pairs(parts["trainval"]))


def test_folder_refuses_a_file_in_two_classes_or_splits(tmp_path: Path) -> None:
    make_folder(tmp_path, "split")
    os.symlink(tmp_path / "train" / "crow", tmp_path / "train" / "barn owl" / "crows")
    with pytest.raises(ValueError, match=r"train/crow/img_00\.jpg is the same file as .*crows"):
        FolderDataset(tmp_path, "train")
    os.unlink(tmp_path / "train" / "barn owl" / "crows")
    test_image = tmp_path / "test" / "crow" / "img_07.jpg"
    test_image.unlink()
    os.link(tmp_path / "train" / "crow" / "img_00.jpg", test_image)  # a hard link
    with pytest.raises(ValueError, match=r"test/crow/img_07\.jpg is the same file as"):
        FolderDataset(tmp_path, "test")


def test_folder_says_once_that_test_is_carved(tmp_path: Path, caplog) -> None:
    make_folder(tmp_path, "tree")
    with caplog.at_level(logging.INFO, logger="bcnn.data.custom"):
        for split in ("train", "val", "test", "train"):  # what a training run builds
            FolderDataset(tmp_path, split)
    assert sum("has no test set" in m for m in caplog.messages) == 1


# ---------------------------------------------------------------------------- csv
@pytest.mark.parametrize("header", [True, False])
def test_csv_lists_with_and_without_header(tmp_path: Path, header: bool) -> None:
    truth = make_csv(tmp_path, header=header)
    parts = splits(CSVDataset, tmp_path)
    assert parts["train"].classes == OWN_CLASSES
    assert pairs(parts["test"]) == sorted(truth.test)
    assert pairs(parts["trainval"]) == sorted(truth.train)  # no val.csv: carved from train
    assert sorted(pairs(parts["train"]) + pairs(parts["val"])) == sorted(truth.train)
    assert len(parts["val"]) == 3 and parts["val"].name == "csv"
    assert_pixels_match_labels(parts["test"])
    parts["test"].write_samples(tmp_path / "run" / "test.txt")
    lines = (tmp_path / "run" / "test.txt").read_text().splitlines()
    assert sorted(tuple(line.rsplit(" ", 1)) for line in lines) == sorted(
        (p, str(label)) for p, label in truth.test
    )


def test_csv_labels_paths_and_class_order(tmp_path: Path) -> None:
    images = tmp_path / "pictures"
    rows = []
    for k, label in enumerate(["10", "2", "0", "2", "10", "0", "10", "2", "0"]):
        write_image(images / f"{k}.jpg", int(label) % len(PALETTE))
        rows.append(f"{k}.jpg,{label}")
    lists = tmp_path / "lists"
    write_lines(lists / "train.csv", rows[:6])
    write_lines(lists / "val.csv", [f"{images / '6.jpg'},10"])  # an absolute path
    write_lines(lists / "test.csv", rows[7:])
    files = {f"{s}_csv": f"lists/{s}.csv" for s in ("train", "val", "test")}
    ds = CSVDataset(tmp_path, "train", image_root="pictures", **files)
    assert ds.classes == ["0", "2", "10"]  # integers sort numerically
    assert [r.label for r in ds.records] == [2, 1, 0, 1, 2, 0]
    assert ds.records[0].path == "pictures/0.jpg" and ds[0][1] == 2
    val = CSVDataset(tmp_path, "val", image_root=str(images), **files)
    assert val.records[0].path == str(images / "6.jpg") and len(val) == 1
    named = CSVDataset(
        tmp_path, "train", image_root="pictures", classes=["10", "2", "0", "5"], **files
    )
    assert named.classes == ["10", "2", "0", "5"] and named.targets == [0, 1, 2, 1, 0, 2]
    # Without image_root, paths are relative to each CSV's own folder.
    write_lines(lists / "local.csv", [f"../pictures/{row}" for row in rows[:6]])
    write_lines(lists / "local_test.csv", [f"../pictures/{row}" for row in rows[6:]])
    local = CSVDataset(
        tmp_path, "test", train_csv="lists/local.csv", test_csv="lists/local_test.csv"
    )
    assert local.records[1].path == "pictures/7.jpg" and local[1][1] == 1


def test_csv_errors_name_the_file_line_and_value(tmp_path: Path) -> None:
    make_csv(tmp_path)
    test_csv = tmp_path / "test.csv"
    original = test_csv.read_text()
    test_csv.write_text(original + '"heron",images/crow/test_00.jpg\n')
    with pytest.raises(ValueError, match=r"test\.csv line 8: label 'heron' is not a class"):
        CSVDataset(tmp_path, "train")
    test_csv.write_text(original + '"crow",images/crow/gone.jpg\n')
    with pytest.raises(FileNotFoundError, match=r"test\.csv line 8: .*images/crow/gone\.jpg"):
        CSVDataset(tmp_path, "train")
    skipping = CSVDataset(tmp_path, "test", on_bad_image="skip")  # listed, then skipped
    assert skipping[len(skipping) - 1][1] == 0  # wraps around to the first image
    assert skipping.skipped() == [str(tmp_path / "images" / "crow" / "gone.jpg")]
    test_csv.write_text(original + "only-a-path.jpg\n")
    with pytest.raises(ValueError, match="line 8: expected a path and a label"):
        CSVDataset(tmp_path, "train")
    test_csv.write_text(original)
    with pytest.raises(ValueError, match=r"not a class \(classes, from dataset.classes"):
        CSVDataset(tmp_path, "train", classes=["crow"])
    with pytest.raises(FileNotFoundError, match=r"missing .*nope\.csv[\s\S]*path,label"):
        CSVDataset(tmp_path, "train", train_csv="nope.csv")


def test_an_image_in_two_csv_splits_is_refused(tmp_path: Path) -> None:
    make_csv(tmp_path)
    train_row = (tmp_path / "train.csv").read_text().splitlines()[1]
    with open(tmp_path / "test.csv", "a", encoding="utf-8") as f:
        f.write(f"{train_row}\n")
    image = train_row.split(",")[1].strip('"')
    with pytest.raises(ValueError, match=rf"{image} is listed in both train and test"):
        CSVDataset(tmp_path, "train")


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(OWN_MAKERS))
def test_configs_build_with_a_root_and_require_one(tmp_path: Path, name: str) -> None:
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.pop("defaults", None)  # Hydra's defaults list (the recipe), not an argument
    assert OmegaConf.is_missing(cfg, "root") and cfg.name == name
    assert cfg.transform.recipe == "short_side" and cfg.transform.size == 448
    truth = OWN_MAKERS[name](tmp_path)
    cfg.root = str(truth.root)
    cfg.transform.size = 32
    ds = instantiate(cfg, split="train", augment=True, _convert_="all")
    image, label = ds[0]
    assert tuple(image.shape) == (3, 32, 32) and image.dtype == torch.uint8
    assert ds.classes == OWN_CLASSES and 0 <= label < 3
