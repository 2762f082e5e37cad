"""A trained run comes back as the same model: logits, classes and input convention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bcnn.data.synthetic import SyntheticDataset
from bcnn.engine import train
from bcnn.engine.runs import load_trained
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
