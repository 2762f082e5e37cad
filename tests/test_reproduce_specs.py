"""Experiment presets and table specs: they compose, and say what the papers say."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from bcnn.config import validate
from bcnn.reproduce import launch
from bcnn.reproduce.tables import TABLES, experiments_of, published
from tests.conftest import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# Shared parts that are not published rows by themselves.
BASES = {"recipe_bcnn", "eccv18_t1_base"}
ROW_COUNTS = {
    "iccv15_table1": 40,
    "bmvc17_table1": 30,
    "bmvc17_table2": 12,
    "bmvc17_table3": 27,
    "eccv18_table1": 24,
    "densenet_inat": 28,
    "nabirds": 1,
}
# ECCV 2018, Table 1: the best gamma and p per dataset (VGG-16), and the starting network.
ECCV18 = {
    "cub": (0.5, 0.3, "cub", True),
    "cars": (0.5, 0.5, "cars", True),
    "aircraft": (0.0, 0.3, "aircraft", True),
    "dtd": (0.3, 0.6, "dtd", False),
    "fmd": (0.8, 0.7, "fmd", False),
    "mit": (0.3, 0.6, "mit_indoor", False),
}
NS_ITERS = {
    "bmvc17_t3_ns0": 0,
    "bmvc17_t3_ns1": 1,
    "bmvc17_t3_ns5": 5,
    "bmvc17_t3_ns10": 10,
    "bmvc17_t3_ns20": 20,
}


def _target(node: DictConfig) -> str:
    return str(node._target_).rsplit(".", 1)[-1]


def _steps(cfg: DictConfig) -> list[str]:
    """The chain's steps (vectorize aside), in config order."""
    return [k for k, v in cfg.normalization.items() if k not in ("_target_", "vectorize") and v]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_the_published_protocol(name: str) -> None:
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert any(s in text for s in ("ICCV 2015", "BMVC 2017", "ECCV 2018", "slides", "authors"))
    assert "__" not in name  # generated row configs use "__": no clash possible
    t = cfg.trainer
    # The authors' PyTorch recipe: 25 linear epochs (256 images per step), then 45 Adam
    # epochs (128 per step, lr x0.1 every 25), flip-averaged test scores.
    linear = (_target(t.linear.optimizer), t.linear.epochs)
    assert linear == ("SGD", 25) and t.linear.batch_size * t.linear.grad_accum == 256
    finetune = (_target(t.finetune.optimizer), t.finetune.epochs, t.finetune.backbone_lr)
    assert finetune == ("AdamW", 45, 1e-4) and t.finetune.lr == 1e-2
    assert t.finetune.batch_size * t.finetune.grad_accum == 128
    assert _target(t.finetune.scheduler) == "StepLR" and t.finetune.scheduler.step_size == 25
    assert t.test_flip
    if name in BASES:
        return
    assert cfg.dataset.transform.size == 448  # every published row uses 448x448 inputs
    backbone = _target(cfg.backbone)
    if name.startswith(("iccv15", "bmvc17", "nabirds")):
        assert backbone in ("VGG16", "VGGM", "TwoStream")
    nf = name.startswith(("bmvc17_t1", "bmvc17_t3_ns", "eccv18"))  # no fine-tuning
    assert list(t.stages) == (["linear"] if nf else ["linear", "finetune"])


@pytest.mark.parametrize("dataset", sorted(ECCV18))
def test_eccv18_presets_use_the_published_gamma_p_and_start(dataset: str) -> None:
    gamma, p, option, fine_grained = ECCV18[dataset]
    demo = compose_config([f"experiment=eccv18_t1_gdemocratic_{dataset}"])
    power = compose_config([f"experiment=eccv18_t1_mpow_{dataset}"])
    assert _target(demo.pooling) == "DemocraticPool" and demo.pooling.gamma == gamma
    assert (demo.pooling.tau, demo.pooling.iters) == (0.5, 10)
    assert _target(power.pooling) == "BilinearPool" and power.normalization.mpow.p == p
    assert power.normalization.mpow.method == "eigh"  # exact matrix power, as the paper
    assert _steps(power) == ["mpow", "signsqrt", "l2"]
    assert _steps(demo) == ["signsqrt", "l2"]
    for cfg in (demo, power):
        assert cfg.dataset.name == option and _target(cfg.backbone) == "VGG16"
        if fine_grained:  # starts from the B-CNN fine-tuned on the same dataset
            assert not cfg.backbone.pretrained
            assert cfg.backbone.weights.endswith(f"bcnn_vgg_d_ft_{dataset}.pt")
        else:  # ImageNet weights
            assert cfg.backbone.pretrained and cfg.backbone.weights is None
    if dataset == "dtd":
        assert demo.dataset.partition == 1


@pytest.mark.parametrize("name", sorted(NS_ITERS))
def test_bmvc17_table3_newton_schulz_iterations(name: str) -> None:
    cfg = compose_config([f"experiment={name}"])
    sqrt = cfg.normalization.sqrt
    assert (sqrt.method, sqrt.iters) == ("newton_schulz", NS_ITERS[name])
    assert _steps(cfg) == ["sqrt", "signsqrt", "l2"]


