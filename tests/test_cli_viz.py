"""bcnn-viz runs as a command, and shows its progress (the optimizations, the report's
evaluation) as training does: tqdm bars on stderr, off with progress=false."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from bcnn.engine import train
from bcnn.viz.app import visualize
from tests.conftest import compose_config, run_train

TEXTURE = ["kind=texture", "backbone=small", "backbone.channels=[4]", "dataset=synthetic"]
TEXTURE += ["dataset.test_size=2", "viz.texture.steps=3", "viz.texture.scales=[0.5,1.0]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    smoke = ["debug=smoke", "dataset.trainval_size=60", "dataset.test_size=12"]
    train(compose_config([*smoke, "trainer.stages=[linear]", "backbone.channels=[4]"], out))
    return out


def _visualize(overrides: list[str], out: Path) -> None:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        visualize(compose("viz", overrides=[*overrides, f"paths.output_dir={out}"]))


@pytest.mark.parametrize("progress", [True, False])
def test_every_kind_shows_its_progress(
    progress: bool, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = f"progress={str(progress).lower()}"
    _visualize([*TEXTURE, flag], tmp_path / "texture")
    _visualize(
        [
            "kind=inverse",
            f"run={run_dir}",
            "viz=smoke",
            "viz.inverse.steps=4",
            "viz.inverse.init=texture",
            "viz.inverse.max_classes=2",
            "viz.texture.steps=2",
            flag,
        ],
        tmp_path / "inverse",
    )
    _visualize(["kind=report", f"run={run_dir}", flag], tmp_path / "report")
    err = capsys.readouterr().err
    bars = ("texture 16x16", "texture 32x32", "start 1/2", "start 2/2", "inverse", "report: test")
    for bar in bars:
        assert (bar in err) == progress, bar
    if progress:
        assert "0/3" in err and "0/4" in err  # the bars count steps


def test_the_bcnn_viz_command_writes_into_its_run_dir(tmp_path: Path) -> None:
    script = [sys.executable, "-m", "bcnn.cli.viz"]
    args = [*TEXTURE, "progress=false", f"hydra.run.dir={tmp_path}"]
    proc = run_train(args, script=script, full_error=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "texture.png").stat().st_size > 0
