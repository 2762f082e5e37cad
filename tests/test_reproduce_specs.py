"""Experiment presets and table specs: they compose, and say what the papers say."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import pytest
from fixtures.datasets import MAKERS
from omegaconf import DictConfig, OmegaConf

from bcnn.config import validate
from bcnn.reproduce import launch
from bcnn.reproduce.tables import TABLES, Row, Table, published
from tests.conftest import CONFIG_DIR, compose_config


def runnable_rows(table: Table) -> list[Row]:
    return [r for r in table.rows if r.runnable]


def experiments_of(tables: Iterable[Table]) -> list[str]:
    return sorted({r.experiment for t in tables for r in t.rows if r.experiment})


EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# Shared parts that are not published rows by themselves.
BASES = {"repro_matlab", "repro_pytorch", "eccv18_t1_base"}
ROW_COUNTS = {
    "iccv15_table1": 56,
    "bmvc17_table1": 30,
    "bmvc17_table2": 12,
    "bmvc17_table3": 27,
    "bmvc17_table4": 30,
    "eccv18_table1": 24,
    "eccv18_tables2_5": 11,
    "talk_fine_grained": 15,
    "talk_normalization": 15,
    "talk_newton_schulz": 24,
    "talk_gradients": 9,
    "talk_spectral": 18,
    "talk_democratic": 18,
    "talk_densenet": 28,
    "talk_nabirds": 2,
}
# Rows that are another authors' method, or timings read from the benchmark results.
NOT_TRAINED = {
    "bmvc17_table4": 11,
    "talk_fine_grained": 3,
    "talk_newton_schulz": 6,
    "talk_spectral": 8,
    "talk_nabirds": 1,
}
# ECCV 2018, Table 1: the best gamma and p per dataset (VGG-16), and the starting network.
ECCV18 = {
    "CUB": (0.5, 0.3, "cub", True),
    "Cars": (0.5, 0.5, "cars", True),
    "Aircraft": (0.0, 0.3, "aircraft", True),
    "DTD": (0.3, 0.6, "dtd", False),
    "FMD": (0.8, 0.7, "fmd", False),
    "MIT Indoor": (0.3, 0.6, "mit_indoor", False),
}


def _target(node: DictConfig) -> str:
    return str(node._target_).rsplit(".", 1)[-1]


def _steps(cfg: DictConfig) -> list[str]:
    """The chain's steps (vectorize aside), in config order."""
    return [k for k, v in cfg.normalization.items() if k not in ("_target_", "vectorize") and v]


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    # The talk's tables reuse rows of the paper tables: compose each distinct row once.
    cfg = compose_config(list(overrides))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_the_published_protocol(name: str) -> None:
    # The protocol values themselves (optimizers, rates, epochs...) are checked against
    # the protocol table by tests/test_reproduce_protocols.py; here, the structure.
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert any(s in text for s in ("ICCV 2015", "BMVC 2017", "ECCV 2018", "slides", "authors"))
    assert "__" not in name  # generated row configs use "__": no clash possible
    t = cfg.trainer
    # Reproduction presets train on the whole training set and keep the last epoch (the
    # iNat first-order rows step ReduceLROnPlateau on a held-out split instead).
    held_out = name == "densenet_inat_first_order_plateau"
    assert cfg.dataset.val_fraction == (0.1 if held_out else 0.0)
    if name in BASES:
        return
    fc7 = name.startswith("iccv15_t1_fccnn")  # FC-CNN: fc7 of the 224x224 network
    assert cfg.dataset.transform.size == (224 if fc7 else 448)  # else 448x448 everywhere
    backbone = _target(cfg.backbone)
    if name.startswith(("iccv15", "bmvc17", "nabirds")):
        expected = ("VGG16FC7", "VGGMFC7") if fc7 else ("VGG16", "VGGM", "TwoStream")
        assert backbone in expected
    # No fine-tuning: the SVMs of the papers on frozen features (FV-CNN: its "ft" cells
    # read a fine-tuned FC-CNN instead of fine-tuning).
    nf = name.startswith(("bmvc17_t1", "bmvc17_t3_ns", "eccv18", "iccv15_t1_fvcnn"))
    # One stage from the start: train_cnn.py's first-order DenseNet, imdb_cnn_train.m's FC-CNN.
    finetune_only = name.startswith(("densenet_inat_first_order", "iccv15_t1_fccnn"))
    stages = ["linear"] if nf else ["finetune"] if finetune_only else ["linear", "finetune"]
    assert list(t.stages) == stages
    # The papers' SVMs on frozen features; softmax (or low-rank) classifiers when fine-tuned.
    assert (_target(cfg.classifier) == "SVMClassifier") == nf
    # MATLAB-era tables average the test scores of an image and its flip; the PyTorch
    # code scores the centre crop alone.
    assert t.test_flip == (not name.startswith("densenet"))