def test_bmvc17_matrix_function_choices() -> None:
    exact = compose_config(["experiment=bmvc17_t1_vgg_d_sqrt_signsqrt"])  # Table 3 "SVD"
    assert exact.normalization.sqrt.method == "svd"
    improved = compose_config(["experiment=bmvc17_t2_improved_vgg_m"])
    sqrt = improved.normalization.sqrt
    assert (sqrt.method, sqrt.iters, sqrt.backward) == ("newton_schulz", 5, "lyapunov_iterative")
    assert _target(improved.backbone) == "VGGM" and improved.backbone.weights.endswith(
        "vgg_m.safetensors"
    )
    grad_svd = compose_config(["experiment=bmvc17_t3_ft_grad_svd"]).normalization.sqrt
    assert (grad_svd.method, grad_svd.backward) == ("svd", "svd")
    log = compose_config(["experiment=bmvc17_t1_vgg_m_log_signsqrt"])
    assert _steps(log) == ["log", "signsqrt", "l2"]
    dm = compose_config(["experiment=iccv15_t1_bcnn_dm"])
    assert _target(dm.backbone) == "TwoStream" and dm.backbone.stream_a.pretrained
    dense = compose_config(["experiment=densenet_inat_bilinear"])
    assert _target(dense.backbone) == "DenseNet201" and dense.pooling.proj_dim == 128


def test_tables_have_the_published_rows() -> None:
    assert {n: len(t.rows) for n, t in TABLES.items()} == ROW_COUNTS
    used = set(experiments_of(TABLES.values()))
    assert used <= set(EXPERIMENTS)
    assert set(EXPERIMENTS) - used == BASES  # every preset is some table's row
    for table in TABLES.values():
        ids = [r.id for r in table.rows]
        assert len(set(ids)) == len(ids), table.name
        for row in table.rows:
            assert len(row.columns) == len(table.column_names)
            top1, _ = published(row.key)
            assert top1 is not None, (table.name, row.key)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_row_composes_with_its_cell(name: str) -> None:
    for row in TABLES[name].rows:
        cfg = compose_config(list(row.overrides))
        validate(cfg)
        cell = dict(zip(TABLES[name].column_names, row.columns))
        stages = list(cfg.trainer.stages)
        if cell.get("setting") == "nf" or name in ("bmvc17_table1", "eccv18_table1"):
            assert stages == ["linear"], row.id
        if cell.get("setting") == "ft" or name in ("bmvc17_table2", "densenet_inat", "nabirds"):
            assert stages == ["linear", "finetune"], row.id
        dataset = cell.get("dataset", "")
        assert cfg.dataset.get("bbox_crop", False) == (dataset == "CUB+box"), row.id
        if cfg.dataset.name == "inat":
            assert (cfg.dataset.version, cfg.dataset.supercategory) == (2018, dataset), row.id
        if name == "eccv18_table1":
            gamma = {"democratic": 0.0, "sum": 1.0}.get(row.label)
            if gamma is not None:
                assert cfg.pooling.gamma == gamma, row.id


def test_generated_row_configs_equal_direct_composition(tmp_path: Path) -> None:
    # The launcher turns each row into a config file; it must compose to exactly what the
    # row's overrides give on the command line. One table with every kind of override.
    table = TABLES["eccv18_table1"]
    rows = [table.rows[0], table.rows[3], table.rows[-1]]
    names = launch.write_rows(table, rows, tmp_path, smoke=False)
    search = launch.searchpath_override(tmp_path)
    for row, name in zip(rows, names):
        generated = compose_config([f"experiment={name}", search])
        direct = compose_config(list(row.overrides))
        assert OmegaConf.to_container(generated) == OmegaConf.to_container(direct), row.id


def test_smoke_rows_keep_the_head_and_swap_data_and_backbone(tmp_path: Path) -> None:
    table = TABLES["iccv15_table1"]
    rows = [r for r in table.rows if r.id in ("b_cnn_d_m__cub_plus_box__ft", "fc_cnn_m__cars__nf")]
    names = launch.write_rows(table, rows, tmp_path, smoke=True)
    search = launch.searchpath_override(tmp_path)
    for row, name in zip(rows, names):
        smoke = compose_config([f"experiment={name}", search])
        direct = compose_config(list(row.overrides))
        assert smoke.pooling == direct.pooling and smoke.normalization == direct.normalization
        assert smoke.trainer.stages == direct.trainer.stages
        assert smoke.dataset.name == "synthetic" and "bbox_crop" not in smoke.dataset
        assert smoke.trainer.device == "cpu" and smoke.trainer.linear.epochs == 2  # debug=smoke
        if _target(direct.backbone) == "TwoStream":  # two small CNNs: x_a x_b^T still runs
            assert (
                _target(smoke.backbone.stream_a) == _target(smoke.backbone.stream_b) == "SmallCNN"
            )
        else:
            assert _target(smoke.backbone) == "SmallCNN" and "weights" not in smoke.backbone


@pytest.mark.parametrize(
    "override",
    ["~dataset.bbox_crop", "+foo=1", "dataset=cub,cars", "trainer.stages.0=linear"],
)
def test_row_overrides_a_config_file_cannot_hold_are_rejected(override: str) -> None:
    with pytest.raises(ValueError, match="row override"):
        launch.split_overrides([override])
