"""Every preset against the protocol table; recipes; training on trainval; per-group settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.datasets import MAKERS
from omegaconf import OmegaConf, open_dict

from bcnn.engine import train
from bcnn.reproduce.optim import with_groups
from bcnn.reproduce.protocols import (
    COLUMNS,
    FIELDS,
    differences,
    load_protocols,
    protocol_markdown,
    protocol_of,
)
from tests.conftest import CONFIG_DIR, REPO_ROOT, compose_config, run_train

BASES = {"repro_matlab", "repro_pytorch", "eccv18_t1_base"}
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem not in BASES)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_to_its_protocol_table(preset: str) -> None:
    # Field by field, what `train.py experiment=<preset> dataset=<its dataset>` composes
    # to equals bcnn/resources/protocols.csv (regenerate nothing: edit both on purpose).
    assert differences(preset) == []


def test_protocol_table_is_complete_and_sourced() -> None:
    df = load_protocols()
    assert tuple(df.columns) == COLUMNS
    assert sorted(set(df["preset"])) == PRESETS
    assert set(df["field"]) <= set(FIELDS)
    assert (df["source"].str.len() > 10).all()  # every value says where it comes from
    assert not df.duplicated(["preset", "field"]).any()
    required = {"input", "train_augment", "test_view", "training_split", "epoch_selection"}
    for preset, rows in df.groupby("preset"):
        fields = set(rows["field"])
        assert required | {"stages", "classifier", "recipe"} <= fields, preset
        classifier = rows.loc[rows["field"] == "classifier", "value"].iloc[0]
        svm = classifier.startswith("SVMClassifier")
        for stage in rows.loc[rows["field"] == "stages", "value"].iloc[0].split(", "):
            need = {f"{stage}.{f}" for f in ("optimizer", "lr", "epochs", "batch")}
            if stage == "linear" and svm:  # fitted on the cache: no optimizer, no epochs
                assert not {f for f in fields if f.startswith("linear.")}, preset
                assert "C 1" in classifier, preset  # the papers' cost
            else:
                assert need <= fields, (preset, stage)
        model = rows.loc[rows["field"] == "model", "value"].iloc[0]
        if any(f"| {step}," in model for step in ("sqrt", "log", "mpow")):
            assert {"matrix.function", "matrix.train", "matrix.test"} <= fields, preset


def test_docs_protocol_page_is_the_table() -> None:
    page = (REPO_ROOT / "docs" / "protocols.md").read_text()
    assert page == protocol_markdown(), "run: python -m bcnn.reproduce.protocols --markdown"


def test_recipes_for_real_and_built_in_data() -> None:
    # A real dataset without an experiment trains with the authors' published recipe
    # (cvl-umass/bilinear-cnn train.py); the built-in dataset keeps its fast settings.
    real = compose_config(["dataset=cub", "backbone=vgg_d"])
    fast = compose_config([])
    t = real.trainer
    assert (t.linear.lr, t.linear.epochs, t.linear.batch_size * t.linear.grad_accum) == (
        16.0,
        25,
        256,
    )
    assert t.finetune.optimizer._target_ == "bcnn.engine.optim.Adam"
    assert list(t.finetune.optimizer.betas) == [0.99, 0.999]
    assert (t.finetune.lr, t.finetune.backbone_lr, t.finetune.epochs) == (1e-2, 1e-4, 45)
    assert real.dataset.val_fraction == 0.1  # new work: held-out validation, best epoch
    assert (fast.trainer.linear.lr, fast.trainer.finetune.epochs) == (10.0, 5)
    # The command line chooses over the dataset's recipe.
    assert compose_config(["dataset=cub", "recipe=fast"]).trainer.linear.lr == 10.0


def test_cfg_job_shows_the_sources_values() -> None:
    proc = run_train(
        ["experiment=bmvc17_t2_improved_vgg_d", "dataset=aircraft", "--cfg", "job"], timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    sqrt = cfg.normalization.sqrt
    assert (sqrt.method, sqrt.backward, sqrt.eval_method, sqrt.eval_iters) == (
        "svd",
        "lyapunov_eig",
        "newton_schulz",
        5,
    )
    assert (cfg.dataset.name, cfg.dataset.val_fraction, cfg.dataset.crop_banner) == (
        "aircraft",
        0.0,
        False,
    )
    ft = cfg.trainer.finetune
    assert (ft.lr, ft.backbone_lr, ft.epochs, ft.optimizer.weight_decay) == (1.0, 1e-3, 40, 5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aircraft", "dtd"])
def test_reproduction_preset_trains_on_trainval_and_keeps_the_last_epoch(
    tmp_path: Path, name: str
) -> None:
    truth = MAKERS[name](tmp_path / "data")
    cfg = compose_config(
        [
            "experiment=iccv15_t1_bcnn_dd",
            f"dataset={name}",
            f"dataset.root={truth.root}",
            "dataset.transform.size=32",
            "debug=smoke",
            "trainer.stages=[linear]",
            "trainer.device=cpu",
        ],
        output_dir=tmp_path / "run",
    )
    with open_dict(cfg):  # the small CNN instead of VGG-16 (the preset sets its weights)
        cfg.backbone = OmegaConf.create({"_target_": "bcnn.models.backbones.SmallCNN"})
    assert protocol_of(cfg)["training_split"] == "trainval"
    results = train(cfg)
    splits = tmp_path / "run" / "splits"
    trained = sorted(
        line.rsplit(" ", 1)[0] for line in (splits / "trainval.txt").read_text().splitlines()
    )
    assert trained == sorted(p for p, *_ in truth.train + truth.val)  # official train + val
    assert not (splits / "val.txt").exists() and not (splits / "train.txt").exists()
    stage = results["stages"]["linear"]
    assert stage["best_epoch"] == stage["epochs"] and results["val_acc"] is None


def test_with_groups_sets_per_group_values() -> None:
    w = [torch.zeros(2, requires_grad=True) for _ in range(3)]
    groups = [
        {"params": [w[0]], "lr": 1e-3, "name": "backbone"},
        {"params": [w[1]], "lr": 1.0, "name": "proj"},
        {"params": [w[2]], "lr": 1.0, "name": "head"},
    ]
    opt = with_groups(
        groups,
        lr=1.0,
        optimizer="torch.optim.SGD",
        momentum=0.9,
        weight_decay=5e-4,
        groups={"head": {"weight_decay": 0.0}, "proj": {"lr": 1e-3}},
    )
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 5e-4
    assert (by_name["proj"]["lr"], by_name["backbone"]["lr"], by_name["head"]["lr"]) == (
        1e-3,
        1e-3,
        1.0,
    )
    assert by_name["head"]["momentum"] == 0.9
    # The decay of the head really is zero: one step on a zero gradient leaves it alone.
    for p in w:
        p.data.fill_(1.0)
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(w[2], torch.ones(2)) and (w[0] < 1).all()
    with pytest.raises(ValueError, match="unknown group"):
        with_groups(groups, lr=1.0, optimizer="torch.optim.SGD", groups={"fc": {"lr": 1.0}})
    with pytest.raises(ValueError, match=r"groups\.head sets \['betas'\]"):
        with_groups(groups, lr=1.0, optimizer="torch.optim.SGD", groups={"head": {"betas": 1}})
    with pytest.raises(ValueError, match="not a torch optimizer"):
        with_groups(groups, lr=1.0, optimizer="torch.nn.Linear")


def test_densenet_projection_rate_in_both_stages() -> None:
    # train.py: the 1x1 projection trains at 1e-3 in both stages (SGD on summed gradients
    # in the linear stage: 16e-3 on the mean), the classifier at 16 then 1e-2.
    from bcnn.config import instantiate

    cfg = compose_config(["experiment=densenet_inat_bilinear"])
    groups = [
        {"params": [torch.zeros(1, requires_grad=True)], "lr": lr, "name": name}
        for name, lr in (("proj", 0.123), ("head", 0.456))
    ]
    for stage, proj_lr in (("linear", 1.6e-2), ("finetune", 1e-3)):
        node = cfg.trainer[stage]
        opt = instantiate(node.optimizer)(groups, lr=float(node.lr))
        assert {g["name"]: g["lr"] for g in opt.param_groups}["proj"] == proj_lr
    assert json.loads(json.dumps(protocol_of(cfg)))["finetune.proj_lr"] == "0.001"
