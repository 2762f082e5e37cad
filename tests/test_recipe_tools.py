"""The training-recipe tools, each off by default and each shown to take effect: label
smoothing, mixup and cutmix, RandAugment / TrivialAugment, a weight average (EMA),
early stopping and the top-k checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bcnn.data.transforms import build_transforms
from bcnn.engine import train
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.errors import ConfigError
from tests.conftest import compose_config

LINEAR = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
LINEAR += ["trainer.stages=[linear]"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_smoothing_and_mixing_change_the_training_loss(tmp_path: Path) -> None:
    live = [*LINEAR, "trainer.cache_features=false"]
    options = {
        "baseline": [],
        "smoothing": ["trainer.linear.label_smoothing=0.3"],
        "mixup": ["trainer.linear.mixup_alpha=1.0"],
        "cutmix": ["trainer.linear.cutmix_alpha=1.0"],
    }
    loss = {}
    for name, extra in options.items():
        train(compose_config([*live, *extra], tmp_path / name))
        loss[name] = [float(r["train_loss"]) for r in _rows(tmp_path / name)]
    for name in ("smoothing", "mixup", "cutmix"):
        assert loss[name][0] != pytest.approx(loss["baseline"][0], rel=1e-4), (name, loss)
    # Mixed images cannot come from the feature cache.
    with pytest.raises(ConfigError, match="mixes images") as err:
        overrides = [*LINEAR, "trainer.cache_features=true", "trainer.linear.mixup_alpha=1.0"]
        train(compose_config(overrides, tmp_path / "cached"))
    assert err.value.key == "trainer.cache_features"


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
def test_auto_augment_changes_training_images_only(name: str) -> None:
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    recipe = {"recipe": "square", "size": 32, "hflip": False}
    plain = build_transforms(recipe, augment=True)(image)
    changed = 0
    for seed in range(5):
        torch.manual_seed(seed)
        out = build_transforms({**recipe, "auto_augment": name}, augment=True)(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        changed += not torch.equal(out, plain)
    assert changed >= 3  # an identity op may be drawn now and then
    test_view = build_transforms({**recipe, "auto_augment": name}, augment=False)(image)
    assert torch.equal(test_view, build_transforms(recipe, augment=False)(image))
    with pytest.raises(ValueError, match="auto_augment must be one of"):
        build_transforms({**recipe, "auto_augment": "autoaugment"}, augment=True)


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_ema_is_validated_beside_the_model_and_kept_where_better(
    val_fraction: float, tmp_path: Path
) -> None:
    overrides = [*LINEAR, "trainer.linear.epochs=1", "trainer.linear.ema_decay=0.5"]
    train(compose_config([*overrides, f"dataset.val_fraction={val_fraction}"], tmp_path))
    # The epoch's checkpoint (last.pt now marks the end of the stage).
    last = load_checkpoint(tmp_path / "checkpoints" / "last.prev.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    ema = last["ema"]["module.classifier.weight"]  # the average of the cached stage's net
    (row,) = _rows(tmp_path)
    if val_fraction:
        ema_better = float(row["ema_val_acc"]) > float(row["val_acc"])
    else:
        assert "ema_val_acc" not in row  # nothing to validate on: the average is kept
        ema_better = True
    assert not torch.equal(ema, last["model"]["classifier.weight"])
    kept = ema if ema_better else last["model"]["classifier.weight"]
    assert torch.equal(best["model"]["classifier.weight"], kept)


def test_early_stopping_ends_the_stage_after_patience_epochs(tmp_path: Path) -> None:
    overrides = [*LINEAR, "trainer.linear.epochs=5", "trainer.linear.early_stop_patience=1"]
    # No epoch beats the first by 1000 points: the stage stops after one more.
    overrides.append("trainer.linear.early_stop_min_delta=1000")
    results = train(compose_config(overrides, tmp_path))
    assert [r["epoch"] for r in _rows(tmp_path)] == ["1", "2"]
    assert results["stages"]["linear"]["epochs"] == 2
    assert results["stages"]["linear"]["best_epoch"] == 1


def test_the_top_k_checkpoints_are_kept(tmp_path: Path) -> None:
    overrides = [*LINEAR, "trainer.linear.epochs=4", "trainer.save_top_k=2"]
    train(compose_config(overrides, tmp_path))
    ranked = sorted(_rows(tmp_path), key=lambda r: (-float(r["val_acc"]), int(r["epoch"])))
    expected = sorted(f"linear_epoch{int(r['epoch']):03d}.pt" for r in ranked[:2])
    top = tmp_path / "checkpoints" / "top"
    assert sorted(p.name for p in top.iterdir()) == expected
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    first = load_checkpoint(top / f"linear_epoch{int(ranked[0]['epoch']):03d}.pt")
    assert first["next_epoch"] == best["next_epoch"] == int(ranked[0]["epoch"])
    assert torch.equal(first["model"]["classifier.weight"], best["model"]["classifier.weight"])
