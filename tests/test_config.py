"""Configs: every option composes and instantiates; bad input fails early and clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from bcnn.config import instantiate, validate
from bcnn.engine import train
from bcnn.errors import ConfigError
from bcnn.models import build_model
from bcnn.models.backbones.base import read_weights
from tests.conftest import CONFIG_DIR, HYDRA_ORIGINALS, compose_config, run_train

GROUPS = (
    "backbone", "pooling", "normalization", "classifier", "dataset", "trainer", "logger",
    "optimizer", "scheduler", "paths", "debug",
)  # fmt: skip


def _options(group: str) -> list[str]:
    # Files starting with "_" are shared parts of the options, not options.
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if p.stem[0] != "_")


def test_the_suites_composition_shortcuts_change_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tests/conftest.py shortens Hydra's composition for the suite; every other test relies
    # on it composing what train.py composes. A defaults list with an interpolation (the
    # one case where the second shortcut defers to Hydra) and two of the packaged configs.
    for group, option in (("dataset", "imagenet"), ("model", "alexnet")):
        (tmp_path / group).mkdir()
        (tmp_path / group / f"{option}.yaml").write_text(f"{group}_name: {option}\n")
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "imagenet_alexnet.yaml").write_text("lr: 0.01\n")
    (tmp_path / "main.yaml").write_text(
        "defaults:\n  - dataset: imagenet\n  - model: alexnet\n  - pair: ${dataset}_${model}\n"
    )

    def configs() -> list[str]:
        with initialize_config_dir(str(tmp_path), version_base="1.3"):
            interpolated = compose("main")
        packaged = [
            compose_config(["experiment=iccv15_t1_bcnn_dm", "dataset=cars"]),
            compose_config(
                ["pooling=democratic", "normalization=sqrt_l2", "trainer.finetune.lr=0.5"]
            ),
        ]
        return [OmegaConf.to_yaml(c) for c in (interpolated, *packaged)]  # keys in order

    fast = configs()
    assert "pair:\n  lr: 0.01" in fast[0]
    for owner, name, original in HYDRA_ORIGINALS:
        monkeypatch.setattr(owner, name, original)
    assert configs() == fast


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    if group in ("optimizer", "scheduler"):
        # Placed inside each stage; validate() builds both on a dummy parameter.
        stages = ("linear", "finetune")
        cfg = compose_config([f"{group}@trainer.{s}.{group}={option}" for s in stages], tmp_path)
        validate(cfg)
        expected = {"cosine": "CosineAnnealingLR", "step": "StepLR", "constant": "ConstantLR"}
        expected.update(plateau="ReduceLROnPlateau", sgd="SGD", adam="Adam", adamw="AdamW")
        param = torch.zeros(1, requires_grad=True)
        for stage in stages:
            built = instantiate(cfg.trainer[stage].optimizer)([param], lr=0.1)
            if group == "scheduler":
                built = instantiate(cfg.trainer[stage].scheduler)(built)
            assert type(built).__name__ == expected[option]
        return
    # Datasets of the user's own files have no default root (???): validate() refuses that.
    own = ["dataset.root=/nowhere"] if group == "dataset" and option in ("folder", "csv") else []
    cfg = compose_config([f"{group}={option}", *own], tmp_path)
    validate(cfg)
    if group in ("trainer", "paths", "debug"):
        return  # validated above; nothing to instantiate
    if group == "logger":
        if option == "wandb":
            pytest.importorskip("wandb")
            cfg.logger.wandb.mode = "disabled"
        logger = instantiate(cfg.logger, output_dir=tmp_path, run_config={}, _recursive_=False)
        logger.log_epoch({"stage": "linear", "epoch": 1})
        logger.close()
        assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "curves.png").is_file()
    elif group == "dataset":
        if option == "synthetic":
            ds = instantiate(cfg.dataset, split="test", test_size=8)
            assert len(ds) == 8
        else:
            # The real datasets are not here: the error must name the missing path.
            root = tmp_path / "missing"
            with pytest.raises(FileNotFoundError, match="missing"):
                instantiate(cfg.dataset, root=str(root), split="train", transform=None)
    else:
        try:
            model = build_model(cfg, num_classes=5)
        except ValueError as err:
            # Only incompatible pairs (e.g. a vector pooling with matrix steps) may fail.
            assert "normalization" in str(err) or "pooling" in str(err)
            return
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    ("override", "exc", "message"),
    [
        ("trainer.linear.lrr=0.1", ConfigCompositionException, "trainer.linear.lrr"),
        ("trainer.linear.lr=fast", ConfigCompositionException, "trainer.linear.lr"),
        ("trainer.linear.epochs=1.5", ConfigCompositionException, "trainer.linear.epochs"),
        ("seedd=3", ConfigCompositionException, "seedd"),
        ("backbone=resnet9000", MissingConfigException, "backbone/resnet9000"),
    ],
)
def test_bad_overrides_fail_at_composition(override: str, exc: type, message: str) -> None:
    with pytest.raises(exc, match=message.replace(".", r"\.")):
        compose_config([override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.linear.lr=-0.1", "trainer.linear.lr"),
        ("trainer.finetune.optimizer=adam9", "trainer.finetune.optimizer"),
        ("trainer.stages=[linear,pretrain]", "trainer.stages"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.finetune.backbone_lr=0", "trainer.finetune.backbone_lr"),
        ("trainer.device=tpu", "trainer.device"),
    ],
)
def test_bad_values_fail_before_any_work(override: str, key: str, tmp_path: Path) -> None:
    cfg = compose_config([override], tmp_path)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


def test_cli_reports_bad_value_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(["trainer.linear.lr=-1", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0
    assert "trainer.linear.lr" in proc.stderr and "must be > 0" in proc.stderr
    assert not (run_dir / "metrics.csv").exists()


def test_the_module_finds_its_configs_from_any_directory(tmp_path: Path) -> None:
    # (train.py runs from the checkout in every run_train test; the installed console
    # scripts from an empty folder in tests/test_wheel.py.)
    script = [sys.executable, "-m", "bcnn.train"]
    proc = run_train(["--cfg", "job", "pooling=avg"], cwd=tmp_path, script=script)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "bcnn.models.pooling.AvgPool" in proc.stdout


def test_multirun_sweep_returns_one_result_per_job(tmp_path: Path) -> None:
    proc = run_train(
        [
            "-m",
            "pooling=avg,sum",
            "debug=smoke",
            "dataset.trainval_size=100",
            "dataset.test_size=40",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/results.json")) == ["0", "1"]
    # The sweep-summary callback gathers both jobs.
    summary = (tmp_path / "summary.csv").read_text()
    assert len(summary.strip().splitlines()) == 3 and "test_acc" in summary


def test_missing_dataset_fails_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    monkeypatch.setattr("bcnn.engine.trainer.build_model", lambda *a: built.append(a))
    root = tmp_path / "no_cub_here"
    cfg = compose_config(["dataset=cub", f"dataset.root={root}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no_cub_here") as err:
        train(cfg)
    assert "bcnn-prepare-data" in str(err.value) or "http" in str(err.value)
    assert not built and not (tmp_path / "run" / "checkpoints").exists()


# Every command of issue 11 that ended in a raw exception or was silently accepted.
ISSUE_11 = [
    (["+pooling.foo=1"], "pooling.foo"),
    (["dataset.num_classes=0"], "dataset.num_classes"),
    (["dataset.num_classes=-3"], "dataset.num_classes"),
    (["dataset.image_size=-32"], "dataset.image_size"),
    (["pooling.proj_dim=-4"], "pooling.proj_dim"),
    (["pooling.proj_dim=1.5"], "pooling.proj_dim"),
    (["backbone.channels=8"], "backbone.channels"),
    (["backbone.batch_norm=maybe"], "backbone.batch_norm"),
    (["dataset.cell_size=0"], "dataset.cell_size"),
    (["+normalization.steps=abc"], "normalization.steps"),
    (["trainer.device=cpu:abc"], "trainer.device"),
    (["seed=99999999999999999999"], "seed"),
    (["pooling=democratic", "pooling.gamma=-3"], "pooling.gamma"),
    (["pooling=democratic", "pooling.tau=0"], "pooling.tau"),
    (["pooling=democratic", "pooling.tau=5"], "pooling.tau"),
    (["pooling=democratic", "pooling.iters=0"], "pooling.iters"),
    (["normalization=sqrt_l2", "normalization.sqrt.eps=-1"], "normalization.sqrt.eps"),
    (["normalization=sqrt_l2", "normalization.sqrt.eps=nan"], "normalization.sqrt.eps"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["trainer.linear.lr=inf"], "trainer.linear.lr"),
    (["+trainer.linear.optimizer.lr=0.5"], "trainer.linear.optimizer.lr"),
    (
        ["scheduler@trainer.linear.scheduler=step", "trainer.linear.scheduler.step_size=0"],
        "trainer.linear.scheduler.step_size",
    ),
]


@pytest.mark.parametrize(("overrides", "key"), ISSUE_11, ids=lambda x: str(x))
def test_issue_11_values_fail_with_one_message_naming_the_key(
    overrides: list[str], key: str, tmp_path: Path
) -> None:
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key and f"'{key}'" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_text_file_as_weights_is_a_config_error(tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("these are not weights\n")
    cfg = compose_config(["backbone=vgg_m", f"backbone.weights={text}"], tmp_path)
    validate(cfg)  # the file is looked at only where it is used: by train(), or files=True
    with pytest.raises(ConfigError, match=r"'backbone\.weights'.*neither a torch file"):
        validate(cfg, files=True)
    cfg = compose_config(["backbone=vgg_m", f"backbone.weights={tmp_path / 'none.pt'}"], tmp_path)
    with pytest.raises(ConfigError, match=r"'backbone\.weights'.*no such file"):
        train(cfg)
    # A file that passes the quick look but cannot be read still names itself.
    text.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=rf"backbone\.weights={text}"):
        read_weights(text)


@pytest.mark.parametrize(
    ("device", "cuda", "count", "mps", "message"),
    [
        ("cuda", False, 0, False, "no NVIDIA GPU|built without CUDA"),
        ("cuda:7", True, 1, False, "1 GPU"),
        ("cpu:abc", False, 0, False, "must be one of"),
        ("cpu:1", False, 0, False, "no index"),
        ("mps", False, 0, False, "MPS"),
    ],
)
def test_unavailable_device_is_a_config_error_before_any_data(
    device: str,
    cuda: bool,
    count: int,
    mps: bool,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    read = []
    monkeypatch.setattr("bcnn.engine.trainer.instantiate", lambda *a, **k: read.append(a))
    cfg = compose_config([f"trainer.device={device}"], tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg)
    assert err.value.key == "trainer.device" and not read
    assert not (tmp_path / "config.yaml").exists()


# The commands of issue 20 that ended in a raw error or ran silently: each is now refused
# up front, by the key to fix.
REFUSED = [
    (["trainer.cache_dir=/dev/null"], "trainer.cache_dir", "not a directory"),
    (["trainer.cache_dir=/proc/nonexistent/x"], "trainer.cache_dir", "cannot create"),
    (["paths.output_dir=/dev/null/x"], "paths.output_dir", "cannot create"),
    (
        ["logger=tensorboard", "logger.tensorboard.log_dir=/proc/nope"],
        "logger.tensorboard.log_dir",
        "cannot create",
    ),
    (["backbone=vgg_d_fc7", "backbone.dropout=1.5"], "backbone.dropout", r"in \[0, 1\)"),
    (["backbone=vgg_d_fc7", "backbone.fc_dim=0"], "backbone.fc_dim", ">= 1|in \\[1"),
    (["backbone=vgg_d_fc7", "backbone.fc_dim=-1"], "backbone.fc_dim", ">= 1|in \\[1"),
    (["+backbone.in_chans=1"], "backbone.in_chans", "takes no such argument"),
    (["trainer.test_flip='yes'"], "trainer.test_flip", "true or false"),
    (["trainer.progress='no'"], "trainer.progress", "true or false"),
    (["pooling.proj_bn='yes'"], "pooling.proj_bn", "true or false"),
    (["trainer.linear.optimizer.momentum=5"], "trainer.linear.optimizer.momentum", r"\[0, 1\)"),
    (
        ["scheduler@trainer.linear.scheduler=step", "trainer.linear.scheduler.gamma=10"],
        "trainer.linear.scheduler.gamma",
        r"\(0, 1\]",
    ),
    (["trainer.linear.optimizer.weight_decay=1e6"], "trainer.linear.optimizer.weight_decay", "1"),
    (["dataset.pixel_noise=1e9"], "dataset.pixel_noise", r"\[0, 4\]"),
    (["pooling=fisher", "trainer.stages=[linear,finetune]"], "trainer.stages", "never fine-tunes"),
    (
        ["dataset=folder", "dataset.root=.", "optimizer@trainer.linear.optimizer=adam"],
        "trainer.linear.optimizer.momentum",
        "~trainer.linear.optimizer.momentum",
    ),
    (
        ["normalization=log_l2", "normalization.log.method=iterative", "normalization.log.eps=0"],
        "normalization.log.eps",
        "method=iterative",
    ),
    (
        [
            "normalization=sqrt_l2",
            "normalization.sqrt.method=eigh",
            "normalization.sqrt.backward=autograd",
        ],
        "normalization.sqrt.backward",
        "lyapunov_eig",
    ),
]


@pytest.mark.parametrize(("overrides", "key", "message"), REFUSED, ids=lambda x: str(x))
def test_issue_20_mistakes_are_refused_by_key(
    overrides: list[str], key: str, message: str, tmp_path: Path
) -> None:
    own_dir = any(o.startswith("paths.output_dir") for o in overrides)
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose_config(overrides, None if own_dir else tmp_path / "run"), files=True)
    assert err.value.key == key


def test_dropping_the_recipe_key_of_another_optimizer_makes_the_switch_valid(tmp_path: Path):
    overrides = [
        "dataset=folder",
        f"dataset.root={tmp_path}",
        "optimizer@trainer.linear.optimizer=adam",
    ]
    validate(compose_config([*overrides, "~trainer.linear.optimizer.momentum"], tmp_path / "run"))
