"""A trained run comes back as the same model: logits, classes and input convention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bcnn.data.synthetic import SyntheticDataset
from bcnn.engine import train
from bcnn.engine.runs import load_trained
from tests.conftest import compose_config


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
