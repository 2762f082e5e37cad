"""The eight dataset loaders against miniature copies of their real on-disk formats."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.datasets import (
    AIRCRAFT_SIZE,
    BANNER_COLOR,
    BOX_COLOR,
    MAKERS,
    PALETTE,
    Truth,
    build,
    make_aircraft,
    make_cars,
    make_cub,
    make_dtd,
    make_fmd,
    make_inat,
    make_mit_indoor,
    make_nabirds,
    nearest_label,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"


def pairs(ds) -> list[tuple[str, int]]:
    return sorted((r.path, r.label) for r in ds.records)


def splits(name: str, root: Path, **options) -> dict:
    return {
        s: build(name, root=str(root), split=s, **options)
        for s in ("train", "val", "trainval", "test")
    }


def assert_pixels_match_labels(ds, skip: dict[str, str] | None = None) -> None:
    """Each fixture image is painted in its class colour: the loader paired them right."""
    for i, record in enumerate(ds.records):
        if skip and skip.get(record.path) == "gray":
            continue
        image, label = ds[i]
        assert nearest_label(image.getpixel((1, 1)), len(PALETTE)) == label == record.label, (
            record.path
        )


def assert_carved(parts: dict, truth_train: list[tuple[str, int]]) -> None:
    """train/val carved from the official train set: disjoint, complete, every class in val."""
    train, val, trainval = pairs(parts["train"]), pairs(parts["val"]), pairs(parts["trainval"])
    assert trainval == sorted(truth_train)
    assert not set(train) & set(val)
    assert sorted(train + val) == trainval
    assert set(Counter(label for _, label in val)) == {label for _, label in truth_train}


def assert_only_box(image) -> None:
    assert (abs(np.asarray(image, dtype=int) - BOX_COLOR) < 40).all()


# ---------------------------------------------------------------------------- CUB
def test_cub_splits_labels_and_classes(tmp_path: Path) -> None:
    truth = make_cub(tmp_path)
    parts = splits("cub", tmp_path)
    assert parts["test"].classes == truth.classes == parts["train"].classes
    assert pairs(parts["test"]) == sorted(truth.test)
    assert_carved(parts, truth.train)
    assert len(parts["val"]) == 4  # round(0.1 * 5) -> at least one per class
    assert_pixels_match_labels(parts["trainval"], truth.special)
    assert_pixels_match_labels(parts["test"])
    # Same split from another instance; val_fraction=0 leaves val empty.
    assert pairs(build("cub", root=str(tmp_path), split="val")) == pairs(parts["val"])
    assert len(build("cub", root=str(tmp_path), split="val", val_fraction=0.0)) == 0
    # The root may also be the extracted folder itself.
    inner = build("cub", root=str(tmp_path / "CUB_200_2011"), split="test")
    assert pairs(inner) == pairs(parts["test"])


def test_cub_bbox_crop(tmp_path: Path) -> None:
    truth = make_cub(tmp_path, special=False)
    ds = build("cub", root=str(tmp_path), split="test", bbox_crop=True)
    for i, record in enumerate(ds.records):
        image, _ = ds[i]
        x1, y1, x2, y2 = truth.boxes[record.path]
        assert image.size == (x2 - x1, y2 - y1)
        assert_only_box(image)


# ---------------------------------------------------------------------------- Aircraft
@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
def test_aircraft_official_splits_and_levels(tmp_path: Path, level: str) -> None:
    truth = make_aircraft(tmp_path)
    parts = splits("aircraft", tmp_path, level=level)
    classes = truth.extra["classes"][level]
    assert parts["train"].classes == classes  # file order, not sorted
    for split, official in (("train", truth.train), ("val", truth.val), ("test", truth.test)):
        expected = sorted((rel, truth.extra["labels"][rel][level]) for rel, _ in official)
        assert pairs(parts[split]) == expected
    assert pairs(parts["trainval"]) == sorted(pairs(parts["train"]) + pairs(parts["val"]))
    if level == "variant":
        assert classes != sorted(classes) and "F/A-18" in classes
        assert_pixels_match_labels(parts["trainval"])


def test_aircraft_banner_crop(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    width, height = AIRCRAFT_SIZE
    cropped, label = build("aircraft", root=str(tmp_path), split="test")[0]
    assert cropped.size == (width, height - 20)
    assert (
        nearest_label(cropped.getpixel((1, height - 21)), len(PALETTE)) == label
    )  # no banner left
    kept, _ = build("aircraft", root=str(tmp_path), split="test", crop_banner=False)[0]
    assert kept.size == (width, height)
    assert all(c < 40 for c in kept.getpixel((1, height - 1))) and BANNER_COLOR == (0, 0, 0)
    other, _ = build("aircraft", root=str(tmp_path), split="test", banner_height=10)[0]
    assert other.size == (width, height - 10)


def test_aircraft_bbox_crop_and_data_root(tmp_path: Path) -> None:
    truth = make_aircraft(tmp_path)
    ds = build(
        "aircraft", root=str(tmp_path / "fgvc-aircraft-2013b" / "data"), split="val", bbox_crop=True
    )
    for i, record in enumerate(ds.records):
        image, _ = ds[i]
        x1, y1, x2, y2 = truth.boxes[record.path]
        assert image.size == (x2 - x1, y2 - y1)
        assert_only_box(image)
    with pytest.raises(ValueError, match="level"):
        build("aircraft", root=str(tmp_path), split="train", level="model")


# ---------------------------------------------------------------------------- Cars
@pytest.mark.parametrize(
    ("layout", "where"),
    [("devkit", "root"), ("devkit", "devkit"), ("car_ims", "")],
    ids=["devkit-root", "devkit-devkit", "car_ims"],
)
def test_cars_layouts(tmp_path: Path, layout: str, where: str) -> None:
    truth = make_cars(tmp_path, layout=layout, test_labels_in=where)
    parts = splits("cars", tmp_path)
    assert parts["test"].layout == layout
    assert parts["test"].classes == truth.classes
    assert pairs(parts["test"]) == sorted(truth.test)
    assert_carved(parts, truth.train)
    assert_pixels_match_labels(parts["trainval"])
    cropped = build("cars", root=str(tmp_path), split="test", bbox_crop=True)
    for i, record in enumerate(cropped.records):
        x1, y1, x2, y2 = truth.boxes[record.path]
        image, _ = cropped[i]
        assert image.size == (x2 - x1, y2 - y1)
        assert_only_box(image)


def test_cars_kaggle_nesting_and_missing_test_labels(tmp_path: Path) -> None:
    truth = make_cars(tmp_path, test_labels_in="none")
    with pytest.raises(FileNotFoundError, match=r"cars_test_annos_withlabels\.mat") as info:
        build("cars", root=str(tmp_path), split="test")
    assert "car_ims" in str(info.value)  # the message shows both layouts
    make_cars(tmp_path, test_labels_in="root")
    for split in ("train", "test"):
        flat = tmp_path / f"cars_{split}"
        shutil.move(flat, tmp_path / "tmp")
        flat.mkdir()
        shutil.move(tmp_path / "tmp", flat / f"cars_{split}")
    ds = build("cars", root=str(tmp_path), split="test")
    assert pairs(ds) == sorted(
        (p.replace("cars_test/", "cars_test/cars_test/"), label) for p, label in truth.test
    )
    assert_pixels_match_labels(ds)


# ---------------------------------------------------------------------------- NABirds
def test_nabirds_sparse_ids_hierarchy_and_boxes(tmp_path: Path) -> None:
    truth = make_nabirds(tmp_path)
    parts = splits("nabirds", tmp_path)
    ds = parts["test"]
    assert ds.class_ids == [46, 295, 817, 1000] == truth.extra["class_ids"]  # numeric order
    assert ds.classes == truth.classes
    assert pairs(ds) == sorted(truth.test)
    assert_carved(parts, truth.train)
    assert_pixels_match_labels(parts["trainval"])
    assert ds.hierarchy == truth.extra["parents"]
    assert ds.node_names[2] == "Ducks, Geese, and Swans"
    assert ds.ancestors(ds.class_ids.index(817)) == [1, 0]
    boxed = build("nabirds", root=str(tmp_path / "nabirds"), split="test", bbox_crop=True)
    for i, record in enumerate(boxed.records):
        x1, y1, x2, y2 = truth.boxes[record.path]
        assert boxed[i][0].size == (x2 - x1, y2 - y1)
        assert_only_box(boxed[i][0])


# ---------------------------------------------------------------------------- iNaturalist
@pytest.mark.parametrize("version", [2017, 2018, 2021])
def test_inat_joins_on_image_id(tmp_path: Path, version: int) -> None:
    truth = make_inat(tmp_path, version)
    train_json = {2017: "train2017.json", 2018: "train2018.json", 2021: "train.json"}[version]
    data = json.loads((tmp_path / str(version) / train_json).read_text())
    # The fixture is only a test of the join if position order disagrees with it.
    assert [a["image_id"] for a in data["annotations"]] != [i["id"] for i in data["images"]]
    parts = splits("inat", tmp_path, version=version)
    assert parts["test"].classes == truth.classes  # real names, also for obfuscated 2018
    assert pairs(parts["test"]) == sorted(truth.test)  # test = the official val JSON
    assert_carved(parts, truth.train)
    assert_pixels_match_labels(parts["trainval"])
    assert_pixels_match_labels(parts["test"])


@pytest.mark.parametrize(
    ("version", "name"), [(2017, "Aves"), (2018, "Aves"), (2021, "Birds"), (2021, "Aves")]
)
def test_inat_supercategory_is_reindexed_in_list_order(
    tmp_path: Path, version: int, name: str
) -> None:
    truth = make_inat(tmp_path, version)
    ds = build("inat", root=str(tmp_path), split="trainval", version=version, supercategory=name)
    assert ds.category_ids == [1, 4]
    assert ds.classes == ["Turdus migratorius", "Corvus corax"]
    expected = sorted((p, {1: 0, 4: 1}[c]) for p, c in truth.train if c in (1, 4))
    assert pairs(ds) == expected
    test = build("inat", root=str(tmp_path), split="test", version=version, supercategory=name)
    assert {label for _, label in pairs(test)} == {0, 1} and len(test) == 4
    for i, record in enumerate(ds.records):  # label 0/1 but painted with the colour of id 1/4
        assert (
            nearest_label(ds[i][0].getpixel((1, 1)), len(PALETTE)) == ds.category_ids[record.label]
        )


def test_inat_options_and_errors(tmp_path: Path) -> None:
    make_inat(tmp_path, 2021, mini=True)
    mini = build("inat", root=str(tmp_path / "2021"), split="trainval", version=2021, mini=True)
    assert len(mini) == 20 and all(r.path.startswith("train_mini/") for r in mini.records)
    assert mini.categories[0]["common_name"] == "Common concolor"
    with pytest.raises(ValueError, match="present: \\['Birds', 'Insects', 'Plants'\\]"):
        build("inat", root=str(tmp_path), split="test", version=2021, supercategory="Fungi")
    with pytest.raises(ValueError, match="mini"):
        build("inat", root=str(tmp_path), split="test", version=2018, mini=True)
    with pytest.raises(ValueError, match="version"):
        build("inat", root=str(tmp_path), split="test", version=2019)
    val = tmp_path / "2021" / "val.json"
    data = json.loads(val.read_text())
    del data["annotations"]
    val.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no annotations"):
        build("inat", root=str(tmp_path), split="test", version=2021)


# ---------------------------------------------------------------------------- DTD
@pytest.mark.parametrize("partition", [1, 7])
def test_dtd_partitions(tmp_path: Path, partition: int) -> None:
    truth = make_dtd(tmp_path)
    official = truth.extra["partitions"][partition]
    parts = splits("dtd", tmp_path, partition=partition)
    assert parts["train"].classes == sorted(truth.classes)
    for split in ("train", "val", "test"):
        assert pairs(parts[split]) == sorted(official[split])
    assert pairs(parts["trainval"]) == sorted(official["train"] + official["val"])
    assert_pixels_match_labels(parts["test"])
    with pytest.raises(ValueError, match="partition"):
        build("dtd", root=str(tmp_path), split="test", partition=11)


# ---------------------------------------------------------------------------- FMD
def test_fmd_seeded_per_class_halves(tmp_path: Path) -> None:
    truth = make_fmd(tmp_path)
    parts = splits("fmd", tmp_path, trial=1)
    trainval, test = pairs(parts["trainval"]), pairs(parts["test"])
    assert parts["test"].classes == truth.classes
    assert sorted(trainval + test) == sorted(truth.extra["images"])  # junk files ignored
    assert not set(trainval) & set(test)
    assert (
        Counter(label for _, label in trainval)
        == Counter(label for _, label in test)
        == {0: 3, 1: 3, 2: 3}
    )
    assert_carved(parts, trainval)
    assert_pixels_match_labels(parts["test"])
    assert pairs(build("fmd", root=str(tmp_path), split="test", trial=1)) == test
    other = [pairs(build("fmd", root=str(tmp_path), split="test", trial=t)) for t in (2, 3)]
    assert test not in other
    quarter = build("fmd", root=str(tmp_path), split="trainval", train_fraction=2 / 3)
    assert Counter(quarter.targets) == {0: 4, 1: 4, 2: 4}


# ---------------------------------------------------------------------------- MIT Indoor
def test_mit_indoor_lists(tmp_path: Path) -> None:
    truth = make_mit_indoor(tmp_path)
    parts = splits("mit_indoor", tmp_path)
    assert parts["test"].classes == truth.classes == ["bakery", "church_inside", "stairscase"]
    assert pairs(parts["test"]) == sorted(truth.test)
    assert_carved(parts, truth.train)
    on_disk = sum(1 for _ in (tmp_path / "Images").rglob("*.jpg"))
    assert on_disk > len(parts["trainval"]) + len(parts["test"])  # unlisted images ignored
    assert_pixels_match_labels(parts["trainval"])


def test_mit_indoor_kaggle_layout(tmp_path: Path) -> None:
    truth = make_mit_indoor(tmp_path)
    (tmp_path / "indoorCVPR_09").mkdir()
    shutil.move(tmp_path / "Images", tmp_path / "indoorCVPR_09" / "Images")
    ds = build("mit_indoor", root=str(tmp_path), split="test")
    assert pairs(ds) == sorted((f"indoorCVPR_09/{p}", label) for p, label in truth.test)
    assert_pixels_match_labels(ds)


# ---------------------------------------------------------------------------- all datasets
# A file each loader needs, relative to the fixture root, and the split that reads it.
KEY_FILES = {
    "cub": ("CUB_200_2011/train_test_split.txt", "train"),
    "aircraft": ("fgvc-aircraft-2013b/data/images_variant_val.txt", "train"),
    "cars": ("devkit/cars_train_annos.mat", "train"),
    "nabirds": ("nabirds/hierarchy.txt", "train"),
    "inat": ("2018/val2018.json", "test"),
    "dtd": ("dtd/labels/test1.txt", "train"),
    "fmd": ("image", "train"),
    "mit_indoor": ("TestImages.txt", "train"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_missing_files_raise_one_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build(name, root=str(tmp_path / "absent"), split="train")
    message = str(info.value)
    assert str(tmp_path / "absent") in message and "Expected layout" in message
    assert "How to obtain" in message and "bcnn-prepare-data" in message
    with pytest.raises(FileNotFoundError, match="no dataset root"):
        build(name, root=None, split="train")

    MAKERS[name](tmp_path / "data")
    relpath, split = KEY_FILES[name]
    target = tmp_path / "data" / relpath
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError) as info:
        build(name, root=str(tmp_path / "data"), split=split)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_config_keys_are_constructor_arguments(tmp_path: Path, name: str) -> None:
    """Every key of configs/dataset/<name>.yaml is accepted, and its transform builds."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.pop("defaults", None)  # Hydra's defaults list (the recipe), not an argument
    assert cfg.name == name and cfg._target_.startswith(f"bcnn.data.{name}.")
    assert OmegaConf.to_container(cfg)["root"] == f"${{paths.data_dir}}/{name}"
    truth: Truth = MAKERS[name](tmp_path)
    cfg.root = str(truth.root)
    cfg.transform.size = 32
    ds = instantiate(cfg, split="train", augment=True, _convert_="all")
    image, label = ds[0]
    assert tuple(image.shape) == (3, 32, 32) and image.dtype == torch.uint8
    assert 0 <= label < len(ds.classes)
