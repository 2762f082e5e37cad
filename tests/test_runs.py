"""A trained run comes back as the same model: logits, classes and input convention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from bcnn.cli.callbacks import TrainCallbacks
from bcnn.data.synthetic import SyntheticDataset
from bcnn.engine import train
from bcnn.engine.runs import load_trained, release_run_dir
from tests.conftest import compose_config, run_train


def test_a_trained_run_reloads_to_the_same_predictions(
    tmp_path: Path, smoke_overrides: list[str]
) -> None:
    train(compose_config([*smoke_overrides, "trainer.stages=[linear]"], tmp_path))
    trained = load_trained(tmp_path)
    assert trained.checkpoint == tmp_path / "checkpoints" / "best.pt"
    assert len(trained.classes) == 12 and trained.classes[0].startswith("pairing_")
    assert not trained.model.training
    images = torch.stack([SyntheticDataset(split="test", test_size=4)[i][0] for i in range(4)])
    again = load_trained(tmp_path / "checkpoints" / "best.pt")
    with torch.no_grad():
        assert torch.equal(trained.model(images), again.model(images))
        assert trained.model(images).abs().sum() > 0  # the trained classifier, not zeros
    with pytest.raises(FileNotFoundError, match=r"checkpoints/best\.pt"):
        load_trained(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_resumed_run_logs_into_its_own_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["debug=smoke", "trainer.stages=[linear]", "dataset.trainval_size=60"]
    first = run_train([*args, "dataset.test_size=20", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "results.json").unlink()
    record = (run_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = run_train([f"trainer.resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no outputs/<date>/ folder
    log = (run_dir / "train.log").read_text()
    assert log.count("Model: ") == 2 and "Resuming from" in log  # both processes, one log
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record  # how it started
    assert (run_dir / "results.json").is_file()


def test_the_hydra_callback_settles_the_run_directory(tmp_path: Path) -> None:
    def composed(*overrides: str) -> DictConfig:
        with initialize_config_module("bcnn.configs", version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)

    callback = TrainCallbacks()
    fresh = tmp_path / "fresh"
    cfg = composed(f"hydra.run.dir={fresh}")
    callback.on_run_start(config=cfg)
    assert (fresh / "run_id.txt").is_file()  # claimed before Hydra writes anything
    with pytest.raises(SystemExit, match="already holds a run"):
        callback.on_run_start(config=composed(f"hydra.run.dir={fresh}"))
    release_run_dir(None)  # what a run that fails before any work does
    assert not (fresh / "run_id.txt").exists()
    # A run given its own directory claims that one itself.
    callback.on_run_start(config=composed(f"hydra.run.dir={fresh}", f"paths.output_dir={fresh}"))
    assert not (fresh / "run_id.txt").exists()
    # A resumed run goes to its own directory and keeps the record of its start.
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "last.pt").write_bytes(b"")
    cfg = composed(f"trainer.resume={tmp_path / 'old'}")
    callback.on_run_start(config=cfg)
    assert cfg.hydra.run.dir == str(tmp_path / "old") and cfg.hydra.output_subdir is None
