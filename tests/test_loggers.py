"""Loggers: metrics.csv and curves.png always, TensorBoard and wandb beside them, several
at once; wandb's run id survives a resume through the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

from bcnn.config import instantiate
from bcnn.engine import train
from bcnn.engine.loggers import Loggers, TensorBoardLogger, WandbLogger
from tests.conftest import compose_config

pytest.importorskip("tensorboard")

ROWS = [
    {"stage": "linear", "epoch": 1, "lr": 1.0, "train_loss": 2.0, "train_acc": 10.0,
     "val_acc": 12.0, "val_mean_class_acc": 11.0, "seconds": 0.1},
    {"stage": "linear", "epoch": 2, "lr": 0.5, "train_loss": 1.5, "train_acc": 30.0,
     "val_acc": 25.0, "val_mean_class_acc": 24.0, "seconds": 0.1},
    {"stage": "finetune", "epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0,
     "val_acc": float("nan"), "val_mean_class_acc": float("nan"), "seconds": 0.2},
]  # fmt: skip


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``folder``, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_csv_and_tensorboard_together(tmp_path: Path) -> None:
    cfg = compose_config(["logger=[csv,tensorboard]"], tmp_path)
    logger = instantiate(cfg.logger, output_dir=tmp_path, run_config={"seed": 3}, _recursive_=False)
    assert set(logger.loggers) == {"csv", "tensorboard"}
    for row in ROWS:
        logger.log_epoch(row)
    logger.log_summary({"test_acc": 48.5, "stages": {"linear": {"test_acc": 20.0}}})
    logger.close()
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 3
    assert (tmp_path / "curves.png").stat().st_size > 0
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["linear/train_acc"] == [(0, 10.0), (1, 30.0)]
    assert scalars["finetune/train_loss"] == [(2, 1.0)]
    assert "finetune/val_acc" not in scalars  # NaN: not measured, not drawn
    assert scalars["final/test_acc"] == [(3, 48.5)]
    assert scalars["final/linear/test_acc"] == [(3, 20.0)]


def test_the_csv_logger_is_always_there(tmp_path: Path) -> None:
    cfg = compose_config(["logger=tensorboard"], tmp_path)
    logger = instantiate(cfg.logger, output_dir=tmp_path, run_config={}, _recursive_=False)
    assert set(logger.loggers) == {"csv", "tensorboard"}
    logger.log_epoch(ROWS[0])
    logger.close()
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "curves.png").is_file()
    with pytest.raises(ValueError, match=r"logger\.extra"):
        Loggers(tmp_path, extra={"log_dir": "x"})


def test_a_resumed_tensorboard_log_has_each_epoch_once(tmp_path: Path) -> None:
    first = TensorBoardLogger(tmp_path)
    for row in ROWS:  # the third epoch was logged, then the process died before its checkpoint
        first.log_epoch(row)
    first.close()
    resumed = TensorBoardLogger(tmp_path)
    resumed.restore(ROWS[:2])
    resumed.log_epoch({**ROWS[2], "train_acc": 55.0})
    resumed.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["finetune/train_acc"] == [(2, 55.0)]
    assert scalars["linear/train_acc"] == [(0, 10.0), (1, 30.0)]


class FakeWandb:
    """Records what ``wandb.init`` is called with; runs keep their logged rows."""

    def __init__(self) -> None:
        self.inits: list[dict[str, Any]] = []
        self.runs: list[SimpleNamespace] = []

    def init(self, **kwargs: Any) -> SimpleNamespace:
        self.inits.append(kwargs)
        run = SimpleNamespace(id=kwargs["id"], logged=[], steps=[], summary={}, finished=False)

        def log(data: dict[str, Any], step: int | None = None) -> None:
            run.logged.append(data)
            run.steps.append(step)

        run.log = log
        self.runs.append(run)
        run.finish = lambda: setattr(run, "finished", True)
        return run


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=fake.init))
    return fake


def test_wandb_continues_the_run_of_its_state(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    logger = WandbLogger(tmp_path, {"seed": 0})
    assert not fake_wandb.inits  # started on first use
    logger.log_epoch(ROWS[0])
    run_id = logger.state_dict()["run_id"]
    assert fake_wandb.inits[0]["id"] == run_id and fake_wandb.inits[0]["resume"] == "allow"
    assert logger.run.logged == [
        {f"linear/{k}": v for k, v in ROWS[0].items() if k not in ("stage",)}
    ]
    logger.close()
    again = WandbLogger(tmp_path, {"seed": 0})
    again.load_state_dict({"run_id": run_id})
    again.log_epoch(ROWS[1])
    assert fake_wandb.inits[1]["id"] == run_id
    assert WandbLogger(tmp_path).state_dict()["run_id"] != run_id  # a new run: a new id


def test_a_resumed_training_keeps_its_wandb_run(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    overrides = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
    overrides += ["trainer.stages=[linear]", "logger=[tensorboard,wandb]"]
    train(compose_config(overrides, tmp_path))
    (first,) = fake_wandb.inits
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["logger"]["wandb"] == {"run_id": first["id"]}
    assert set(ckpt["logger"]) == {"csv", "tensorboard", "wandb"}
    assert (tmp_path / "curves.png").is_file() and any((tmp_path / "tensorboard").iterdir())
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2

    train(compose_config([f"trainer.resume={tmp_path}"], tmp_path))
    assert [init["id"] for init in fake_wandb.inits] == [first["id"]] * 2


def test_missing_packages_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'bcnn\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'bcnn\[wandb\]'"):
        WandbLogger(tmp_path)


def test_loss_and_learning_rate_every_n_optimizer_steps(
    tmp_path: Path, fake_wandb: FakeWandb
) -> None:
    overrides = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
    overrides += ["trainer.stages=[linear]", "logger=[tensorboard,wandb]"]
    # debug=smoke: 3 batches per epoch, 2 epochs: 6 optimizer steps.
    train(compose_config([*overrides, "trainer.log_every_n_steps=2"], tmp_path))
    scalars = _scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["linear/step_train_loss"]] == [2, 4, 6]
    assert all(v > 0 for _, v in scalars["linear/step_train_loss"])
    assert scalars["linear/step_lr"][0] == (2, 10.0)  # the recipe's linear lr
    assert [s for s, _ in scalars["linear/train_loss"]] == [3, 6]  # epochs, at their step
    # wandb: the same steps, in order; the epoch rows at the step they ended on.
    (run,) = fake_wandb.runs
    assert run.steps == [2, 3, 4, 6, 6]
    assert set(run.logged[0]) == {"linear/step_train_loss", "linear/step_lr"}
    assert "linear/val_acc" in run.logged[1]


def test_a_resumed_tensorboard_log_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    first = TensorBoardLogger(tmp_path)
    for step in (1, 2, 3, 4):
        first.log_step({"linear/step_train_loss": float(step)}, step)
    first.log_epoch(ROWS[0], 2)
    first.log_epoch(ROWS[1], 4)  # the process died before this epoch's checkpoint
    first.close()
    resumed = TensorBoardLogger(tmp_path)
    resumed.restore(ROWS[:1], step=2)
    resumed.log_step({"linear/step_train_loss": 30.0}, 3)
    resumed.log_epoch({**ROWS[1], "train_acc": 33.0}, 3)
    resumed.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["linear/step_train_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert scalars["linear/train_acc"] == [(2, 10.0), (3, 33.0)]