@pytest.mark.parametrize("column", sorted(ECCV18))
def test_eccv18_rows_use_the_published_gamma_p_and_start(column: str) -> None:
    gamma, p, option, fine_grained = ECCV18[column]
    table = TABLES["eccv18_table1"]
    slug = column.lower().replace(" ", "_")
    demo = _composed(table.row(f"gamma_democratic__{slug}").overrides)
    power = _composed(table.row(f"matrix_power__{slug}").overrides)
    assert _target(demo.pooling) == "DemocraticPool" and demo.pooling.gamma == gamma
    assert (demo.pooling.tau, demo.pooling.iters) == (0.5, 10)
    for label, expected in (("democratic", 0.0), ("sum", 1.0)):
        assert _composed(table.row(f"{label}__{slug}").overrides).pooling.gamma == expected
    assert _target(power.pooling) == "BilinearPool" and power.normalization.mpow.p == p
    assert power.normalization.mpow.method == "eigh"  # exact matrix power, as the paper
    assert _steps(power) == ["mpow", "signsqrt", "l2"]
    assert _steps(demo) == ["signsqrt", "l2"]
    for cfg in (demo, power):
        assert cfg.dataset.name == option and _target(cfg.backbone) == "VGG16"
        if fine_grained:  # starts from the B-CNN fine-tuned on the same dataset
            assert not cfg.backbone.pretrained
            assert cfg.backbone.weights.endswith(f"bcnn_vgg_d_ft_{option}.pt")
        else:  # ImageNet weights
            assert cfg.backbone.pretrained and cfg.backbone.weights is None
    if option == "dtd":
        assert demo.dataset.partition == 1


def test_bmvc17_table3_newton_schulz_iterations() -> None:
    for row in TABLES["bmvc17_table3"].rows[:15]:  # 0, 1, 5, 10, 20 iterations
        cfg = _composed(row.overrides)
        sqrt = cfg.normalization.sqrt
        iters = int(row.label.split()[1])
        assert (sqrt.method, sqrt.iters) == ("newton_schulz", iters), row.id
        assert _steps(cfg) == ["sqrt", "signsqrt", "l2"]


def test_bmvc17_matrix_function_choices() -> None:
    exact = _composed(TABLES["bmvc17_table3"].row("svd__cub").overrides)  # Table 3 "SVD"
    assert exact.normalization.sqrt.method == "svd"
    assert exact == _composed(
        TABLES["bmvc17_table1"].row("sqrta_plus_sgnsqrt__vgg_d__cub").overrides
    )
    # Fine-tuning: exact root and Lyapunov gradient; test features: 5 Newton-Schulz.
    improved = compose_config(["experiment=bmvc17_t2_improved_vgg_m"])
    sqrt = improved.normalization.sqrt
    assert (sqrt.method, sqrt.backward) == ("svd", "lyapunov_eig")
    assert (sqrt.eval_method, sqrt.eval_iters) == ("newton_schulz", 5)
    assert _target(improved.backbone) == "VGGM" and improved.backbone.weights.endswith(
        "vgg_m.safetensors"
    )
    grad_svd = compose_config(["experiment=bmvc17_t3_ft_grad_svd"]).normalization.sqrt
    assert (grad_svd.method, grad_svd.backward, grad_svd.eval_iters) == ("svd", "svd", 5)
    log = _composed(TABLES["bmvc17_table1"].row("loga_plus_sgnsqrt__vgg_m__cub").overrides)
    assert _steps(log) == ["log", "signsqrt", "l2"] and _target(log.backbone) == "VGGM"
    dm = compose_config(["experiment=iccv15_t1_bcnn_dm"])
    assert _target(dm.backbone) == "TwoStream" and dm.backbone.stream_a.pretrained
    dense = compose_config(["experiment=densenet_inat_bilinear"])
    assert _target(dense.backbone) == "DenseNet201" and dense.pooling.proj_dim == 128
    assert dense.normalization.sqrt.eps == 0.0  # no ridge in the authors' PyTorch code
    first = compose_config(["experiment=densenet_inat_first_order"])
    assert _steps(first) == [] and _target(first.pooling) == "AvgPool"  # no L2


