"""Every command with a config answers a mistyped key, group or flag with the closest
existing ones, before any work and instead of Hydra's advice to append a new key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcnn.cli.overrides import check_overrides
from tests.conftest import run_train


def _message(prog: str, config: str, argv: list[str]) -> str | None:
    try:
        check_overrides(prog, config, argv)
    except SystemExit as exit:
        return str(exit.code)
    return None


@pytest.mark.parametrize(
    ("config", "argv", "fix"),
    [
        ("train", ["poolng=avg"], "did you mean pooling=avg?"),
        ("train", ["pooling=compact", "pooling.proj_dm=8"], "did you mean pooling.proj_dim=8?"),
        ("train", ["trainer.linear.lrr=3"], "did you mean trainer.linear.lr=3?"),
        ("train", ["lr=3"], "did you mean trainer.linear.lr=3 or trainer.finetune.lr=3?"),
        ("train", ["launcher=joblib"], "did you mean hydra/launcher=joblib?"),
        ("train", ["-m", "hydra/launcher=joblib", "hydra.launcher.n_job=2"], "n_jobs=2?"),
        ("eval", ["checkpoint=x", "devce=cpu"], "did you mean device=cpu?"),
        ("viz", ["kind=maps", "viz.maps.gama=0.5"], "did you mean viz.maps.gamma=0.5?"),
        ("prepare_data", ["dataset=inat", "version=2021"], "did you mean dataset.version=2021?"),
        ("reproduce", ["tabel=talk_nabirds"], "did you mean table=talk_nabirds?"),
        ("prepare_data", ["--verify"], "takes key=value arguments; did you mean verify=true?"),
        ("train", ["--no-progress"], "did you mean trainer.progress=false?"),
    ],
)
def test_a_mistyped_name_gets_the_closest_ones(config: str, argv: list[str], fix: str) -> None:
    message = _message("bcnn-x", config, argv)
    assert message is not None and message.startswith("bcnn-x: error: ")
    assert message.endswith(fix) and "+" not in message.split(":")[-1]


def test_a_name_with_no_close_one_is_named_with_how_to_add_it() -> None:
    message = _message("bcnn-x", "train", ["flux=3"])
    assert message == (
        "bcnn-x: error: flux=3: no key or group 'flux' in train (+flux=3 adds one; "
        "--cfg job prints the config)"
    )


@pytest.mark.parametrize(
    ("config", "argv"),
    [
        ("train", []),
        ("train", ["pooling=compact", "pooling.proj_dim=8", "+pooling.foo=1", "seed=3"]),
        ("train", ["-m", "pooling=avg,sum", "pooling.proj_dim=8", "seed=1,2"]),
        ("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "job"]),
        ("eval", ["checkpoint=x", "dataset=cub", "dataset.root=/data/cub"]),
        ("prepare_data", ["dataset=inat", "dataset.version=2021", "root=/x", "verify=true"]),
        ("reproduce", ["table=talk_nabirds", "+trainer.device=cpu", "rows=[a,b]"]),
        # Left to Hydra, whose message lists the options of the group.
        ("train", ["pooling=avgg"]),
    ],
)
def test_valid_command_lines_pass(config: str, argv: list[str]) -> None:
    assert _message("bcnn-x", config, argv) is None


def test_train_prints_the_fix_alone(tmp_path: Path) -> None:
    proc = run_train(["poolng=avg", f"hydra.run.dir={tmp_path}"], full_error=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "bcnn-train: error: poolng=avg: no key or group 'poolng' in train; did you mean "
        "pooling=avg?"
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
