"""bcnn-eval: top-1, mean per-class accuracy, per-class CSV, confusion matrix and most
confused pairs of a trained run, equal to a direct count over the split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from bcnn.cli.evaluate import dataset_config, most_confused, run_eval
from bcnn.config import instantiate
from bcnn.data.synthetic import SyntheticDataset
from bcnn.engine import train
from bcnn.engine.runs import TrainedModel, load_trained
from bcnn.errors import ConfigError
from tests.conftest import compose_config, run_train

SMOKE = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # A few more steps than the smoke preset: predictions spread over several classes.
    train(compose_config([*SMOKE, "trainer.stages=[linear]", "trainer.linear.epochs=4"], out))
    return out


def eval_config(*overrides: str) -> DictConfig:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def _direct_confusion(run_dir: Path, split: str, flip: bool) -> np.ndarray:
    """The confusion matrix counted here, image by image."""
    trained = load_trained(run_dir)
    ds = SyntheticDataset(split=split, trainval_size=120, test_size=60)
    matrix = np.zeros((12, 12), dtype=np.int64)
    with torch.no_grad():
        for image, label in ds:
            probs = trained.model(image[None]).softmax(1)
            if flip:
                probs = probs + trained.model(image[None].flip(-1)).softmax(1)
            matrix[label, int(probs.argmax())] += 1
    return matrix


def test_eval_writes_what_a_direct_count_gives(run_dir: Path, tmp_path: Path) -> None:
    metrics = run_eval(eval_config(f"checkpoint={run_dir}", "progress=false"), tmp_path)
    expected = _direct_confusion(run_dir, "test", flip=False)
    assert metrics["images"] == 60 and metrics["split"] == "test" and not metrics["flip"]
    assert metrics["top1"] == pytest.approx(100 * np.trace(expected) / 60)
    per_class_expected = 100 * np.diag(expected) / expected.sum(1)
    present = expected.sum(1) > 0
    assert metrics["mean_class_acc"] == pytest.approx(per_class_expected[present].mean())
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["top1"] == metrics["top1"]

    matrix = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    assert (matrix.to_numpy() == expected).all()
    classes = load_trained(run_dir).classes
    assert list(matrix.index) == classes and list(matrix.columns) == classes
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    assert per_class["images"].to_list() == expected.sum(1).tolist()
    assert per_class["correct"].to_list() == np.diag(expected).tolist()
    np.testing.assert_allclose(per_class["accuracy"], per_class_expected, atol=1e-3)

    pairs = pd.read_csv(tmp_path / "most_confused.csv")
    off = expected - np.diag(np.diag(expected))
    assert pairs["count"].to_list() == sorted(off.ravel().tolist(), reverse=True)[: len(pairs)]
    assert len(pairs) == min(10, int((off > 0).sum()))
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_eval_on_val_with_flips(run_dir: Path, tmp_path: Path) -> None:
    cfg = eval_config(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "split=val", "flip=true")
    metrics = run_eval(cfg, tmp_path)
    expected = _direct_confusion(run_dir, "val", flip=True)
    assert metrics["images"] == 24 and metrics["flip"]
    assert metrics["top1"] == pytest.approx(100 * np.trace(expected) / expected.sum())


def test_eval_rejects_a_dataset_with_other_classes(run_dir: Path, tmp_path: Path) -> None:
    cfg = eval_config(f"checkpoint={run_dir}", "dataset=synthetic", "dataset.num_classes=6")
    with pytest.raises(ValueError, match="6 classes are not the model's 12"):
        run_eval(cfg, tmp_path)
    with pytest.raises(ValueError, match="'split'"):
        run_eval(eval_config(f"checkpoint={run_dir}", "split=dev"), tmp_path)


@pytest.mark.parametrize(
    "option",
    ["split=dev", "precision=64", "batch_size=0", "num_workers=-1", "flip=yes", "top_confused=-1"],
)
def test_a_bad_option_is_refused_before_the_checkpoint_is_read(option: str, tmp_path: Path):
    key = option.split("=")[0]
    with pytest.raises(ConfigError, match=f"^Invalid config value for '{key}'"):
        run_eval(eval_config(f"checkpoint={tmp_path / 'none.pt'}", option), tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_new_data_dir_moves_the_run_dataset_root(tmp_path: Path) -> None:
    run_config = compose_config(["dataset=cub", "paths.data_dir=/old/data"])
    OmegaConf.resolve(run_config)  # checkpoints hold the resolved config
    trained = TrainedModel(None, run_config, [], tmp_path / "best.pt", tmp_path)  # type: ignore[arg-type]
    cfg = eval_config("checkpoint=x", "paths.data_dir=/new/place")
    moved = dataset_config(cfg, trained, move_data_dir=True)
    assert moved.root == "/new/place/cub" and moved.name == "cub"
    assert dataset_config(cfg, trained, move_data_dir=False).root == "/old/data/cub"
    assert OmegaConf.to_container(run_config.dataset)["root"] == "/old/data/cub"  # type: ignore[index]


def test_most_confused_lists_pairs_of_different_classes() -> None:
    matrix = np.array([[5, 3, 0], [1, 4, 6], [0, 0, 9]])
    pairs = most_confused(matrix, ["a", "b", "c"], top=5)
    assert pairs[["true", "predicted", "count"]].values.tolist() == [
        ["b", "c", 6],
        ["a", "b", 3],
        ["b", "a", 1],
    ]
    assert pairs["share_of_true_class"].iloc[0] == pytest.approx(100 * 6 / 11)


def _command(*args: str) -> subprocess.CompletedProcess:
    return run_train(args, script=[sys.executable, "-m", "bcnn.cli.evaluate"], full_error=False)


def test_bcnn_eval_command(run_dir: Path, tmp_path: Path) -> None:
    proc = _command(f"checkpoint={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}", "progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and "mean per-class accuracy" in proc.stdout
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert (tmp_path / "eval" / "evaluate.log").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_a_gpu_is_one_message(run_dir: Path, tmp_path: Path) -> None:
    proc = _command(f"checkpoint={run_dir}", "device=cuda", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith(
        "bcnn-eval: error: Invalid config value for 'device': 'cuda' but "
    )
    assert len(proc.stderr.splitlines()) == 2 and "Traceback" not in proc.stderr  # + the hint


def test_a_dataset_of_photographs_composes(tmp_path: Path) -> None:
    # A photograph dataset's config selects its training recipe, which eval.yaml must let it.
    cfg = eval_config("checkpoint=x", "dataset=cub", f"dataset.root={tmp_path}")
    assert cfg.dataset.name == "cub" and cfg.dataset.root == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="CUB"):
        instantiate(cfg.dataset, split="test", augment=False)