def test_tables_have_the_published_rows() -> None:
    assert {n: len(t.rows) for n, t in TABLES.items()} == ROW_COUNTS
    trained = {n: len(t.rows) - len(runnable_rows(t)) for n, t in TABLES.items()}
    assert {n: k for n, k in trained.items() if k} == NOT_TRAINED
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
            if row.paper is not None:
                assert published(row.paper)[0] is not None, (table.name, row.paper)
            assert row.runnable == bool(row.overrides), row.id  # a job, or a reason


def test_talk_tables_print_the_talks_numbers_and_the_papers_where_they_differ() -> None:
    # The cells the issue names: FC [D] Aircraft 76.6 (ICCV 2015: 74.1), Newton-Schulz 10
    # iterations Aircraft 80.9 (81.1), SVD gradient Aircraft 86.8 (87.8), LRBP Aircraft
    # 86.9 (87.3), democratic FMD 84.6 (84.8).
    cells = {
        ("talk_fine_grained", "fc_d__aircraft"): (76.6, 74.1),
        ("talk_newton_schulz", "aircraft__10"): (80.9, 81.1),
        ("talk_gradients", "svd_a_1_2_plus_sgnsqrt__aircraft"): (86.8, 87.8),
        ("talk_spectral", "lrbp_cvpr_17__aircraft"): (86.9, 87.3),
        ("talk_democratic", "fmd__democratic"): (84.6, 84.8),
    }
    for (name, row_id), (talk, paper) in cells.items():
        row = TABLES[name].row(row_id)
        assert (published(row.key)[0], published(row.paper)[0]) == (talk, paper)
    lrbp = TABLES["talk_spectral"].row("lrbp_cvpr_17__aircraft")
    assert lrbp.runnable and lrbp.experiment == "bmvc17_t4_lrbp"
    fv = TABLES["talk_fine_grained"].row("fv_d__aircraft")  # 78.7 on the slide, 77.6 in ICCV
    assert fv.runnable and (published(fv.key)[0], published(fv.paper)[0]) == (78.7, 77.6)
    timing = TABLES["talk_newton_schulz"].row("time_ms__5")
    assert timing.benchmark == ("newton_schulz", 5) and published(timing.key)[0] == 4.0


# iNat 2018 supercategories: training images (the talk's slide).
INAT_TRAIN_IMAGES = {
    "Plantae": 118800,
    "Animalia": 5966,
    "Reptilia": 22754,
    "Amphibia": 11156,
    "Aves": 143950,
    "Mollusca": 8007,
    "Fungi": 6864,
    "Mammalia": 20104,
    "Arachnida": 4037,
    "Insecta": 87192,
    "Actinopterygii": 7835,
}


