"""Planning a config before anything is allocated: shapes, minimum input sizes, memory."""

from __future__ import annotations

import logging

import pytest
import torch

from bcnn.config import validate
from bcnn.engine import train
from bcnn.engine.trainer import _Run
from bcnn.errors import ConfigError
from bcnn.models import build_model, plan
from bcnn.models.backbones import SmallCNN
from tests.conftest import compose_config

CPU = torch.device("cpu")
GB = 10**9


@pytest.fixture
def machine_16gb(monkeypatch):
    """A machine with 16 GB of memory, whatever this one has."""
    monkeypatch.setattr(plan, "host_memory", lambda: 16 * GB)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["pooling=compact", "pooling.sketch.out_dim=512", "pooling.proj_dim=16"],
        ["backbone=timm", "backbone.name=vit_tiny_patch16_224", "normalization=sqrt_l2"],
        ["backbone=vgg_dm"],
    ],
)
def test_plan_matches_the_built_model(overrides):
    cfg = compose_config(overrides)
    size = cfg.dataset.image_size
    planned = plan.plan_model(cfg, size, 5, "dataset.image_size")
    model = build_model(cfg, 5).eval()
    with torch.no_grad():
        fmap = model.backbone(model.normalize_input(torch.zeros(1, 3, size, size)))
        desc = model.features(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    first = fmap[0] if isinstance(fmap, tuple) else fmap
    assert planned.map_shape == tuple(first.shape[1:])
    assert planned.descriptor == model.descriptor_shape
    assert (planned.descriptor.numel,) == tuple(desc.shape[1:])
    real = {
        name: sum(t.numel() * t.element_size() for t in [*part.parameters(), *part.buffers()])
        for name, part in model.named_children()
        if name in plan.MODEL_GROUPS
    }
    assert planned.weights == real
    # Every tensor of the pass counts, the input map among them.
    assert planned.activations >= planned.peak[0] >= first.numel() * 4


@pytest.mark.parametrize(
    ("overrides", "key", "least"),
    [
        (["backbone.channels=[8,8,8,8,8,8,8,8]"], "dataset.image_size", 128),
        (
            ["dataset=cub", "dataset.transform.size=64", "backbone=vgg_d_fc7", "backbone.fc_dim=8"],
            "dataset.transform.size",
            224,
        ),
    ],
)
def test_input_smaller_than_the_backbone_needs(overrides, key, least):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=rf"'{key}'.* the {least} x {least} input") as err:
        plan.check_plan(cfg, 3, CPU)
    assert f"{key}={least}" in str(err.value)


def test_the_minimum_input_size_is_the_real_one():
    cfg = compose_config(["backbone.channels=[8,8,8,8,8,8,8,8]"])
    assert plan.plan_model(cfg, 128, 3, "dataset.image_size").map_shape == (8, 1, 1)
    backbone = SmallCNN(channels=[8] * 8)
    assert backbone(torch.zeros(1, 3, 128, 128)).shape == (1, 8, 1, 1)  # seven 2x2 poolings
    with pytest.raises(RuntimeError):
        backbone(torch.zeros(1, 3, 127, 127))


RM = "bcnn.ops.RandomMaclaurin"


@pytest.mark.usefixtures("machine_16gb")
@pytest.mark.parametrize(
    ("overrides", "key", "estimate"),
    [
        # The 65536 x 65536 matrix of an image, and a 4.3e9 x 12 classifier weight.
        (["pooling.proj_dim=65536"], "pooling.proj_dim", "206.2 GB"),
        # 16.7M-wide Random Maclaurin projections of every location of the 32 x 32 map.
        (
            ["pooling=compact", f"pooling.sketch._target_={RM}", "pooling.sketch.out_dim=16777216"],
            "pooling.sketch.out_dim",
            None,
        ),
        (["dataset=cub", "dataset.transform.size=8192"], "dataset.transform.size", None),
    ],
)
def test_a_run_beyond_the_memory_is_refused(overrides, key, estimate):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=rf"'{key}': the run needs at least .* GB of host") as err:
        plan.check_plan(cfg, 12, CPU)
    assert "more than the 16.0 GB this machine has" in str(err.value)
    if estimate:
        assert estimate in str(err.value)


@pytest.mark.usefixtures("machine_16gb")
def test_usual_runs_fit_a_16gb_machine():
    for overrides in (
        [],
        ["dataset=cub", "backbone=vgg_d"],
        ["dataset=cub", "backbone=vgg_d", "pooling=compact"],
    ):
        assert plan.check_plan(compose_config(overrides), 200, CPU) is not None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dataset.image_size=4096"], "image_size"),
        (["dataset.trainval_size=10000000"], "trainval_size"),
    ],
)
def test_an_in_memory_dataset_beyond_the_memory_is_refused_by_validate(overrides, key):
    cfg = compose_config(overrides)
    validate(cfg)  # a config for another machine is not checked against this one
    with pytest.raises(ConfigError, match=rf"'dataset.{key}': .* built-in dataset \(in memory\)"):
        validate(cfg, files=True)


def test_degenerate_settings_warn_with_the_fix(caplog):
    cfg = compose_config(["backbone=timm", "backbone.name=resnet18"])
    with caplog.at_level(logging.WARNING, logger="bcnn.models.plan"):
        planned = plan.check_plan(cfg, 12, CPU)
    assert planned.map_shape == (512, 1, 1) and planned.descriptor.numel == 262_144
    one, big = (r.getMessage() for r in caplog.records)
    assert "1 x 1 at 32 px" in one and "dataset.image_size" in one
    assert "262,144 values" in big and "pooling.proj_dim" in big and "dataset.image_size" in big
    caplog.clear()
    for ok in (
        ["dataset=cub", "backbone=vgg_d"],
        ["pooling=avg", "backbone=timm", "backbone.name=resnet18"],
    ):
        with caplog.at_level(logging.WARNING, logger="bcnn.models.plan"):
            plan.check_plan(compose_config(ok), 12, CPU)
    assert caplog.records == []


def test_the_trainer_plans_before_it_builds_the_model(tmp_path, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(_Run, "_build_model", built)
    cfg = compose_config(["debug=smoke", "backbone.channels=[8,8,8,8,8,8,8,8]"], tmp_path)
    with pytest.raises(ConfigError, match=r"dataset\.image_size=128"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
