"""The training entry point: one-message user errors, the number a sweep optimizes, the
Optuna search, and the progress bar of feature caching."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from torch.utils.data import TensorDataset

from bcnn.cli.callbacks import TrainCallbacks
from bcnn.config import validate
from bcnn.engine import distributed as D
from bcnn.engine.cache import build_cache
from bcnn.errors import UserError, is_user_error, run_command, user_errors
from bcnn.models import build_model
from bcnn.train import objective, optimized_metric
from tests.conftest import compose_config, run_train

SMOKE = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]


def _train(args: list[str]) -> subprocess.CompletedProcess:
    """``python train.py *args`` as a user runs it (no HYDRA_FULL_ERROR)."""
    return run_train(args, full_error=False)


def test_a_bad_value_prints_one_message(tmp_path: Path) -> None:
    args = ["trainer.linear.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _train(args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bcnn-train: error: Invalid config value for 'trainer.linear.lr': must be > 0, got -1.0",
        "(set HYDRA_FULL_ERROR=1 for the full trace)",
    ]


def test_user_errors_are_the_ones_bcnn_raises_for_the_user() -> None:
    cfg = compose_config(["trainer.linear.lr=-1"])
    with pytest.raises(ValueError) as raised:
        validate(cfg)  # bcnn's own check, naming the key
    assert is_user_error(raised.value)
    with pytest.raises(ValueError) as raised:
        int("seven")  # raised here, not in bcnn: a bug, keeps its trace
    assert not is_user_error(raised.value)
    with pytest.raises(RuntimeError) as raised:
        torch.zeros(2) @ torch.zeros(3)
    assert not is_user_error(raised.value)
    assert is_user_error(ConfigCompositionException("Could not override 'x'"))


def test_run_command_prints_one_line_or_the_trace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def body(argv: object) -> int:
        validate(compose_config(["trainer.num_workers=-2"]))
        return 0

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert run_command("bcnn-x", body, []) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "bcnn-x: error: Invalid config value for 'trainer.num_workers': must be >= 0, got -2"
    )
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match=r"trainer\.num_workers"):
        run_command("bcnn-x", body, [])
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(ZeroDivisionError):  # not a user error: the trace stays
        run_command("bcnn-x", lambda argv: 1 // 0, [])
    # Outside a single Hydra run (a sweep) the message leaves as a compact Hydra error.
    with (
        pytest.raises(UserError, match=r"^bcnn-x: error: Invalid config value"),
        user_errors("bcnn-x"),
    ):
        validate(compose_config(["trainer.num_workers=-2"]))


def _metrics_csv(folder: Path, train_accs: list[float]) -> None:
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "epoch", "train_acc", "val_acc"])
        writer.writeheader()
        for i, acc in enumerate(train_accs):
            writer.writerow({"stage": "linear", "epoch": i + 1, "train_acc": acc, "val_acc": ""})


def test_objective_is_always_a_number(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = {"val_acc": 81.25, "val_mean_class_acc": 80.0, "output_dir": str(tmp_path)}
    assert objective(results) == 81.25
    assert objective(results, "val_mean_class_acc") == 80.0
    _metrics_csv(tmp_path, [40.0, 55.5])
    no_val = {"val_acc": None, "val_mean_class_acc": None, "output_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="bcnn.train"):
        assert objective(no_val) == 55.5
    assert "no validation split" in caplog.text and "55.50" in caplog.text


def test_the_optimized_metric_is_a_validation_metric() -> None:
    assert optimized_metric(compose_config([])) == "val_acc"
    cfg = compose_config(["hparams_search=optuna", "hparams_search.optimized_metric=test_acc"])
    with pytest.raises(ValueError, match=r"hparams_search\.optimized_metric"):
        optimized_metric(cfg)
    cfg = compose_config(
        ["hparams_search=optuna", "hparams_search.optimized_metric=val_mean_class_acc"]
    )
    assert optimized_metric(cfg) == "val_mean_class_acc"


@pytest.mark.slow
def test_optuna_search_runs_without_a_validation_split(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = [*SMOKE, "hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    args += ["dataset.val_fraction=0", f"hydra.sweep.dir={sweep}", "trainer.stages=[linear]"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    last_train_acc = []
    for job in ("0", "1"):
        with (sweep / job / "metrics.csv").open() as f:
            last_train_acc.append(float(list(csv.DictReader(f))[-1]["train_acc"]))
    assert best["best_value"] == pytest.approx(max(last_train_acc))
    # trainer.stages=[linear]: the fine-tuning settings are not searched.
    assert set(best["best_params"]) == {"trainer.linear.lr"}


@pytest.mark.parametrize(
    ("stages", "searched"),
    [
        ("[linear]", ["trainer.linear.lr"]),
        (
            "[finetune]",
            [
                "trainer.finetune.lr",
                "trainer.finetune.backbone_lr",
                "trainer.finetune.optimizer.weight_decay",
            ],
        ),
        (
            "[linear,finetune]",
            [
                "trainer.linear.lr",
                "trainer.finetune.lr",
                "trainer.finetune.backbone_lr",
                "trainer.finetune.optimizer.weight_decay",
            ],
        ),
    ],
)
def test_a_search_leaves_out_the_stages_that_do_not_run(stages: str, searched: list[str]) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        overrides = ["hparams_search=optuna", f"trainer.stages={stages}"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    TrainCallbacks().on_multirun_start(cfg)
    assert list(cfg.hydra.sweeper.params) == searched


def test_a_slurm_sweep_without_slurm_is_one_message(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if shutil.which("srun"):
        pytest.skip("a SLURM node: the sweep would be submitted")
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", *SMOKE]
    proc = _train([*args, f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "bcnn-train: error: hydra/launcher=slurm submits the jobs to SLURM, but this machine "
        "has no srun (it is not a SLURM node): run the sweep on the cluster, or here with "
        "hydra/launcher=joblib (or submitit_local)"
    )


@pytest.mark.parametrize("progress", [True, False])
def test_feature_caching_shows_a_progress_bar(
    tmp_path: Path, progress: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_model(compose_config(["backbone.channels=[4]"]), 3).eval()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    data = TensorDataset(images, torch.arange(10) % 3)
    feats, labels = build_cache(
        model, data, tmp_path, {"split": "train"}, views=1, dtype="float32", batch_size=4,
        device=torch.device("cpu"), precision="32", num_workers=0, env=D.DistEnv(),
        progress=progress,
    )  # fmt: skip
    assert feats.shape == (10, 1, 16) and np.array_equal(labels, np.arange(10) % 3)
    err = capsys.readouterr().err
    assert ("caching train descriptors" in err) == progress
    if progress:
        assert "0/3" in err  # ten images in batches of four


def test_an_explicit_run_dir_holding_a_run_is_refused_before_hydra_writes(
    tmp_path: Path,
) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- the first run's\n")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    proc = run_train(["debug=smoke", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "trainer.resume=" in proc.stderr
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == "- the first run's\n"