def plateau_patience(train_images: int, rounds: int = 10) -> int:
    """train_cnn.py's ReduceLROnPlateau patience in epochs: it validates every
    ``max(10000, N // 5)`` images with a patience of 10 rounds; this trainer steps per epoch."""
    return max(1, round(rounds * max(10000, train_images // 5) / train_images))


def test_densenet_first_order_inat_rows_convert_the_plateau_patience() -> None:
    assert plateau_patience(143950) == 2 and plateau_patience(5966) == 17
    rows = [r for r in TABLES["talk_densenet"].rows if r.id.startswith("inat_")]
    assert len(rows) == 2 * len(INAT_TRAIN_IMAGES)
    for row in rows:
        supercategory = row.label.removeprefix("iNat ")
        patience = [o for o in row.overrides if o.startswith("trainer.finetune.scheduler.")]
        if row.columns == ("DenseNet (regular)",):
            expected = plateau_patience(INAT_TRAIN_IMAGES[supercategory])
            assert patience == [f"trainer.finetune.scheduler.patience={expected}"], row.id
        else:
            assert patience == [], row.id
    row = TABLES["talk_densenet"].row("inat_aves__densenet_regular")
    cfg = compose_config(list(row.overrides))
    assert _target(cfg.trainer.finetune.scheduler) == "ReduceLROnPlateau"
    assert cfg.trainer.finetune.scheduler.patience == 2 and cfg.dataset.supercategory == "Aves"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_row_composes_with_its_cell(name: str) -> None:
    for row in runnable_rows(TABLES[name]):
        cfg = _composed(row.overrides)
        cell = dict(zip(TABLES[name].column_names, row.columns))
        stages = list(cfg.trainer.stages)
        exp = row.experiment or ""
        nf = "trainer.stages=[linear]" in row.overrides or cell.get("setting") == "nf"
        frozen = exp.startswith(("bmvc17_t1", "bmvc17_t3_ns", "eccv18", "iccv15_t1_fvcnn"))
        if nf or frozen:
            assert stages == ["linear"], row.id
            assert _target(cfg.classifier) == "SVMClassifier", row.id  # the papers' SVMs
        elif exp.startswith(("densenet_inat_first_order", "iccv15_t1_fccnn")):
            assert stages == ["finetune"], row.id
        else:
            assert stages == ["linear", "finetune"], row.id
        if exp.startswith("iccv15_t1_fvcnn") and cell.get("setting") == "ft":
            # Indirect fine-tuning: the conv features of the FC-CNN fine-tuned on this cell.
            short = exp[-1]
            column = cell["dataset"].lower().replace("+", "_plus_")
            assert cfg.backbone.weights.endswith(f"fccnn_vgg_{short}_ft_{column}.pt"), row.id
            assert not cfg.backbone.get("pretrained", False), row.id
        if row.splits:  # one job per split: the splits name the dataset's own key
            key = "partition" if cfg.dataset.name == "dtd" else "trial"
            assert row.splits == tuple(f"dataset.{key}={k}" for k in range(1, 11)), row.id
        dataset = cell.get("dataset", "")
        assert cfg.dataset.get("bbox_crop", False) == (dataset == "CUB+box"), row.id
        if cfg.dataset.name == "inat":
            assert cfg.dataset.version == 2018, row.id
            assert row.label.endswith(cfg.dataset.supercategory), row.id
        if name == "eccv18_table1":
            gamma = {"democratic": 0.0, "sum": 1.0}.get(row.label)
            if gamma is not None:
                assert cfg.pooling.gamma == gamma, row.id


def test_generated_row_configs_equal_direct_composition(tmp_path: Path) -> None:
    # The launcher turns each row into a config file; it must compose to exactly what the
    # row's overrides give on the command line. One table with every kind of override.
    table = TABLES["eccv18_table1"]
    rows = [table.rows[0], table.rows[3], table.rows[-1]]
    names = [job for job, _ in launch.write_rows(table, rows, tmp_path, smoke=False)]
    search = launch.searchpath_override(tmp_path)
    for row, name in zip(rows, names):
        generated = compose_config([f"experiment={name}", search])
        direct = compose_config(list(row.overrides))
        assert OmegaConf.to_container(generated) == OmegaConf.to_container(direct), row.id


def test_smoke_rows_keep_the_head_and_swap_data_and_backbone(tmp_path: Path) -> None:
    table = TABLES["iccv15_table1"]
    rows = [r for r in table.rows if r.id in ("b_cnn_d_m__cub_plus_box__ft", "fc_cnn_m__cars__nf")]
    names = [job for job, _ in launch.write_rows(table, rows, tmp_path, smoke=True)]
    search = launch.searchpath_override(tmp_path)
    for row, name in zip(rows, names):
        smoke = compose_config([f"experiment={name}", search])
        direct = compose_config(list(row.overrides))
        assert smoke.pooling == direct.pooling and smoke.normalization == direct.normalization
        assert smoke.trainer.stages == direct.trainer.stages
        assert smoke.dataset.name == "synthetic" and "bbox_crop" not in smoke.dataset
        assert smoke.trainer.device == "cpu" and smoke.trainer.linear.epochs == 2  # debug=smoke
        # The row's recipe and data protocol stay; debug=smoke's epochs run whole.
        assert smoke.trainer.linear.optimizer == direct.trainer.linear.optimizer
        assert smoke.trainer.finetune.optimizer == direct.trainer.finetune.optimizer
        assert smoke.trainer.test_flip == direct.trainer.test_flip
        assert smoke.dataset.val_fraction == direct.dataset.val_fraction == 0.0
        assert smoke.trainer.limit_train_batches is None
        assert smoke.dataset.trainval_size == launch.SMOKE_DATASET["trainval_size"]
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


def test_rows_with_splits_launch_one_job_per_split(tmp_path: Path) -> None:
    # ECCV 2018 Tables 2-5, DTD: ten jobs, one per official partition; in smoke mode the
    # first two, each on another synthetic dataset, with a smaller sketch.
    table = TABLES["eccv18_tables2_5"]
    row = table.row("ts_plus_gamma_democratic__dtd")
    names = [job for job, _ in launch.write_rows(table, [row], tmp_path / "full", smoke=False)]
    assert names == [f"{row.id}__split{k}" for k in range(1, 11)]
    search = launch.searchpath_override(tmp_path / "full")
    third = compose_config([f"experiment={names[2]}", search])
    assert third.dataset.name == "dtd" and third.dataset.partition == 3
    assert third.pooling.sketch.out_dim == 8192 and third.pooling.sketch.gamma == 0.5
    assert _target(third.classifier) == "SVMClassifier"

    smoke = [job for job, _ in launch.write_rows(table, [row], tmp_path / "smoke", smoke=True)]
    assert smoke == names[: launch.SMOKE_SPLITS]
    search = launch.searchpath_override(tmp_path / "smoke")
    seeds = []
    for name in smoke:
        cfg = compose_config([f"experiment={name}", search])
        assert cfg.dataset.name == "synthetic" and "partition" not in cfg.dataset
        assert cfg.pooling.sketch.out_dim == launch.SMOKE_SKETCH_DIM
        assert _target(cfg.pooling.sketch) == "DemocraticSketch"
        seeds.append(cfg.dataset.seed)
    assert len(set(seeds)) == len(smoke)


CHAINS = {
    "none": ["vectorize"],
    "l2": ["vectorize", "l2"],
    "signsqrt_l2": ["vectorize", "signsqrt", "l2"],
    "log_l2": ["log", "vectorize", "l2"],
    "log_signsqrt_l2": ["log", "vectorize", "signsqrt", "l2"],
    "sqrt_l2": ["sqrt", "vectorize", "l2"],
    "sqrt_signsqrt_l2": ["sqrt", "vectorize", "signsqrt", "l2"],
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_normalization_chains_compose_the_shared_steps(chain: str) -> None:
    steps = CONFIG_DIR / "normalization" / "step"
    assert sorted(p.stem for p in (CONFIG_DIR / "normalization").glob("*.yaml")) == sorted(CHAINS)
    assert "Vectorize" not in (CONFIG_DIR / "normalization" / f"{chain}.yaml").read_text()
    node = compose_config([f"normalization={chain}"]).normalization
    assert _target(node) == "NormalizationChain"
    assert [k for k in node if k != "_target_"] == CHAINS[chain]
    for name in CHAINS[chain]:  # each step is the shared node of normalization/step/
        assert node[name] == OmegaConf.load(steps / f"{name}.yaml"), name
    # normalization.<step>.<key>=... still reaches one step of one chain.
    last = CHAINS[chain][-1]
    key = {"vectorize": "triu", "l2": "_target_", "signsqrt": "eps"}[last]
    if key != "_target_":
        value = True if key == "triu" else 0.5
        changed = compose_config([f"normalization={chain}", f"normalization.{last}.{key}={value}"])
        assert changed.normalization[last][key] == value
    if "sqrt" in CHAINS[chain]:
        changed = compose_config([f"normalization={chain}", "normalization.sqrt.iters=7"])
        assert changed.normalization.sqrt.iters == 7 and node.sqrt.iters == 5


def test_frozen_features_and_fc_cnn_keep_the_aspect_ratio_on_every_dataset() -> None:
    # MATLAB: get_bcnn_features.m, get_dcnn_features.m and get_rcnn_features.m read the
    # model's keepAspect (true) for every dataset, as imdb_cnn_train.m fine-tunes FC-CNN;
    # the B-CNN fine-tuning (run_experiments_bcnn_train.m) keeps it for CUB only.
    t1 = TABLES["iccv15_table1"]
    for row in t1.rows:
        dataset, setting = row.columns
        if dataset != "Cars" and (dataset, row.label[:2]) not in (
            ("Aircraft", "FC"),
            ("Aircraft", "FV"),
        ):
            continue
        keeps = setting == "nf" or not row.label.startswith("B-CNN")
        recipe = _composed(row.overrides).dataset.transform.recipe
        assert (recipe == "short_side") == keeps, row.id
    for name, row_id in (
        ("bmvc17_table1", "loga__vgg_m__aircraft"),
        ("bmvc17_table1", "sgnsqrt__vgg_d__cars"),
        ("bmvc17_table3", "newton_schulz_0_iterations__aircraft"),
    ):
        cfg = _composed(TABLES[name].row(row_id).overrides)
        assert cfg.dataset.transform.recipe == "short_side", row_id


def test_a_table_checks_the_data_and_weights_of_every_row_before_launching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # BMVC 2017 Table 2: 12 rows on CUB, Cars, Aircraft, half of them with VGG-M weights.
    monkeypatch.setenv("BCNN_WEIGHTS", str(tmp_path / "weights"))
    table, data = TABLES["bmvc17_table2"], tmp_path / "data"
    extra = [f"paths.data_dir={data}", "hydra.launcher.n_jobs=2"]  # hydra.*: the launcher's
    with pytest.raises(FileNotFoundError) as err:
        launch.launch_table(table, tmp_path / "sweep", extra=extra)
    lines = str(err.value).splitlines()
    assert "nothing was launched" in lines[0]
    missing = [line for line in lines if line.startswith("- ")]
    assert len(missing) == 4  # each once: three dataset folders, one weights file
    assert sum("vgg_m.safetensors" in line for line in missing) == 1
    for folder in ("cub", "cars", "aircraft"):
        assert sum(str(data / folder) in line for line in missing) == 1, folder
    assert "and 2 more" in next(line for line in missing if "vgg_m" in line)  # 6 rows need it
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".rows"]  # no job ran
    for name in ("cub", "cars", "aircraft"):
        MAKERS[name](data / name)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vgg_m.safetensors").write_bytes(b"")
    assert launch.launch_table(table, tmp_path / "sweep", extra=extra, dry_run=True) == 0
    assert "missing" not in capsys.readouterr().err


def test_smoke_columns_train_on_stand_ins_of_their_own(tmp_path: Path) -> None:
    # The dataset columns of a row must be different runs in smoke mode: each dataset
    # gets the synthetic set with its own seed and class count; CUB+box shares CUB's.
    table = TABLES["iccv15_table1"]
    rows = [r for r in table.rows if r.id.startswith("b_cnn_m_m__") and r.id.endswith("__nf")]
    names = [job for job, _ in launch.write_rows(table, rows, tmp_path, smoke=True)]
    search = launch.searchpath_override(tmp_path)
    data = {}
    for row, name in zip(rows, names):
        cfg = compose_config([f"experiment={name}", search])
        assert cfg.dataset.name == "synthetic"
        data[row.columns[0]] = (cfg.dataset.seed, cfg.dataset.num_classes)
    assert data["CUB"] == data["CUB+box"]
    assert len({data["CUB"], data["Cars"], data["Aircraft"]}) == 3
    assert len({classes for _, classes in data.values()}) == 3
