"""The published baselines' parts in a model and a run: Fisher vector pooling, SVMs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from fixtures.datasets import MAKERS
from omegaconf import OmegaConf, open_dict

from bcnn.config import validate
from bcnn.engine import train
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.engine.runs import load_trained
from bcnn.models.pooling import BilinearPool, FisherPool, locations
from bcnn.ops import fisher_vector
from tests.conftest import compose_config

FISHER_SVM = [
    "pooling=fisher",
    "pooling.num_components=4",
    "pooling.num_samples=2000",
    "backbone.channels=[16]",
    "classifier=svm",
    "classifier.loss=squared_hinge",
    "trainer.stages=[linear]",
    "dataset.trainval_size=240",
    "dataset.test_size=120",
    "trainer.progress=false",
]


def test_fisher_pool_fits_its_gmm_then_encodes_with_it() -> None:
    torch.manual_seed(0)
    pool = FisherPool(6, num_components=3, num_samples=100, samples_per_image=10, seed=1)
    maps = [torch.randn(4, 6, 5, 5) for _ in range(5)]
    with pytest.raises(RuntimeError, match="not been fitted"):
        pool(maps[0])
    info = pool.fit(iter(maps))
    assert info["samples"] == 100 and not pool.needs_fit  # 10 images x 10 locations
    assert pool.output_shape.dims == (36,)
    torch.testing.assert_close(pool(maps[0]), fisher_vector(locations(maps[0]), pool.gmm))
    # The fitted GMM travels in the state dict (checkpoints, the feature-cache key).
    clone = FisherPool(6, num_components=3)
    clone.load_state_dict(pool.state_dict())
    assert not clone.needs_fit
    torch.testing.assert_close(clone(maps[1]), pool(maps[1]))
    # Same seed, same maps: the same GMM.
    again = FisherPool(6, num_components=3, num_samples=100, samples_per_image=10, seed=1)
    again.fit(iter(maps))
    torch.testing.assert_close(again.gmm.means, pool.gmm.means)


def test_fisher_vector_and_svm_train_in_the_linear_stage(tmp_path: Path) -> None:
    results = train(compose_config(FISHER_SVM, tmp_path))
    assert torch.is_grad_enabled()  # fitting the GMM leaves no grad mode behind
    # Second-order statistics of the Fisher vector separate the built-in classes.
    assert results["test_acc"] > 80
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["train_acc"]) > 80  # one fit, not epochs
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert bool(state["model"]["pooling.fitted"])
    assert state["model"]["classifier.weight"].abs().sum() > 0
    # The reloaded model scores as the SVMs do: decision values, flip-free here.
    trained = load_trained(tmp_path)
    assert type(trained.model.classifier).__name__ == "SVMClassifier"
    assert not trained.model.pooling.needs_fit


def test_svm_needs_the_feature_cache_and_the_linear_stage_only(tmp_path: Path) -> None:
    overrides = [o for o in FISHER_SVM if not o.startswith("pooling")]
    cfg = compose_config([*overrides, "trainer.cache_features=false"], tmp_path)
    with pytest.raises(ValueError, match=r"'trainer\.cache_features'.*cached descriptors"):
        validate(cfg)
    cfg = compose_config([*overrides, "trainer.stages=[linear,finetune]"], tmp_path)
    with pytest.raises(ValueError, match=r"'trainer\.stages'.*linear stage only"):
        validate(cfg)
    # A model with another trainable layer after the backbone cannot use the cache.
    cfg = compose_config([*overrides, "pooling.proj_dim=4"], tmp_path)
    with pytest.raises(ValueError, match="feature cache"):
        train(cfg)


def test_skipped_images_are_totalled_across_workers_in_results(tmp_path: Path) -> None:
    truth = MAKERS["cub"](tmp_path / "data")
    folder = truth.root / "CUB_200_2011"
    bad = [truth.train[1][0], truth.test[0][0]]
    for rel in bad:
        (folder / rel).write_bytes(b"not an image")
    overrides = [
        "dataset=cub",
        f"dataset.root={truth.root}",
        "dataset.on_bad_image=skip",
        "dataset.transform.size=32",
        "dataset.val_fraction=0",
        "recipe=fast",
        "trainer.stages=[linear]",
        "trainer.linear.epochs=1",
        "trainer.linear.batch_size=4",
        "trainer.num_workers=2",
        "trainer.cache_features=false",
        "trainer.progress=false",
    ]
    results = train(compose_config(overrides, tmp_path / "run"))
    skipped = results["skipped_images"]
    assert skipped["count"] == 2
    assert sorted(skipped["first"]) == sorted(str(folder / rel) for rel in bad)
    on_disk = (tmp_path / "run" / "results.json").read_text()
    assert "skipped_images" in on_disk and "not an image" not in on_disk
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 unreadable images skipped" in log


def test_pca_projection_whitens_the_top_principal_directions() -> None:
    torch.manual_seed(0)
    pool = BilinearPool(6, proj_dim=3, proj_init="pca")
    assert pool.needs_fit
    maps = [torch.randn(4, 6, 5, 5) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])[:, None, None]]
    info = pool.fit(maps)
    assert not pool.needs_fit and info["images"] == 4 and 0 < info["explained"][0] <= 1
    # The authors' rule: Gram = sum over images of X^T X / n^2; W = diag(s^-1/2) U^T.
    feats = locations(maps[0]).double()
    gram = (feats.mT @ feats).sum(0) / feats.shape[1] ** 2
    projected = pool.proj[0][0].weight.double().flatten(1)  # (3, 6)
    torch.testing.assert_close(projected @ gram @ projected.T, torch.eye(3, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    values = torch.linalg.eigvalsh(gram).flip(0)
    top = torch.linalg.eigh(gram)[1].flip(1)[:, :3]  # the top directions span the rows
    torch.testing.assert_close((projected @ top).abs().sum(1), values[:3].rsqrt(), rtol=1e-4,
                               atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"set pooling\.proj_dim"):
        BilinearPool(6, proj_init="pca")
    with pytest.raises(ValueError, match=r"at most as many directions.*\(6\).*proj_dim=7"):
        BilinearPool(6, proj_dim=7, proj_init="pca")


def test_classifier_init_follows_the_config() -> None:
    from bcnn.models.classifier import LinearClassifier, LowRankBilinearClassifier, SVMClassifier
    from bcnn.models.shapes import FeatureShape

    torch.manual_seed(0)
    zeros = LinearClassifier(4096, 50)
    assert not zeros.weight.any() and not zeros.bias.any()
    matlab = LinearClassifier(4096, 50, init="normal", init_std=1e-3, init_bias=0.1)
    assert matlab.weight.std().item() == pytest.approx(1e-3, rel=0.02)
    assert torch.equal(matlab.bias, torch.full((50,), 0.1))
    fc8 = LinearClassifier(4096, 50, init="normal", init_std=0.01)
    assert fc8.weight.std().item() == pytest.approx(0.01, rel=0.02) and not fc8.bias.any()
    default = LinearClassifier(4096, 50, init="torch")  # nn.Linear's: U(+-1/sqrt(fan in))
    bound = 4096**-0.5
    assert default.weight.abs().max() <= bound and default.weight.std() > bound / 2
    assert default.bias.abs().max() <= bound and default.bias.any()
    svm = SVMClassifier(64, 3, init="normal", init_bias=0.1)  # accepted; fit() replaces it
    assert torch.equal(svm.bias, torch.full((3,), 0.1))
    shape = FeatureShape((64, 64), symmetric=True)
    own = LowRankBilinearClassifier(shape, 10)  # U ~ N(0, 1/d)
    assert own.U.std().item() == pytest.approx(64**-0.5, rel=0.05) and not own.bias.any()
    small = LowRankBilinearClassifier(shape, 10, init_std=1e-3, init_bias=0.1)
    assert small.U.std().item() == pytest.approx(1e-3, rel=0.05)
    assert torch.equal(small.bias, torch.full((10,), 0.1))
    uniform = LowRankBilinearClassifier(shape, 10, init="torch")
    assert uniform.U.abs().max() <= 64**-0.5 and uniform.bias.abs().max() <= 1 / 64


@pytest.mark.parametrize(
    ("overrides", "std", "bias"),
    [
        ([], 0.0, 0.0),  # recipe=fast: zeros
        (["recipe=bcnn_matlab"], 1e-3, 0.1),  # initializeNetworkSharedWeights.m
        (["experiment=iccv15_t1_fccnn_d"], 0.01, 0.0),  # imdb_cnn_train.m
        (["recipe=bcnn_pytorch"], None, None),  # nn.Linear's own
    ],
)
def test_each_recipe_starts_its_classifier_as_the_authors(
    overrides: list[str], std: float | None, bias: float | None
) -> None:
    from bcnn.models import build_model

    torch.manual_seed(0)
    cfg = compose_config(overrides)
    with open_dict(cfg):  # the small CNN instead of VGG-16 (the preset sets its weights)
        cfg.backbone = OmegaConf.create({"_target_": "bcnn.models.backbones.SmallCNN"})
    head = build_model(cfg, num_classes=40).classifier
    if std is None:
        assert head.weight.std() > 0 and head.weight.abs().max() <= head.in_features**-0.5
    else:
        assert head.weight.std().item() == pytest.approx(std, rel=0.05, abs=1e-12)
        assert torch.equal(head.bias, torch.full_like(head.bias, bias))
