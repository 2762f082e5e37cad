"""End-to-end training runs on the built-in dataset."""

from __future__ import annotations

import csv
import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch

from bcnn.engine import train
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.engine.trainer import check_batch_sizes
from bcnn.errors import ConfigError
from tests.conftest import compose_config, run_train, start_train

RESULT_KEYS = {"test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc"}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_bilinear_beats_average_pooling_on_frozen_features(tmp_path: Path) -> None:
    acc = {}
    for pooling in ("avg", "sum"):
        cfg = compose_config(
            [f"pooling={pooling}", "trainer.stages=[linear]", "trainer.progress=false"],
            tmp_path / pooling,
        )
        acc[pooling] = train(cfg)["test_acc"]
    assert acc["sum"] >= acc["avg"] + 25, acc


@pytest.mark.parametrize("stages", ["[linear]", "[finetune]", "[linear,finetune]"])
def test_each_stage_setting_runs_and_writes_outputs(
    stages: str, tmp_path: Path, smoke_overrides: list[str]
) -> None:
    results = train(compose_config([*smoke_overrides, f"trainer.stages={stages}"], tmp_path))
    names = stages.strip("[]").split(",")
    assert list(results["stages"]) == names
    assert results.keys() >= RESULT_KEYS
    for key in RESULT_KEYS:
        assert 0.0 <= results[key] <= 100.0
        assert all(0.0 <= results["stages"][n][key] <= 100.0 for n in names)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["test_acc"] == results["test_acc"]
    rows = _rows(tmp_path)
    epochs = {"linear": 2, "finetune": 1}
    assert [r["stage"] for r in rows] == [n for n in names for _ in range(epochs[n])]
    assert set(rows[0]) == {
        "stage", "epoch", "lr", "train_loss", "train_acc", "val_acc",
        "val_mean_class_acc", "seconds",
    }  # fmt: skip
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "train.log").is_file()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert last["stage_index"] == len(names) and last["config"]["trainer"]["stages"] == names
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "best_metric"):
        assert key in best
    assert best["optimizer"] is not None
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_linear_stage_freezes_the_backbone(tmp_path: Path, smoke_overrides: list[str]) -> None:
    cfg = compose_config([*smoke_overrides, "trainer.stages=[linear]"], tmp_path)
    torch.manual_seed(cfg.seed)
    from bcnn.models import build_model

    initial = build_model(cfg, 12).state_dict()
    train(cfg)
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    for key, value in initial.items():
        if key.startswith("backbone."):
            assert torch.equal(value, trained[key]), key
    assert not torch.equal(initial["classifier.weight"], trained["classifier.weight"])


def test_optimizer_and_schedule_choices_take_effect(
    tmp_path: Path, smoke_overrides: list[str]
) -> None:
    overrides = [
        *smoke_overrides,
        "trainer.linear.epochs=3",
        "trainer.finetune.epochs=2",
        "optimizer@trainer.finetune.optimizer=adamw",
        "trainer.finetune.optimizer.betas=[0.8,0.9]",
        "trainer.finetune.lr=1e-3",
        "trainer.finetune.backbone_lr=1e-4",
        "scheduler@trainer.finetune.scheduler=step",
        "trainer.finetune.scheduler.step_size=1",
        "scheduler@trainer.linear.scheduler=constant",
        "dataset.val_fraction=0",
    ]
    results = train(compose_config(overrides, tmp_path))
    assert results["val_acc"] is None  # no validation split: trained on trainval
    rows = _rows(tmp_path)
    assert [float(r["lr"]) for r in rows] == pytest.approx([10.0, 10.0, 10.0, 1e-3, 1e-4])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["stage_index"] == 2
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")  # the finetune stage's
    groups = best["optimizer"]["param_groups"]
    assert all(g["betas"] == (0.8, 0.9) and "amsgrad" in g for g in groups)  # AdamW's
    assert {g["name"]: g["initial_lr"] for g in groups} == {"backbone": 1e-4, "head": 1e-3}


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "output_dir"}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tmp_path: Path) -> None:
    args = [
        "trainer.linear.epochs=3",
        "trainer.finetune.epochs=2",
        "trainer.progress=false",
        "dataset.trainval_size=200",
        "dataset.test_size=60",
    ]
    # All three started the same way (tests/_warm.py): one thread setting for all.
    reference = run_train([*args, f"hydra.run.dir={tmp_path / 'full'}"])
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = json.loads((tmp_path / "full" / "results.json").read_text())

    run_dir = tmp_path / "killed"
    proc = start_train([*args, f"hydra.run.dir={run_dir}"])
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "results.json").exists()

    resumed = run_train(["trainer.progress=false", f"trainer.resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "results.json").read_text())
    assert _strip(got) == _strip(expected)
    assert _rows(run_dir) == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(_rows(tmp_path / "full"), _rows(run_dir), strict=True)
    ]


def test_resume_with_missing_checkpoint_fails_clearly(tmp_path: Path) -> None:
    cfg = compose_config([f"trainer.resume={tmp_path / 'nowhere'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last\.pt"):
        train(cfg)


def test_plateau_schedule_in_min_mode_is_refused_before_any_work(tmp_path: Path) -> None:
    overrides = ["scheduler@trainer.linear.scheduler=plateau", "trainer.linear.scheduler.mode=min"]
    with pytest.raises(ConfigError, match="higher is better: use max") as err:
        train(compose_config(overrides, tmp_path))
    assert err.value.key == "trainer.linear.scheduler.mode"
    assert not any(tmp_path.iterdir())  # not even the claim of the directory


def test_grad_accum_above_the_batches_of_an_epoch_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(["trainer.linear.batch_size=8", "trainer.linear.grad_accum=5"])
    with pytest.raises(ConfigError, match=r"5 exceeds the 4 batches.*recipe=small_data") as err:
        check_batch_sizes(cfg.trainer, 32)
    assert err.value.key == "trainer.linear.grad_accum"
    cfg.trainer.linear.grad_accum = 4
    check_batch_sizes(cfg.trainer, 32)
    # Through train: before the model is built, nothing of a run is left behind.
    overrides = ["dataset.trainval_size=60", "dataset.test_size=20"]
    overrides += ["trainer.linear.batch_size=8", "trainer.linear.grad_accum=1000"]
    with pytest.raises(ConfigError, match=r"trainer\.linear\.grad_accum"):
        train(compose_config(overrides, tmp_path))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "run_id.txt").exists()


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_reset_at_each_epoch(
    reset: bool, tmp_path: Path, smoke_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcnn.engine import stage

    buffers, real = [], stage.train_one_epoch

    def recording(net, loader, optimizer, *args, **kwargs):
        buffers.append([s["momentum_buffer"] for s in optimizer.state.values()])
        return real(net, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(stage, "train_one_epoch", recording)
    overrides = [*smoke_overrides, "trainer.stages=[linear]", "trainer.linear.epochs=3"]
    train(
        compose_config([*overrides, f"trainer.linear.reset_optimizer_each_epoch={reset}"], tmp_path)
    )
    # Each epoch starts from zero momentum (no buffer yet) with the reset, from the last
    # epoch's buffers without it.
    assert [len(b) > 0 for b in buffers] == [False, not reset, not reset]
    # The schedule goes on either way (cosine over the 3 epochs).
    lrs = [float(r["lr"]) for r in _rows(tmp_path)]
    assert lrs[0] > lrs[1] > lrs[2] > 0
