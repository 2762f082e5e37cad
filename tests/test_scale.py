"""Mixed precision, the feature cache, DistributedDataParallel and sweep launchers."""

from __future__ import annotations

import csv
import json
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bcnn.engine import cache, train
from bcnn.models import build_model
from tests import _warm
from tests.conftest import REPO_ROOT, compose_config, run_train, subprocess_env

LINEAR = [
    "trainer.stages=[linear]",
    "trainer.progress=false",
    "trainer.linear.epochs=5",
    "dataset.trainval_size=800",
    "dataset.test_size=300",
]


def test_bf16_autocast_keeps_matrix_heads_in_float32(tmp_path: Path) -> None:
    cfg = compose_config(["trainer.precision=bf16"], tmp_path)
    model = build_model(cfg, 12)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(x)
        pooled = model.pooling(feats)
        logits = model(x)
    assert feats.dtype == torch.bfloat16
    assert pooled.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cached_linear_stage_matches_uncached(tmp_path: Path) -> None:
    acc = {}
    for mode in ("true", "false"):
        cfg = compose_config([*LINEAR, f"trainer.cache_features={mode}"], tmp_path / mode)
        acc[mode] = train(cfg)["test_acc"]
    assert abs(acc["true"] - acc["false"]) <= 2.0, acc
    assert acc["true"] > 20  # chance is 8.3%
    # The run-directory cache is removed once the linear stage is done.
    assert not (tmp_path / "true" / "feature_cache").exists()


def test_shared_cache_is_reused_by_a_second_run(tmp_path: Path) -> None:
    shared = tmp_path / "cache"
    overrides = [*LINEAR, "trainer.cache_features=true", f"trainer.cache_dir={shared}"]
    first = train(compose_config(overrides, tmp_path / "a"))
    files = sorted(shared.glob("*/features.npy"))
    assert len(files) == 3  # train, val and test descriptors
    stamps = [f.stat().st_mtime_ns for f in files]
    second = train(compose_config(overrides, tmp_path / "b"))
    assert [f.stat().st_mtime_ns for f in sorted(shared.glob("*/features.npy"))] == stamps
    assert "Reusing the feature cache" in (tmp_path / "b" / "train.log").read_text()
    assert first["test_acc"] == second["test_acc"]
    # float16 storage is a different cache.
    train(compose_config([*overrides, "trainer.cache_dtype=float16"], tmp_path / "c"))
    assert len(list(shared.glob("*/features.npy"))) == 6


def test_cache_refused_when_the_disk_is_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    cfg = compose_config([*LINEAR, "trainer.cache_features=true"], tmp_path)
    with pytest.raises(OSError, match=r"trainer\.cache_dir") as err:
        train(cfg)
    # Sizes in the unit that keeps them readable (not "0.00 GiB").
    assert "has 1000 B free" in str(err.value) and "needs 10.0 MiB" in str(err.value)
    assert not (tmp_path / "metrics.csv").exists()


def test_cache_true_is_refused_for_a_trainable_head(tmp_path: Path) -> None:
    cfg = compose_config([*LINEAR, "trainer.cache_features=true"], tmp_path)
    cfg.pooling.proj_dim = 8  # a 1x1 projection trains in the linear stage
    with pytest.raises(ValueError, match=r"trainer\.cache_features"):
        train(cfg)


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    args = [
        "debug=smoke",
        "trainer.limit_train_batches=null",
        "trainer.limit_eval_batches=null",
        "trainer.cache_features=false",
        "dataset.trainval_size=160",
        "dataset.test_size=60",
    ]
    one = run_train([*args, f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    # torchrun forked warm; the two ranks it starts are new interpreters.
    two = _warm.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--standalone",
            str(REPO_ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path / 'two'}",
        ],
        REPO_ROOT, subprocess_env(threads=1), timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["world_size"] == 2
    for key in ("test_acc", "val_acc", "test_mean_class_acc"):
        assert r1[key] == pytest.approx(r2[key], abs=1e-6)
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"), strict=True):
        # The same arithmetic up to the order of float32 sums, which the linear stage's lr 10
        # amplifies over the epochs.
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-3)
        assert float(a["val_acc"]) == pytest.approx(float(b["val_acc"]), abs=1e-6)


@pytest.mark.slow
def test_joblib_multirun_runs_two_jobs(tmp_path: Path) -> None:
    proc = run_train(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "pooling=avg,sum",
            "debug=smoke",
            "dataset.trainval_size=100",
            "dataset.test_size=40",
            f"hydra.sweep.dir={tmp_path}",
        ],
        warm=False,  # the launcher's worker processes import the task from a new __main__
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    configs = sorted(tmp_path.glob("*/config.yaml"))
    assert len(list(tmp_path.glob("*/results.json"))) == 2
    targets = {OmegaConf.load(c).pooling._target_ for c in configs}
    assert targets == {"bcnn.models.pooling.AvgPool", "bcnn.models.pooling.BilinearPool"}


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            "debug=smoke",
            "dataset.trainval_size=100",
            "dataset.test_size=40",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )  # the job itself runs in a new interpreter that submitit starts
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("*/results.json"))) == 1


def test_slurm_preset_composes() -> None:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min == 720


def test_missing_launcher_plugin_gives_install_hint(tmp_path: Path) -> None:
    # The check asks the import system for the plugin: here it answers "not installed".
    script = tmp_path / "no_plugins.py"
    script.write_text(
        "import sys\n"
        "import bcnn.cli.overrides as cli\n"
        "real = cli.find_spec\n"
        "cli.find_spec = lambda n, *a: None if n.startswith('hydra_plugins') else real(n, *a)\n"
        "sys.argv = ['train.py', '-m', 'hydra/launcher=joblib']\n"
        "from bcnn.train import main\n"
        "main()\n"
    )
    proc = run_train([], cwd=tmp_path, script=[sys.executable, str(script)])
    assert proc.returncode != 0
    assert "pip install 'bcnn[launchers]'" in proc.stderr
