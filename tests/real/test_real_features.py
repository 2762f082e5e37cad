"""Real features end to end: HED's pretrained VGG-16 on texture patches of photographs
(tests/real/photos.py), trained with the recipe ``dataset=folder`` selects, at 112 px.

The heads' linear stages order as in the papers (first-order < B-CNN < Improved B-CNN), the
other heads land in a sane range, fine-tuning does not end below the linear stage it starts
from, and bcnn-viz synthesizes textures and maximal images with these weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module

from bcnn.engine import train
from bcnn.viz import visualize
from tests.conftest import compose_config
from tests.real.photos import PHOTOS

HEADS = {
    "first_order": ["pooling=avg", "normalization=l2"],
    "bcnn": ["pooling=sum", "normalization=signsqrt_l2"],
    "improved_bcnn": ["pooling=sum", "normalization=sqrt_signsqrt_l2"],
    "gamma_democratic": ["pooling=democratic", "pooling.gamma=0.5"],
    "compact": ["pooling=compact"],
    "fisher": ["pooling=fisher", "pooling.num_components=16", "pooling.num_samples=8000"],
}
# The B-CNN run fine-tunes after its linear stage (the other heads train the linear stage).
FINETUNE = ["trainer.stages=[linear,finetune]", "trainer.finetune.epochs=1"]
# The maximal images' classifier: B-CNN's linear stage trained to a near-zero training loss.
# An L2-normalized descriptor bounds each logit margin by ||w_c - w_k||, so P(c | I) of any
# image is capped by the weights' norm: the tier's 25 epochs at lr 1 leave it near 0.85 for
# cat fur even with no image prior; lr 16 for 30 epochs (on B-CNN's cached features, which
# the two runs share) lets the maximal images reach 0.996-1.0 (docs/reproduce.md).
CONVERGED = ["trainer.stages=[linear]", "trainer.linear.lr=16", "trainer.linear.epochs=30"]
STAGES = {"bcnn": FINETUNE, "bcnn_converged": CONVERGED}
HEADS["bcnn_converged"] = HEADS["bcnn"]
Train = Callable[[str], dict[str, Any]]
pytestmark = pytest.mark.real  # `make test` deselects the tier, `make test-real` runs it


@pytest.fixture(scope="session")
def train_head(vgg16_weights: Path, photos: Path, tmp_path_factory) -> Train:
    """``train_head(name)``: results.json of head ``name``'s run (trained once), plus
    ``seconds`` (wall time) and ``run_dir``."""
    done: dict[str, dict[str, Any]] = {}
    # The two B-CNN runs share their cached features (same weights, head and images).
    bcnn_cache = tmp_path_factory.mktemp("bcnn_feature_cache")

    def run(name: str) -> dict[str, Any]:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            stages = STAGES.get(name, ["trainer.stages=[linear]"])
            if name.startswith("bcnn"):
                stages = [*stages, f"trainer.cache_dir={bcnn_cache}"]
            overrides = [
                "dataset=folder",
                "recipe=small_data",
                f"dataset.root={photos}",
                "dataset.transform.recipe=square",
                "dataset.transform.size=112",
                # The patches are mirrored at random already: one cached copy per image.
                "dataset.transform.hflip=false",
                # No validation split: every run keeps its last epoch (the cosine has settled
                # it), where 20 validation images would pick among ties by chance.
                "dataset.val_fraction=0",
                "backbone=vgg_d",
                f"backbone.weights={vgg16_weights}",
                "trainer.progress=false",
                *stages,
                *HEADS[name],
            ]
            start = time.perf_counter()
            results = train(compose_config(overrides, out))
            done[name] = {**results, "seconds": time.perf_counter() - start, "run_dir": out}
        return done[name]

    return run


def linear_acc(results: dict[str, Any]) -> float:
    return results["stages"]["linear"]["test_acc"]


def test_linear_stage_orders_first_order_bcnn_improved(train_head: Train) -> None:
    acc = {name: linear_acc(train_head(name)) for name in ("first_order", "bcnn", "improved_bcnn")}
    assert acc["first_order"] < acc["bcnn"] < acc["improved_bcnn"], acc


@pytest.mark.parametrize("name", ["gamma_democratic", "compact", "fisher"])
def test_other_heads_land_in_a_sane_range(train_head: Train, name: str) -> None:
    # Well above chance (10%), near the B-CNN it varies.
    acc, bcnn = linear_acc(train_head(name)), linear_acc(train_head("bcnn"))
    assert 70 <= acc <= 100 and acc >= bcnn - 10, (name, acc, bcnn)


def test_finetuning_does_not_end_below_its_linear_stage(train_head: Train) -> None:
    results = train_head("bcnn")
    assert results["stages"]["finetune"]["test_acc"] >= linear_acc(results), results["stages"]


def compose_viz(overrides: list[str], output_dir: Path):
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("viz", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def test_texture_from_a_photograph_lowers_the_gram_loss_tenfold(
    vgg16_weights: Path, photos: Path, tmp_path: Path
) -> None:
    exemplar = photos / "test" / "cat_fur" / "000.png"
    cfg = compose_viz(
        [
            "kind=texture",
            "backbone=vgg_d",
            f"backbone.weights={vgg16_weights}",
            f"viz.texture.image={exemplar}",
            "viz.texture.size=[64,64]",
            "viz.texture.steps=20",
        ],
        tmp_path,
    )
    summary = visualize(cfg)
    assert summary["reduction"] >= 10, summary["per_scale"]


def test_inverse_images_reach_their_class(train_head: Train, tmp_path: Path) -> None:
    run = train_head("bcnn_converged")["run_dir"]
    classes = sorted(PHOTOS)[:3]
    cfg = compose_viz(
        [
            "kind=inverse",
            f"run={run}",
            f"viz.inverse.classes=[{','.join(classes)}]",
            "viz.inverse.size=[64,64]",
            "viz.inverse.steps=100",
        ],
        tmp_path,
    )
    summary = visualize(cfg)
    assert summary["min_prob"] > 0.9, summary["classes"]
